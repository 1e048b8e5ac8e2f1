"""
Train a GPT, on one CPU or GPU or on many GPUs and nodes with DDP or FSDP2.

    python train.py config/train_shakespeare_char.py               # one process
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 train.py config/finetune_shakespeare.py --parallelism=fsdp
    python train.py --init_from=resume --out_dir=out-shakespeare-char   # carry on where it stopped

The globals below are the config: config files and --key=value flags override them (configurator.py).
A run checkpoints every checkpoint_interval iterations, on SIGTERM/SIGINT and at the end. An out_dir
that holds a good checkpoint is always continued, with the config stored in it, so the same command
run again carries on exactly where the run was (see docs/checkpoints.md).
"""
import math
import os
import sys
import time

from configurator import check, check_data, check_fits, config_keys, configure
from console import console, fail, one_line_errors, say
from keep import preemption
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
init_from = "scratch"  # 'scratch', 'resume', or GPT-2 weights: 'gpt2', 'gpt2-medium', ..., or a local HF folder
# checkpoints
checkpoint_interval = 1000  # periodic checkpoint every N iterations (0: only on signals and at the end)
keep_last = 3  # periodic checkpoints kept; older ones are deleted once a newer one is safely on disk
keep_every = 0  # also keep every checkpoint whose iteration is a multiple of this, forever (0: none)
resume_from = ""  # resume from this file rather than the newest good one in out_dir (implies init_from='resume')
async_save = False  # a background thread writes checkpoints; training stalls only to copy the state
checkpoint_minutes = 0.0  # also checkpoint when this many minutes passed since the last one (0: off)
time_limit = ""  # this process's wall-clock budget ('3:50:00', '90m', seconds): checkpoint and exit 0 in time
# the remote copy (docs/remote.md); like out_dir, part of the command, never restored
remote_dir = ""  # a durable copy of every checkpoint: an fsspec URL (s3://bucket/run, gs://..., file:///mnt/disk/run)
remote_wait = 60.0  # seconds the end of a run (a stop signal, time_limit) waits for the copy in flight to remote_dir
remote_lease = 120.0  # seconds without a refresh after which a lost machine's hold on remote_dir lapses
# wandb logging (out_dir/metrics.jsonl is always written; plot.py draws it)
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"
gradient_accumulation_steps = 5 * 8  # in total over all ranks: the global batch does not change with world size
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
dtype = "auto"  # 'auto' (bf16 on CUDA that has it, else fp16; fp32 on CPU), 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the model
parallelism = "ddp"  # 'ddp': a whole model per GPU; 'fsdp': weights, gradients and AdamW sharded across GPUs (FSDP2)
seed = 1337
peak_flops = 0.0  # FLOP/s that MFU is measured against; 0: data-sheet peak for known GPUs, else measured
# -----------------------------------------------------------------------------------------------
keys = config_keys(globals())
sources = configure(globals())  # {key: the config file or --flag that set it}; defaults are absent; values checked
# -----------------------------------------------------------------------------------------------
# torch and what uses it (seconds to import) only now: a wrong flag or config file is refused at once
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import distributed  # noqa: E402
from keep import files, lock, resume, rng, saver, store, uploader  # noqa: E402
from keep import remote as remote_copy  # noqa: E402
from keep.folders import ShardedSaver, read_shards  # noqa: E402
from dataset import TokenData  # noqa: E402
from devices import memory, autocast_context, one_line_out_of_memory, peak_flops_for, pick_device, pick_dtype  # noqa: E402
from gpt2 import load_gpt2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

one_line_out_of_memory()  # a batch or model too big for the device: one error line, not a traceback
one_line_errors()  # a library's UsageError (exit 2) or RunError (exit 1, bad files, machine, run): one line
time_budget = preemption.parse_duration(time_limit)
if wandb_log and not has_wandb():
    raise SystemExit("error: wandb_log=True needs the wandb package: pip install wandb")

rank = int(os.environ.get("RANK", 0))  # torchrun sets RANK; a plain `python train.py` is a world of one
master = rank == 0
log = say if master else (lambda *a, **k: None)  # a dead pipe or closed terminal never stops a run
if master and not eval_only:  # the console's lines also go to out_dir/console.log, once the run holds out_dir
    console.keep()


