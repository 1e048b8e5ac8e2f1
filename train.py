"""
Train a GPT, on one CPU or GPU or on many GPUs and nodes with DDP or FSDP2.

    python train.py config/train_shakespeare_char.py               # one process
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/finetune_shakespeare.py \
        --parallelism=fsdp
    python train.py --init_from=resume --out_dir=out-shakespeare-char   # carry on where it stopped

The globals below are the config: config files and --key=value flags override them
(configurator.py). A run checkpoints every checkpoint_interval iterations, on SIGTERM/SIGINT and
at the end. An out_dir that holds a good checkpoint is always continued, with the config stored in
it, so the same command run again carries on exactly where the run was (docs/checkpoints.md).
"""
import math
import os
import sys
import time

from configurator import check, check_data, check_fits, config_keys, configure
from console import RunError, UsageError, console, one_line_errors, say
from metrics import MetricsLog, has_wandb, humanize

# -----------------------------------------------------------------------------------------------
# default config: GPT-2 124M on OpenWebText
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # ckpt.pt at every eval, not only when val loss improves
init_from = "scratch"  # 'scratch', 'resume', or 'gpt2', 'gpt2-medium', ..., or a local HF folder
# checkpoints
checkpoint_interval = 1000  # a periodic checkpoint every N iterations (0: on signals and at the end)
keep_last = 3  # periodic checkpoints kept; older ones go once a newer one is safely on disk
keep_every = 0  # also keep every checkpoint whose iteration is a multiple of this (0: none)
resume_from = ""  # resume from this file, not the newest good one in out_dir (implies resume)
async_save = False  # a background thread writes checkpoints; training stalls only to copy the state
checkpoint_minutes = 0.0  # also checkpoint when this many minutes passed since the last one (0: off)
time_limit = ""  # this process's budget ('3:50:00', '90m', seconds): checkpoint and exit 0 in time
# the remote copy (docs/remote.md); like out_dir, part of the command, never restored
remote_dir = ""  # a durable copy of every checkpoint: s3://bucket/run, gs://..., file:///mnt/run
remote_wait = 60.0  # seconds a run's end (a stop signal, time_limit) waits for the copy in flight
remote_lease = 120.0  # seconds without a refresh after which a lost machine's lease lapses
# wandb logging (out_dir/metrics.jsonl is always written; plot.py draws it)
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"
gradient_accumulation_steps = 5 * 8  # over all ranks: the global batch does not change with them
batch_size = 12  # micro-batch per rank
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, 0.1+ for fine-tuning
bias = False
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
# learning rate: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters, as in Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10
# system
backend = "auto"  # nccl on CUDA, gloo elsewhere
device = "auto"  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bf16 on CUDA that has it, else fp16; fp32 on CPU), 'float32', 'bfloat16', ...
compile = True  # torch.compile the model
parallelism = "ddp"  # 'ddp': a whole model per GPU; 'fsdp': weights, gradients, AdamW sharded (FSDP2)
seed = 1337
peak_flops = 0.0  # FLOP/s that MFU is measured against; 0: known GPUs' data sheet, else measured
# -----------------------------------------------------------------------------------------------
keys = config_keys(globals())
sources = configure(globals())  # {key: the config file or --flag that set it}; values checked
# -----------------------------------------------------------------------------------------------
# torch and what uses it (seconds to import) only now: a wrong flag or config file is refused at once
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import distributed  # noqa: E402
from dataset import TokenData  # noqa: E402
from devices import autocast_context, memory, one_line_out_of_memory, peak_flops_for  # noqa: E402
from devices import pick_device, pick_dtype  # noqa: E402
from keep import files, lock, preemption, remote as remote_copy, resume, rng  # noqa: E402
from keep.saver import Checkpointer  # noqa: E402

one_line_out_of_memory()  # a batch or model too big for the device: one error line, not a traceback
one_line_errors()  # a UsageError (exit 2) or RunError (exit 1) nobody caught: one line, the one way out
time_budget = preemption.parse_duration(time_limit)
if wandb_log and not has_wandb():
    raise RunError("wandb_log=True needs the wandb package: pip install wandb")
rank = int(os.environ.get("RANK", 0))  # torchrun sets RANK; a plain `python train.py` is a world of one
master = rank == 0
log = say if master else (lambda *a, **k: None)  # a dead pipe or closed terminal never stops a run
writes = not eval_only  # eval_only reads: no lock, no lease, nothing written (it may score a live run)
if master and writes:  # the console's lines also go to out_dir/console.log, once the run holds out_dir
    console.keep()

