"""Train a GPT, on one CPU or GPU or on many GPUs and nodes with DDP or FSDP2.

    python train.py config/train_shakespeare_char.py               # one process
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallelism=fsdp
    python train.py --init_from=resume --out_dir=out-shakespeare-char   # carry on where it stopped

The globals below are the config: config files and --key=value flags override them
(configurator.py). A run checkpoints every checkpoint_interval iterations, on SIGTERM/SIGINT and
at the end; the same command run again carries on exactly where it was (docs/checkpoints.md).
"""
import math
import os
import sys
import time
from functools import partial

from configurator import check, config_keys, configure
from console import console, one_line_errors, say
from metrics import MetricsLog, humanize, median, speed_line

# -----------------------------------------------------------------------------------------------
# default config: GPT-2 124M on OpenWebText
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_tokens = 2**21  # tokens of each split scored at an eval: its first ones (0: all; evals.md)
eval_iters = 0  # nanoGPT's: if set, eval_tokens = eval_iters * batch_size * block_size
eval_only = False  # evaluate once and exit
eval_tasks = ""  # also score these at evals: hellaswag,piqa,winogrande,arc_easy (docs/evals.md)
eval_tasks_limit = 500  # the first N examples of each task (-1: all)
eval_tasks_interval = 0  # iterations between task scores, a multiple of eval_interval (0: each)
eval_data = ""  # the folder of the tasks' data (default: data/evals)
always_save_checkpoint = True  # ckpt.pt at every eval, not only when val loss improves
init_from = "scratch"  # 'scratch', 'resume', or 'gpt2', 'gpt2-medium', ..., or a local HF folder
# checkpoints
checkpoint_interval = 1000  # a periodic checkpoint every N iterations (0: on signals, at the end)
keep_last = 3  # periodic checkpoints kept; older ones go once a newer one is safely on disk
keep_every = 0  # also keep every checkpoint whose iteration is a multiple of this (0: none)
resume_from = ""  # resume from this file, not the newest good one in out_dir (implies resume)
async_save = False  # a background thread writes checkpoints; training stalls only to copy the state
checkpoint_minutes = 0.0  # also checkpoint once this many minutes passed since the last (0: off)
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
dtype = "auto"  # 'auto' (bf16 on CUDA that has it, else fp16; fp32 on CPU), 'float32', ...
compile = True  # torch.compile the model
parallelism = "ddp"  # 'ddp': a whole model per GPU; 'fsdp': weights, grads, AdamW sharded (FSDP2)
seed = 1337
peak_flops = 0.0  # FLOP/s that MFU is measured against; 0: known GPUs' data sheet, else measured
# -----------------------------------------------------------------------------------------------
keys = config_keys(globals())
sources = configure(globals())  # {key: the config file or --flag that set it}; values checked
# torch and what uses it (seconds to import) only now: a wrong flag or config file fails at once
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import distributed  # noqa: E402
from devices import autocast_context, memory, one_line_out_of_memory, peak_flops_for  # noqa: E402
from devices import allow_tf32, check_fits, pick_device, pick_dtype  # noqa: E402
from evals.evaluator import Evaluator  # noqa: E402
from keep import lock, preemption, remote as remote_copy, resume, rng  # noqa: E402
from keep.run import run_state  # noqa: E402
from keep.saver import Checkpointer  # noqa: E402

one_line_out_of_memory()  # a batch or model too big for the device: one error line, not a traceback
one_line_errors()  # an uncaught UsageError (exit 2) or RunError (exit 1): one line, no traceback
time_budget = preemption.parse_duration(time_limit)
rank = int(os.environ.get("RANK", 0))  # torchrun sets it; a plain `python train.py` is rank 0 of 1
master = rank == 0
log = say if master else (lambda *a, **k: None)  # a dead pipe or closed terminal never stops a run
writes = not eval_only  # eval_only only reads: no lock, no lease, nothing written (a live run too)
if master and writes:  # the console's lines also go to out_dir/console.log, once the run holds it
    console.keep()

# under torchrun the process group comes first: no rank reads a checkpoint before rank 0 holds
# out_dir's lock. remote_dir is probed now (every call a run makes): a wrong bucket is one error
# line in seconds, not a failed upload hours in; a newer checkpoint there is downloaded into out_dir
machine = pick_device(device)  # (`device` itself stays the knob's value, stored in the config)
joined = distributed.init(machine, backend) if distributed.under_torchrun() else None
remote, attempt = remote_copy.join(remote_dir if writes else "", out_dir, remote_lease, master)
out_lock = lock.claim_on_every_rank(out_dir, master, remote=remote) if writes else None
config = {k: globals()[k] for k in keys}
ckpt_path, ckpt, config, changed = resume.start(config, sources, master, log)
globals().update(config)  # the run's stored config, with config files and flags on top
check(config)  # again: a stored config comes from a file, maybe an old or foreign one
data = resume.open_data(config, ckpt, log)  # checked against block_size and the checkpoint
if resume.complete(ckpt, ckpt_path, config, remote, attempt, log=log):  # max_iters reached
    distributed.teardown(exit_code=0)