# under torchrun the process group comes first, so that no rank reads a checkpoint before rank 0
# holds out_dir's lock: a second trainer into a busy out_dir is refused before it opens any file
machine = pick_device(device)  # (`device` itself stays the knob's value, stored in the config)
joined = distributed.init(machine, backend) if distributed.under_torchrun() else None
# remote_dir is tried now (every kind of call it will get, on a probe object): a wrong bucket,
# credentials or endpoint is one error line in seconds, not a failed upload hours in. A newer
# checkpoint there than in out_dir (a new machine: out_dir empty) is downloaded into out_dir once it
# is held. One live run writes to a remote_dir: rank 0 takes its lease (remote.py) with this start's
# token, which every rank shares
# eval_only only reads: it claims nothing, takes no lease and writes nothing in out_dir, so it can
# score a checkpoint of a live run, and never changes its history (metrics.jsonl included)
writes = not eval_only
attempt = distributed.from_rank0(files.new_run_id() if master else None) if remote_dir and writes else None
remote = distributed.on_rank0(lambda: remote_copy.connect(remote_dir, out_dir, attempt, remote_lease),
                              master) if remote_dir and writes else None
out_lock = lock.claim_on_every_rank(out_dir, master, remote=remote) if writes else None

# start or continue. An out_dir that holds a good checkpoint is always continued, whatever init_from
# says, so the same command run twice (a re-queued job, `make demo` again) carries on instead of
# starting over; the run's stored config comes back, with config files and flags on top.
init_from = resume.start_mode(init_from, resume_from, sources)
# rank 0 alone picks the checkpoint (or the error), the others read that very file: ranks that chose on
# their own could start from different iterations (a read error on one of them, a stale listing)
ckpt_path, ckpt = distributed.on_rank0(lambda: resume.find_start(out_dir, init_from, resume_from, log=log,
                                                                 tensors=False), master) or (None, None)
ckpt_path = distributed.from_rank0(ckpt_path)
ckpt = distributed.on_every_rank(lambda: ckpt if master or not ckpt_path else store.load(ckpt_path, tensors=False))
changed = resume.restore_config(globals(), ckpt, sources, keys, explicit=init_from == "resume", log=log) if ckpt else {}
check({k: globals()[k] for k in keys})  # again: a stored config comes from a file, maybe an old or foreign one
data = TokenData(dataset)
check_data(block_size, data.tokens(), dataset)
vocab_size = data.vocab_size()
if ckpt is not None:
    resume.check_compatible(ckpt, data, vocab_size, log=log)
data_record = dict(tokenizer=data.tokenizer(), data_fingerprint=data.fingerprint())  # a checkpoint samples alone
if ckpt and ckpt["iter_num"] >= max_iters and not eval_only:
    log(f"the run is complete: iteration {ckpt['iter_num']} of max_iters={max_iters} ({ckpt_path}); "
        f"raise --max_iters to train longer")
    if remote is not None:  # what a kill kept from remote_dir goes there now
        meta = ckpt.get("metadata") or {}
        uploader.catch_up(remote, out_dir, run_id=meta.get("run_id"), branch=meta.get("branch", 0),
                             attempt=attempt, keep_last=keep_last, keep_every=keep_every, wait=remote_wait, log=log)
    sys.exit(0)
config = {k: globals()[k] for k in keys}  # plain values, stored in every checkpoint
stopper = preemption.Stopper(time_budget)  # from here on a signal means "save, then exit"

# distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Under FSDP the periodic checkpoints are
# folders, every rank writing its shard (distributed.ShardedSaver); ckpt.pt stays one file
fsdp = parallelism == "fsdp"
local_rank, world_size, device = joined or distributed.init(machine, backend, fsdp)
grouped = dist.is_initialized()  # ranks that must agree (torchrun, or FSDP alone)
ddp = grouped and not fsdp
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the world size {world_size}")
accum = gradient_accumulation_steps // world_size  # micro-steps per rank
procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # training processes on this machine, sharing its memory
device_type = "cuda" if device.startswith("cuda") else device
dtype = pick_dtype(dtype, device, log=log)
ctx = autocast_context(device, "float32" if fsdp else dtype)  # FSDP casts by itself (distributed.shard)
rng.seed_rngs(seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------------------------
# model: from the checkpoint being continued, from scratch, or from GPT-2 weights
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=vocab_size or 50304, dropout=dropout)
iter_num, best_val_loss, train_seconds, last_eval, tokens_before = 0, float("inf"), 0.0, None, 0
# the run's identity: its id, its branch (a resume by hand from an older file starts a new one, see
# resume.branch_for) and each resume, recorded in every checkpoint's metadata
run_id, branch, resumes, origin = files.new_run_id(), 0, [], init_from
if ckpt is not None:
    model_args.update({k: ckpt["model_args"][k] for k in files.MODEL_ARGS if k in ckpt["model_args"]})
    model_args["dropout"] = dropout  # the run's own, or a new one set on resume (e.g. to fine-tune)
    check_fits(model_args, device, memory(device), world_size if fsdp else 1, batch_size, procs, async_save)
    model = GPT(GPTConfig(**model_args))
    if "model" not in ckpt and not fsdp:  # a checkpoint folder, resumed without FSDP: read it whole
        ckpt["model"], ckpt["optimizer"] = read_shards(ckpt_path, ckpt)
    if "model" in ckpt:  # a folder under FSDP: each rank reads its share once sharded, below
        model.load_state_dict(ckpt["model"])
    globals().update(resume.lineage(ckpt, ckpt_path, out_dir, bool(resume_from), changed, log=log))
    run_id = run_id or files.new_run_id()  # (nanoGPT's files have none)
