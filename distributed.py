"""torchrun setup (the process group, and a store that survives torchrun's own restarts), FSDP2
wrapping, and what every rank must agree on (any_rank, from_rank0, on_rank0). Sharded checkpoint
folders (DCP) are keep/folders.py's.

torchrun --max-restarts restarts every worker when one dies. By default its agent shares one
TCPStore with the workers for the whole job, so a restarted group finds the dead group's keys
(addresses, NCCL ids) still there: gloo then dials a dead port and fails the restart, or hangs.
On one node we put each restart's keys under their own prefix (the restart count, which a single
agent keeps consistent); across nodes the agents' counts can differ, so there the fix is
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node (docs/preemption.md),
and a run without it is warned.

FSDP2 is imported in the function that uses it: importing it adds to every start of every script
(see python -X importtime), and only FSDP runs need it.
"""
import ctypes
import gc
import os
import re
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from console import RunError, UsageError, exit_now, say


def under_torchrun():
    return "RANK" in os.environ


def init(device, backend, fsdp=False):
    """Join the process group torchrun set up. Returns (local_rank, world_size, device). FSDP needs
    a process group even alone (`python train.py --parallelism=fsdp`): a group of one, in memory."""
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not under_torchrun():
        if fsdp:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, device
    local_rank, world_size, rank = (int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]),
                                    int(os.environ["RANK"]))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    store = restart_store(rank, world_size)
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    _quiet_when_a_peer_ends(rank)
    return local_rank, world_size, device


PEER_ENDED = re.compile(r"Connection (closed|reset) by peer|remote process exited|NCCL "
                        r"communicator was aborted")


def _quiet_when_a_peer_ends(rank):
    """A rank that stops with its one error line (a bad file, an unwritable out_dir) leaves the
    others in a collective, where torch raises: those ranks then exit 1 with one plain line (not
    `error:`, so a job's log holds one error line, the one that says why) instead of a traceback
    each."""
    previous = sys.excepthook

    def hook(kind, e, tb):
        if not (isinstance(e, RuntimeError) and PEER_ENDED.search(str(e))):
            return previous(kind, e, tb)
        err = sys.__stderr__ or sys.stderr
        # one write
        err.write(f"rank {rank}: stopping, another rank ended (its error line says why)\n")
        exit_now(1, err)
    sys.excepthook = hook


def restart_store(rank, world_size):
    """The agent's store under this restart's prefix, or None to let torch make its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # no shared store (or TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): fresh each restart
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            say("warning: with --max-restarts on several nodes, set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node, or a restart may reuse the "
                "dead group's addresses and fail")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(exit_code=None):
    """The process group let go of, on every rank together; then exit with exit_code, if given
    (an exit with the group up destroys gloo's threads under it: SIGABRT at random)."""
    gc.collect()  # work objects still referenced by cycles go now, while the group is whole
    if dist.is_initialized():
        # rank 0 may still be writing; tearing down gloo under it aborts the other ranks
        dist.barrier()
        dist.destroy_process_group()
    if exit_code is not None:
        sys.exit(exit_code)


# ---------------------------------------------------------------------------------------------
# FSDP2

def shard(model, dtype):
    """FSDP2 in place: each transformer block is one unit (its weights are gathered just before it
    runs and freed after), the root holds the rest, so the tied wte/lm_head weight stays one
    parameter. Parameters, gradients and AdamW state are sharded across ranks. Mixed precision is
    FSDP's own: bf16 weights for compute, fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if next(model.parameters()).device.type == "cpu":
        steady_heap()
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32) \
        if dtype != "float32" else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def steady_heap():
    """On a CPU, FSDP allocates and frees every block's gathered weights and gradients at every
    step. glibc raises its mmap threshold each time such a buffer is freed, so the next ones come
    from the heap, which does not shrink: a rank's RSS grew to about DDP's (docs/distributed.md). A
    fixed threshold (1 MB) keeps big buffers in mmap, returned to the OS when freed. glibc only."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def local(t):
    """This rank's part of a parameter (all of it, unsharded)."""
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor (FSDP's sharded parameter)


def any_rank(flags, device):
    """The flags OR-ed over all ranks (one small all-reduce), so that every rank takes the same
    branch."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def every_rank(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a world of one: [obj])."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def from_rank0(obj, group=None):
    """Rank 0's obj on every rank (a world of one: obj)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def on_rank0(fn, master):
    """fn() on rank 0, and every rank learns whether it raised a RunError (a busy out_dir, a wrong
    remote_dir), so that all stop together rather than die in a collective: rank 0 raises it, the
    others exit 1 quietly. Returns fn's result on rank 0, None elsewhere."""
    return on_every_rank(fn if master else lambda: None)


def on_every_rank(fn):
    """fn() on every rank, and every rank learns whether it raised a RunError on any rank: the first
    rank that did raises it (its one line), the others exit 1 quietly. Returns fn's result."""
    problem, result = None, None
    try:
        result = fn()
    except RunError as e:
        problem = e
    failed = [r for r, p in enumerate(every_rank(str(problem) if problem else None)) if p]
    if failed:
        if failed[0] == (dist.get_rank() if dist.is_initialized() else 0):
            raise problem
        raise SystemExit(1)
    return result


def world():
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def per_rank(accumulation_steps, world_size):
    """Micro-steps per rank: the global batch does not change with the number of ranks."""
    if accumulation_steps % world_size:
        raise UsageError(f"gradient_accumulation_steps={accumulation_steps} must be a multiple "
                         f"of the world size {world_size}")
    return accumulation_steps // world_size