stopper = preemption.Stopper(time_budget)  # from here on a signal means "save, then exit"

# distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Under FSDP the periodic checkpoints
# are folders, every rank writing its shard (keep/folders.py); ckpt.pt stays one file
fsdp = parallelism == "fsdp"
local_rank, world_size, device = joined or distributed.init(machine, backend, fsdp)
ddp = dist.is_initialized() and not fsdp  # (FSDP alone has a process group too)
accum = distributed.per_rank(gradient_accumulation_steps, world_size)  # micro-steps per rank
device_type = "cuda" if device.startswith("cuda") else device
dtype = pick_dtype(dtype, device, log=log)
ctx = autocast_context(device, "float32" if fsdp else dtype)  # FSDP casts by itself (shard)
rng.seed_rngs(seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
allow_tf32()  # CUDA matmuls and convolutions in TF32

# -----------------------------------------------------------------------------------------------
# model: from the checkpoint being continued, from scratch, or from GPT-2's weights; the config
# follows its shape. fits() refuses a shape too big for the machine before anything is built
procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # training processes on this machine
fits = partial(check_fits, device=device, known=memory(device), shards=world_size if fsdp else 1,
               batch_size=batch_size, procs=procs, host_copy=async_save)
model, model_args = resume.build_model(ckpt, ckpt_path, config, data.vocab_size(), fsdp, fits)
config.update({k: model_args[k] for k in resume.SHAPE})  # the model's shape wins
globals().update({k: model_args[k] for k in resume.SHAPE})
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
# the run's own counters: iteration, best loss, tokens, run id, branch, resumes (keep/run.py)
run = run_state(ckpt, ckpt_path, config, tokens_per_iter, changed, log=log)
evaluate = Evaluator.build(config, data, model_args["vocab_size"], device, ctx)
log(f"device {device}, dtype {dtype}, world size {world_size}, "
    f"{model.get_num_params() / 1e6:.2f}M parameters, tokens per iteration {tokens_per_iter:,}")
if writes:  # out_dir is made only now: a start that fails on its config or model leaves nothing
    out_lock = lock.settle_in(out_dir, master, out_lock, run.run_id, remote, attempt, log)

if rank:
    rng.seed_rngs(seed + rank)  # dropout: each rank its own stream (rank 0 goes on with seed's)
model.to(device)
if fsdp:
    distributed.shard(model, dtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
resume.restore_training(ckpt, ckpt_path, model, optimizer, scaler, rank, world_size, fsdp, log)
ckpt = None  # free host memory before training
raw_model = model
if compile:
    log("compiling the model... (takes a minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
peak = peak_flops_for(device, dtype, peak_flops) if master else 1.0
flops_per_iter = raw_model.flops_per_token() * batch_size * accum * block_size  # per rank, for MFU


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:  # (cosine's end; also lr_decay_iters <= warmup_iters)
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------------------------
# the training loop. iter_num counts finished updates: a checkpoint taken after update k-1 holds
# iter_num=k, and a resumed run starts with update k, so none is run twice or skipped. At each
# iteration, before its update: evaluate if due, checkpoint if due (with the val loss just
# measured), then stop or train. metrics.jsonl and wandb are rank 0's; a resumed run marks the
# rows of the work it redoes as superseded, and continues the wandb run whose id is the run's id
metrics = MetricsLog.for_run(out_dir if master and writes else None, run, config, ckpt_path,
                             params=raw_model.get_num_params(), model_args=model_args,
                             world_size=world_size, tokens_per_iter=tokens_per_iter)
ck = Checkpointer.build(config, run, model_args, data, model=raw_model, optimizer=optimizer,
                        scaler=scaler, metrics=metrics, remote=remote, attempt=attempt,
                        lock=out_lock, device=device, rank=rank, resumed_from=ckpt_path, log=log)
dt, final_failed, lossf, rescued, step_times = 0.0, False, 0.0, None, []
run.started = time.time()
while True:
    # one all-reduce per iteration: a signal, time_limit or due checkpoint on any rank counts on all
    signalled, out_of_time, due, bad_loss, writing, gave_up, lost = distributed.any_rank([
        stopper.signum is not None, stopper.out_of_time(dt, ck.stop_seconds()),
        ck.due(run.iter_num), not math.isfinite(lossf), ck.writing(), ck.given_up(),
        ck.folder_lost()], device)
    ck.poll(folders_idle=not writing)  # announce (and retain after) a background write that ended
    if bad_loss:  # (at the update that gave it)
        ck.halt(run.iter_num - 1, "diverged", f"the training loss is {lossf}")
    if gave_up:  # saves keep failing (a full disk): a stop is seen, hours of unsaved training not
        ck.halt(run.iter_num, "saves_failed", "checkpoints keep failing")
    if lost and rescued is None:  # out_dir deleted or replaced (rm -rf): save elsewhere, then stop
        rescued = ck.rescue()
    stop, val_loss, it = signalled or out_of_time or lost, None, run.iter_num
    if not stop and evaluate.due(it, run):  # (not twice: an eval the checkpoint holds)
        scores = evaluate(it, model, raw_model, lambda: stopper.stopping(0.0, ck.stop_seconds()))
        if scores is None:  # abandoned: a signal or time_limit came during it
            stop = True
        elif (bad := evaluate.diverged(scores)) is not None:
            ck.halt(it, "diverged", f"the eval loss is {bad}")
        else:
            val_loss, run.scores = scores["val_loss"], scores
            run.last_eval = [it, val_loss]
            metrics.row("eval", it, tokens=run.tokens_at(it), lr=get_lr(it), **scores)
            log(evaluate.line(it, scores))
            better = val_loss < run.best_val_loss
            if not eval_only and it > 0 and (better or always_save_checkpoint):
                run.best_val_loss = min(run.best_val_loss, val_loss)
                ck.save(it, val_loss, best=True)
    if eval_only:
        break
    if stop:
        why = stopper.why(lost, dt, ck.stop_seconds())
        log(f"{why} at iteration {it}: " + ("exiting: nothing new to save" if it == run.start_iter
                                            else "saving a checkpoint, then exiting"))
        metrics.event(it, "stop", reason=why)
    final = stop or it >= max_iters
    if it > run.start_iter and (due or final):
        final_failed = not ck.save(it, val_loss, final=final) and final
    if final:
        break

    t0 = time.perf_counter()
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    # DDP averages gradients across ranks on the last micro-step only; FSDP reduce-scatters them at
    # every micro-step, so that they stay sharded (memory is why one picks FSDP)
    for micro_step in range(accum):
        if ddp:
            model.require_backward_grad_sync = micro_step == accum - 1
        X, Y = data.train_batch(seed, it, micro_step, batch_size, block_size, accum, rank,
                                world_size)
        X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
        with ctx:
            _, loss = model(X, Y)
            loss = loss / accum  # the mean over the whole global batch
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # the global norm, FSDP too
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    if dist.is_initialized():  # the loss logged is the global batch's mean: every rank's steps
        dist.all_reduce(loss_sum)
        loss_sum /= world_size
    lossf = loss_sum.item()  # also waits for the GPU, so dt is the real step time
    dt = time.perf_counter() - t0
    step_times.append(dt)

    if run.iter_num % log_interval == 0:
        mfu = flops_per_iter / dt / peak
        eta = humanize(median(step_times[-20:]) * (max_iters - run.iter_num))  # not one slow step
        # the row first: a line on the console means its row is in metrics.jsonl
        metrics.row("train", it, tokens=run.tokens_at(it + 1), loss=lossf, lr=lr, ms=dt * 1000,
                    tok_s=tokens_per_iter / dt, mfu=mfu)
        log(f"iter {it}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, "
            f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.2f}%, lr {lr:.2e}, eta {eta}")

signals = stopper.count
ck.close(interrupted=lambda: stopper.count > signals)  # a background write reaches the disk first
if step_times:
    log(speed_line(run.iter_num, step_times, run.started))
metrics.event(run.iter_num, "end", seconds=round(time.time() - run.started, 3))
model = None  # the DDP wrapper holds the process group: let it go before the group, not at shutdown
distributed.teardown()
stopped = stop and not final_failed and not rescued and stopper.count == signals  # as asked
problem = ck.rescued_line(out_dir, final_failed) if rescued else None
if stopped and run.iter_num > run.start_iter:
    log(f"checkpoint saved at iteration {run.iter_num}; the same command (or --init_from=resume) "
        f"continues the run")
elif stopped and stopper.name is None:  # time_limit: a requeued job would loop without progress
    problem = preemption.too_short(time_limit)
if problem and master:
    say(f"error: {problem}", err=True)
sys.exit(1 if final_failed or problem else stopper.exit_code if stopper.count > signals or stop
         else 0)