elif init_from == "scratch":
    check_fits(model_args, device, memory(device), world_size if fsdp else 1, batch_size, procs, async_save)
    model = GPT(GPTConfig(**model_args))
else:  # GPT-2 weights: 'gpt2', ..., 'gpt2-xl' or a local Hugging Face folder; the shape is theirs
    log(f"loading GPT-2 weights {init_from}...")
    model = load_gpt2(init_from, dropout=dropout)
    model_args.update({k: getattr(model.config, k) for k in files.MODEL_ARGS})
if block_size < model.config.block_size:
    model.crop_block_size(block_size)  # e.g. GPT-2's 1024 context cut to 256 for fine-tuning
    model_args["block_size"] = block_size
# the model's shape comes from the checkpoint or GPT-2 when there is one: the config follows it
n_layer, n_head, n_embd, block_size, bias = (model_args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias"))
config.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if tokens_before is None:  # a file without the count (nanoGPT's): as if the batch never changed
    tokens_before = iter_num * tokens_per_iter
log(f"device {device}, dtype {dtype}, world size {world_size}, {model.get_num_params() / 1e6:.2f}M parameters, "
    f"tokens per iteration {tokens_per_iter:,}")
# a new out_dir is made only now, so that a start that fails on its config, data or model leaves
# nothing behind; and an unwritable one is found before training, not at the first save hours later
if remote_dir and writes:  # the lease names this run now (a new run had no id when out_dir was claimed)
    distributed.on_rank0(lambda: remote.take_lease(run_id, attempt, remote_lease, log=log), master)
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


def tokens_at(it):
    """Tokens trained on before update `it` (counted across batch-size changes, see tokens_before)."""
    return tokens_before + (it - start_iter) * tokens_per_iter


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches per split, shared out between ranks. None if a stop
    (signal or time_limit) comes meanwhile: the eval is abandoned so the checkpoint comes quickly."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters, device=device)
        for j in range(math.ceil(eval_iters / world_size)):  # as many rounds on every rank
            if distributed.any_rank([stopper.signum is not None or stopper.out_of_time(0.0, ck.stop_seconds())], device)[0]:
                model.train()
                return None
            k = j * world_size + rank
            # past eval_iters a rank still runs a batch (and drops it): FSDP's ranks must all run forward
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


def checkpoint_state(val_loss):
    """The plain part of a checkpoint at iter_num (the Checkpointer adds the tensors), from every rank
    (RNG states are gathered). val_loss: measured at this very iteration, else None (metadata never
    carries an older eval's loss as this one's). A diverged model is never checkpointed."""
    finite = torch.stack([distributed.local(p).isfinite().all() for p in raw_model.parameters()]).all()
    if distributed.any_rank([not finite], device)[0]:  # (each rank sees only its own shard under FSDP)
        diverged("the model's weights are not finite (nan or inf)", iter_num)
    rngs = distributed.every_rank(rng.capture_rng())
    return dict(
        model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss, config=config,
        scaler=scaler.state_dict(), rng=rngs, format_version=files.FORMAT_VERSION, **data_record,
        metadata=dict(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch_version=str(torch.__version__),
                      world_size=world_size, tokens_seen=tokens_at(iter_num),
                      train_seconds=train_seconds + time.time() - t_start, val_loss=val_loss, last_eval=last_eval,
                      git_commit=git_commit, init_from=origin, dataset=dataset,
                      run_id=run_id, branch=branch, resumes=resumes))


def diverged(what, it):
    """A diverged model is never checkpointed, so every file on disk is from before the divergence."""
    fix = "lower --learning_rate (or raise --warmup_iters)"
    halt(it, "diverged", what, f"{what} at iteration {it}: training diverged. " +
         (f"No checkpoint of it was written, so the newest one on disk is from before; {fix} and run again to "
          f"continue from it" if ck.known or ckpt_path else f"Nothing was saved; {fix} and start again"))


def halt(it, event, reason, line):
    """Stop every rank (each takes the same decision) with rank 0's one error line, exit 1."""
    ck.close()  # what is in flight reaches the disk
    metrics.event(it, event, reason=reason)
    if master:
        say(f"error: {line}", err=True)
    distributed.teardown()
    sys.exit(1)


# -----------------------------------------------------------------------------------------------
# the training loop. iter_num counts finished updates: a checkpoint taken after update k-1 holds
# iter_num=k, and a resumed run starts with update k, so none is run twice or skipped. At each
# iteration, before its update: evaluate if due, checkpoint if due (with the val loss just
# measured), then stop or train.
git_commit = saver.git_commit() if master else None
start_iter = iter_num
t_start = time.time()
step_times = []
# metrics.jsonl and wandb, written by rank 0 only. A resumed run marks the rows of the work it redoes as
# superseded, so that the file reads as one run; the wandb run's id is the run's own id (kept in
# every checkpoint), so a resumed run continues the same wandb run
metrics = MetricsLog(out_dir if master and writes else None, tokens_at, resumed_at=start_iter if ckpt_path else None,
                     wandb=dict(project=wandb_project, name=wandb_run_name, config=config, id=run_id) if wandb_log else None)
metrics.event(start_iter, "start", params=raw_model.get_num_params(), model_args=model_args, init_from=origin,
              dataset=dataset, world_size=world_size, tokens_per_iter=tokens_per_iter, max_iters=max_iters)
if ckpt_path:
    metrics.event(start_iter, "resume", path=ckpt_path, branch=branch)
# every save of the run, on every rank: what is due, the writers, retention, announcements, failures
ck = saver.Checkpointer(out_dir, run_id=run_id, branch=branch, keep_last=keep_last, keep_every=keep_every,
                               interval=checkpoint_interval, minutes=checkpoint_minutes, background=async_save,
                               model=raw_model, optimizer=optimizer, metrics=metrics, log=log, master=master,
                               shards=ShardedSaver(device) if fsdp else None,
                               resumed_from=ckpt_path, remote_wait=remote_wait, lock=out_lock,
                               remote=uploader.Uploader(remote or remote_copy.Remote(remote_dir), out_dir, run_id=run_id,
                                                           branch=branch, keep_last=keep_last, keep_every=keep_every,
                                                           attempt=attempt, rank=rank,
                                                           log=log) if remote_dir and writes and (master or fsdp) else None)
dt, final_failed, lossf, rescued = 0.0, False, 0.0, None
while True:
    # one all-reduce per iteration: a signal, time_limit or due checkpoint on any rank counts on every rank
    signalled, out_of_time, due, bad_loss, writing, gave_up, lost = distributed.any_rank([
        stopper.signum is not None, stopper.out_of_time(dt, ck.stop_seconds()), ck.due(iter_num),
        not math.isfinite(lossf), ck.writing(), ck.given_up(), ck.folder_lost()], device)
    ck.poll(folders_idle=not writing)  # announce (and retain after) a background write that has ended
    if bad_loss:
        diverged(f"the training loss is {lossf}", iter_num - 1)  # the update that gave it
    if gave_up:  # saves keep failing (a full disk): a stop is seen, hours of unsaved training are not
        halt(iter_num, "saves_failed", "checkpoints keep failing", ck.give_up(iter_num) if master else "")
    if lost and rescued is None:  # out_dir deleted or replaced (rm -rf): save elsewhere, then stop
        rescued = ck.rescue()
    stop = signalled or out_of_time or lost
    val_loss = None
    evaluated = last_eval is not None and last_eval[0] == iter_num and not eval_only  # the checkpoint has it
    if not stop and not evaluated and (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only):
        losses = estimate_loss()
        if losses is None:  # abandoned: a signal or time_limit came during it
            stop = True
        elif not all(map(math.isfinite, losses.values())):
            diverged(f"the eval loss is {losses['val'] if not math.isfinite(losses['val']) else losses['train']}", iter_num)
        else:
            val_loss, last_eval = losses["val"], [iter_num, losses["val"]]
            metrics.row("eval", iter_num, tokens=tokens_at(iter_num), train_loss=losses["train"], val_loss=val_loss,
                        lr=get_lr(iter_num) if decay_lr else learning_rate)
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}")
            if not eval_only and iter_num > 0 and (val_loss < best_val_loss or always_save_checkpoint):
                best_val_loss = min(best_val_loss, val_loss)
                ck.save(checkpoint_state(val_loss), iter_num, val_loss, best=True)
    if eval_only:
        break
    if stop:
        why = f"{stopper.name} received" if stopper.name else "out_dir was deleted or replaced" if lost else \
            "time_limit nearly reached" if stopper.out_of_time(dt, ck.stop_seconds()) else "another rank is stopping"
        log(f"{why} at iteration {iter_num}: " + ("saving a checkpoint, then exiting" if iter_num > start_iter
                                                  else "exiting: nothing new to save"))  # (no update since the start)
        metrics.event(iter_num, "stop", reason=why)
    final = stop or iter_num >= max_iters
    if iter_num > start_iter and (due or final):
        final_failed = not ck.save(checkpoint_state(val_loss), iter_num, val_loss, final=final) and final
    if final:
        break

    t0 = time.perf_counter()
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    # DDP averages gradients across ranks on the last micro-step only; FSDP reduce-scatters them at
    # every micro-step, so that they stay sharded (memory is why one picks FSDP)
    for micro_step in range(accum):
        if ddp:
            model.require_backward_grad_sync = micro_step == accum - 1
        X, Y = data.train_batch(seed, iter_num, micro_step, batch_size, block_size, accum, rank, world_size)
        X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
        with ctx:
            _, loss = model(X, Y)
            loss = loss / accum  # the mean over the whole global batch
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # the global norm, also over FSDP's shards
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if grouped:  # the loss logged is the mean over the whole global batch: every rank's micro-steps
        dist.all_reduce(loss_sum)
        loss_sum /= world_size
    lossf = loss_sum.item()  # also waits for the GPU, so dt is the real step time
    dt = time.perf_counter() - t0
    step_times.append(dt)

    if iter_num % log_interval == 0:
        mfu = flops_per_iter / dt / peak
        recent = sorted(step_times[-20:])[len(step_times[-20:]) // 2]  # the median resists a slow step
        # the row first: a line on the console means its row is in metrics.jsonl
        metrics.row("train", iter_num - 1, tokens=tokens_at(iter_num), loss=lossf, lr=lr, ms=dt * 1000,
                    tok_s=tokens_per_iter / dt, mfu=mfu)
        log(f"iter {iter_num - 1}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tokens_per_iter / dt:,.0f} tok/s, "
            f"mfu {mfu * 100:.2f}%, lr {lr:.2e}, eta {humanize(recent * (max_iters - iter_num))}")

signals = stopper.count
ck.close(interrupted=lambda: stopper.count > signals)  # a background write reaches the disk before the process ends
if step_times:
    steady = sorted(step_times[min(10, len(step_times) // 2):])  # past the warm-up steps
    log(f"done at iteration {iter_num}: median {steady[len(steady) // 2] * 1000:.2f} ms/iter, "
        f"{time.time() - t_start:.1f}s wall")
metrics.event(iter_num, "end", seconds=round(time.time() - t_start, 3))
model = None  # the DDP wrapper holds the process group: let it go before the group, not in interpreter shutdown
distributed.teardown()
if rescued and master:
    say(f"error: out_dir {out_dir} was deleted or replaced while this run trained (rm -rf, or another process); "
        + (f"its state at iteration {iter_num} is in {rescued}: continue it with --out_dir={rescued}"
           if not final_failed else f"its state could not be saved in {rescued} either"), err=True)
if final_failed or rescued:
    sys.exit(1)
if stopper.count > signals:  # a stop signal cut the wait for the copy short
    sys.exit(stopper.exit_code)
if stop:
    if iter_num > start_iter:
        log(f"checkpoint saved at iteration {iter_num}; the same command (or --init_from=resume) continues the run")
    else:  # (the stop line said "nothing new to save")
        if stopper.name is None:  # time_limit: a job that requeues itself would loop without progress
            say(f"error: time_limit={time_limit!r} leaves no time for one iteration and a checkpoint; raise it", err=True)
            sys.exit(1)
    sys.exit(stopper.exit_code)