# under torchrun the process group comes first, so that no rank reads a checkpoint before rank 0
# holds out_dir's lock. remote_dir is probed now (every kind of call a run makes): a wrong bucket or
# credentials is one error line in seconds, not a failed upload hours in; rank 0 takes its lease
# with this start's token, and a newer checkpoint there is downloaded into out_dir once it is held
machine = pick_device(device)  # (`device` itself stays the knob's value, stored in the config)
joined = distributed.init(machine, backend) if distributed.under_torchrun() else None
attempt = distributed.from_rank0(files.new_run_id() if master else None) if remote_dir and writes else None
remote = distributed.on_rank0(lambda: remote_copy.connect(remote_dir, out_dir, attempt, remote_lease),
                              master) if attempt else None
out_lock = lock.claim_on_every_rank(out_dir, master, remote=remote) if writes else None
ckpt_path, ckpt, config, changed = resume.start({k: globals()[k] for k in keys}, sources, master, log)
globals().update(config)  # the run's stored config, with config files and flags on top
check(config)  # again: a stored config comes from a file, maybe an old or foreign one
data = TokenData(dataset)
check_data(block_size, data.tokens(), dataset)
vocab_size = data.vocab_size()
if ckpt is not None:
    resume.check_compatible(ckpt, data, vocab_size, log=log)
if resume.complete(ckpt, ckpt_path, config, remote, attempt, log=log):  # max_iters reached: nothing to do
    sys.exit(0)
stopper = preemption.Stopper(time_budget)  # from here on a signal means "save, then exit"

# distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Under FSDP the periodic checkpoints
# are folders, every rank writing its shard (keep/folders.py); ckpt.pt stays one file
fsdp = parallelism == "fsdp"
local_rank, world_size, device = joined or distributed.init(machine, backend, fsdp)
grouped = dist.is_initialized()  # ranks that must agree (torchrun, or FSDP alone)
ddp = grouped and not fsdp
if gradient_accumulation_steps % world_size:
    raise UsageError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of "
                     f"the world size {world_size}")
accum = gradient_accumulation_steps // world_size  # micro-steps per rank
procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # training processes on this machine
device_type = "cuda" if device.startswith("cuda") else device
dtype = pick_dtype(dtype, device, log=log)
ctx = autocast_context(device, "float32" if fsdp else dtype)  # FSDP casts by itself (distributed.shard)
rng.seed_rngs(seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------------------------
# model: from the checkpoint being continued, from scratch, or from GPT-2's weights; the config
# follows its shape
fits = lambda args: check_fits(args, device, memory(device), world_size if fsdp else 1,  # noqa: E731
                               batch_size, procs, async_save)
model, model_args = resume.build_model(ckpt, ckpt_path, config, vocab_size, fsdp, fits)
# the run's own counters: iteration, best loss, tokens, run id, branch, resumes (keep/resume.py)
run = resume.lineage(ckpt, ckpt_path, out_dir, bool(resume_from), changed, log=log) if ckpt is not None \
    else resume.new_run(init_from)
n_layer, n_head, n_embd, block_size, bias = (model_args[k] for k in resume.SHAPE)
config.update({k: model_args[k] for k in resume.SHAPE})
run.tokens_per_iter = tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if run.tokens_seen is None:  # a file without the count (nanoGPT's): as if the batch never changed
    run.tokens_seen = run.iter_num * tokens_per_iter
log(f"device {device}, dtype {dtype}, world size {world_size}, {model.get_num_params() / 1e6:.2f}M "
    f"parameters, tokens per iteration {tokens_per_iter:,}")
# a new out_dir is made only now, so that a start that fails on its config, data or model leaves
# nothing behind; and an unwritable one is found before training, not at the first save hours later
if attempt:  # the lease names this run now (a new run had no id when out_dir was claimed)
    distributed.on_rank0(lambda: remote.take_lease(run.run_id, attempt, remote_lease, log=log), master)
if writes:
    out_lock = lock.claim_on_every_rank(out_dir, master, create=True, held=out_lock)
    console.open(out_dir)

if rank:
    rng.seed_rngs(seed + rank)  # dropout: each rank its own stream (rank 0 goes on with seed's)
model.to(device)
if fsdp:
    distributed.shard(model, dtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if ckpt is not None:
    resume.restore_training(ckpt, ckpt_path, model, optimizer, scaler, rank, world_size, fsdp, log=log)
    del ckpt  # free host memory before training
raw_model = model
if compile:
    log("compiling the model... (takes a minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
peak = peak_flops_for(device, dtype, peak_flops) if master else 1.0
flops_per_iter = raw_model.flops_per_token() * batch_size * accum * block_size  # per rank, for MFU


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:  # (cosine's end; also lr_decay_iters <= warmup_iters)
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches per split, shared out between ranks. None if a stop
    (signal or time_limit) comes meanwhile: the eval is abandoned so the checkpoint comes quickly."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters, device=device)
        for j in range(math.ceil(eval_iters / world_size)):  # as many rounds on every rank
            stopping = stopper.signum is not None or stopper.out_of_time(0.0, ck.stop_seconds())
            if distributed.any_rank([stopping], device)[0]:
                model.train()
                return None
            k = j * world_size + rank
            # past eval_iters a rank still runs a batch (and drops it): FSDP's ranks all run forward
            X, Y = data.eval_batch(split, seed, k % eval_iters, batch_size, block_size)
            with ctx:
                _, loss = model(X.to(device), Y.to(device))
            if k < eval_iters:
                losses[k] = loss.float()
        if grouped:
            dist.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train()
    return out


def save(val_loss, **kind):
    """A checkpoint of the run as it stands. A diverged model is never checkpointed, so every file
    on disk is from before a divergence (under FSDP each rank sees only its own shard)."""
    finite = torch.stack([distributed.local(p).isfinite().all() for p in raw_model.parameters()]).all()
    if distributed.any_rank([not finite], device)[0]:
        halt(run.iter_num, "diverged", "the model's weights are not finite (nan or inf)")
    return ck.save(run.iter_num, val_loss, **kind)


def halt(it, event, what):
    """Stop every rank (each takes the same decision) with rank 0's one error line; exit 1."""
    ck.close()  # what is in flight reaches the disk
    metrics.event(it, event, reason=what)
    if master:
        say(f"error: {ck.halt_line(it, event, what)}", err=True)
    distributed.teardown()
    sys.exit(1)


# -----------------------------------------------------------------------------------------------
# the training loop. iter_num counts finished updates: a checkpoint taken after update k-1 holds
# iter_num=k, and a resumed run starts with update k, so none is run twice or skipped. At each
# iteration, before its update: evaluate if due, checkpoint if due (with the val loss just
# measured), then stop or train. metrics.jsonl and wandb are rank 0's; a resumed run marks the rows
# of the work it redoes as superseded, and continues the wandb run whose id is the run's id
metrics = MetricsLog(out_dir if master and writes else None, run.tokens_at,
                     resumed_at=run.start_iter if ckpt_path else None,
                     wandb=dict(project=wandb_project, name=wandb_run_name, config=config,
                                id=run.run_id) if wandb_log else None)
metrics.event(run.start_iter, "start", params=raw_model.get_num_params(), model_args=model_args,
              init_from=run.origin, dataset=dataset, world_size=world_size,
              tokens_per_iter=tokens_per_iter, max_iters=max_iters)
if ckpt_path:
    metrics.event(run.start_iter, "resume", path=ckpt_path, branch=run.branch)
fixed = dict(model_args=model_args, config=config, tokenizer=data.tokenizer(),
             data_fingerprint=data.fingerprint())  # a checkpoint alone samples and exports
ck = Checkpointer.build(config, run, fixed, model=raw_model, optimizer=optimizer, scaler=scaler,
                        metrics=metrics, remote=remote, attempt=attempt, lock=out_lock, device=device,
                        rank=rank, resumed_from=ckpt_path, log=log)
dt, final_failed, lossf, rescued, step_times = 0.0, False, 0.0, None, []
run.started = time.time()
while True:
    # one all-reduce per iteration: a signal, time_limit or due checkpoint on any rank counts on all
    signalled, out_of_time, due, bad_loss, writing, gave_up, lost = distributed.any_rank([
        stopper.signum is not None, stopper.out_of_time(dt, ck.stop_seconds()), ck.due(run.iter_num),
        not math.isfinite(lossf), ck.writing(), ck.given_up(), ck.folder_lost()], device)
    ck.poll(folders_idle=not writing)  # announce (and retain after) a background write that ended
    if bad_loss:
        halt(run.iter_num - 1, "diverged", f"the training loss is {lossf}")  # the update that gave it
    if gave_up:  # saves keep failing (a full disk): a stop is seen, hours of unsaved training not
        halt(run.iter_num, "saves_failed", "checkpoints keep failing")
    if lost and rescued is None:  # out_dir deleted or replaced (rm -rf): save elsewhere, then stop
        rescued = ck.rescue()
    stop, val_loss, it = signalled or out_of_time or lost, None, run.iter_num
    evaluated = run.last_eval is not None and run.last_eval[0] == it and not eval_only  # in the ckpt
    if not stop and not evaluated and (it % eval_interval == 0 or it == max_iters or eval_only):
        losses = estimate_loss()
        if losses is None:  # abandoned: a signal or time_limit came during it
            stop = True
        elif not all(map(math.isfinite, losses.values())):
            bad = losses["val"] if not math.isfinite(losses["val"]) else losses["train"]
            halt(it, "diverged", f"the eval loss is {bad}")
        else:
            val_loss, run.last_eval = losses["val"], [it, losses["val"]]
            metrics.row("eval", it, tokens=run.tokens_at(it), train_loss=losses["train"], val_loss=val_loss,
                        lr=get_lr(it) if decay_lr else learning_rate)
            log(f"step {it}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}")
            if not eval_only and it > 0 and (val_loss < run.best_val_loss or always_save_checkpoint):
                run.best_val_loss = min(run.best_val_loss, val_loss)
                save(val_loss, best=True)
    if eval_only:
        break
    if stop:
        why = f"{stopper.name} received" if stopper.name else "out_dir was deleted or replaced" if lost \
            else "time_limit nearly reached" if stopper.out_of_time(dt, ck.stop_seconds()) \
            else "another rank is stopping"
        log(f"{why} at iteration {it}: " + ("saving a checkpoint, then exiting" if it > run.start_iter
                                            else "exiting: nothing new to save"))  # (no update since)
        metrics.event(it, "stop", reason=why)
    final = stop or it >= max_iters
    if it > run.start_iter and (due or final):
        final_failed = not save(val_loss, final=final) and final
    if final:
        break

    t0 = time.perf_counter()
    lr = get_lr(it) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    # DDP averages gradients across ranks on the last micro-step only; FSDP reduce-scatters them at
    # every micro-step, so that they stay sharded (memory is why one picks FSDP)
    for micro_step in range(accum):
        if ddp:
            model.require_backward_grad_sync = micro_step == accum - 1
        X, Y = data.train_batch(seed, it, micro_step, batch_size, block_size, accum, rank, world_size)
        X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
        with ctx:
            _, loss = model(X, Y)
            loss = loss / accum  # the mean over the whole global batch
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # the global norm, also FSDP's
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    if grouped:  # the loss logged is the mean over the whole global batch: every rank's micro-steps
        dist.all_reduce(loss_sum)
        loss_sum /= world_size
    lossf = loss_sum.item()  # also waits for the GPU, so dt is the real step time
    dt = time.perf_counter() - t0
    step_times.append(dt)

    if run.iter_num % log_interval == 0:
        mfu = flops_per_iter / dt / peak
        recent = sorted(step_times[-20:])[len(step_times[-20:]) // 2]  # the median resists a slow step
        # the row first: a line on the console means its row is in metrics.jsonl
        metrics.row("train", it, tokens=run.tokens_at(it + 1), loss=lossf, lr=lr, ms=dt * 1000,
                    tok_s=tokens_per_iter / dt, mfu=mfu)
        log(f"iter {it}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tokens_per_iter / dt:,.0f} tok/s, "
            f"mfu {mfu * 100:.2f}%, lr {lr:.2e}, eta {humanize(recent * (max_iters - run.iter_num))}")

signals = stopper.count
ck.close(interrupted=lambda: stopper.count > signals)  # a background write reaches the disk first
if step_times:
    steady = sorted(step_times[min(10, len(step_times) // 2):])  # past the warm-up steps
    log(f"done at iteration {run.iter_num}: median {steady[len(steady) // 2] * 1000:.2f} ms/iter, "
        f"{time.time() - run.started:.1f}s wall")
metrics.event(run.iter_num, "end", seconds=round(time.time() - run.started, 3))
model = None  # the DDP wrapper holds the process group: let it go before the group, not at shutdown
distributed.teardown()
if rescued and master:
    say(f"error: {ck.rescued_line(out_dir, final_failed)}", err=True)
code = 1 if final_failed or rescued else stopper.exit_code if stopper.count > signals or stop else 0
if stop and not final_failed and not rescued and stopper.count == signals:
    if run.iter_num > run.start_iter:
        log(f"checkpoint saved at iteration {run.iter_num}; the same command (or --init_from=resume) "
            f"continues the run")
    elif stopper.name is None:  # time_limit: a job that requeues itself would loop without progress
        say(f"error: time_limit={time_limit!r} leaves no time for one iteration and a checkpoint; raise it",
            err=True)
        code = 1
sys.exit(code)
