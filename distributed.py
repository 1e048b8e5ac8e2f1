"""torchrun setup (the process group, and a store that survives torchrun's own restarts), FSDP2
wrapping, and sharded checkpoints with torch.distributed.checkpoint (DCP).

torchrun --max-restarts restarts every worker when one dies. By default its agent shares one
TCPStore with the workers for the whole job, so a restarted group finds the dead group's keys
(addresses, NCCL ids) still there: gloo then dials a dead port and fails the restart, or hangs.
On one node we put each restart's keys under their own prefix (the restart count, which a single
agent keeps consistent); across nodes the agents' counts can differ, so there the fix is
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node (docs/preemption.md),
and a run without it is warned.

FSDP2 and DCP are imported in the functions that use them: importing them adds to every start of
every script (see python -X importtime), and only FSDP runs and checkpoint folders need them.
"""
import ctypes
import gc
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

import checkpoint
from atomicfile import TMP_TAG
from configurator import RunError, exit_now
from metrics import say


def under_torchrun():
    return "RANK" in os.environ


def init(device, backend, fsdp=False):
    """Join the process group torchrun set up. Returns (local_rank, world_size, device). FSDP needs a
    process group even alone (`python train.py --parallelism=fsdp`): a group of one, in memory."""
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not under_torchrun():
        if fsdp:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, device
    local_rank, world_size, rank = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
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


PEER_ENDED = re.compile(r"Connection (closed|reset) by peer|remote process exited|NCCL communicator was aborted")


def _quiet_when_a_peer_ends(rank):
    """A rank that stops with its one error line (a bad file, an unwritable out_dir) leaves the others
    in a collective, where torch raises: those ranks then exit 1 with one plain line (not `error:`,
    so a job's log holds one error line, the one that says why) instead of a traceback each."""
    previous = sys.excepthook

    def hook(kind, e, tb):
        if not (isinstance(e, RuntimeError) and PEER_ENDED.search(str(e))):
            return previous(kind, e, tb)
        err = sys.__stderr__ or sys.stderr
        err.write(f"rank {rank}: stopping, another rank ended (its error line says why)\n")  # one write
        exit_now(1, err)
    sys.excepthook = hook


def restart_store(rank, world_size):
    """The agent's store under this restart's prefix, or None to let torch make its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # no shared store (or TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): fresh each restart
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            say("warning: with --max-restarts on several nodes, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "on every node, or a restart may reuse the dead group's addresses and fail")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown():
    gc.collect()  # work objects still referenced by cycles go now, while the group is whole
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; tearing down gloo under it aborts the other ranks
        dist.destroy_process_group()


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
    """On a CPU, FSDP allocates and frees every block's gathered weights and gradients at every step.
    glibc raises its mmap threshold each time such a buffer is freed, so the next ones come from
    the heap, which does not shrink: a rank's RSS grew to about DDP's (docs/distributed.md). A fixed
    threshold (1 MB) keeps big buffers in mmap, returned to the OS when freed. glibc only."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def local(t):
    """This rank's part of a parameter (all of it, unsharded)."""
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor (FSDP's sharded parameter)


def param_names(model, optimizer):
    """Parameter names in the order of the optimizer's param groups (a tied weight: its first name)."""
    names = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model, optimizer):
    """The whole model and optimizer state dicts, gathered to rank 0's CPU in torch's single-file format
    (every rank takes part; the others get ({}, None)): ckpt.pt stays one file that sample.py reads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
    if dist.get_rank() != 0:
        return {}, None
    return model_sd, checkpoint.optimizer_by_id(optim_sd["state"], optim_sd["param_groups"])


def load_full(model, optimizer, optimizer_state):
    """A single file's optimizer state (every rank holds it whole) into a sharded optimizer. The file's
    weights went into the model before it was sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    named = checkpoint.optimizer_by_name(optimizer_state, param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _flat(model, optimizer):
    """The sharded tensors as DCP stores them: {'model.NAME': weight, 'optim.NAME.exp_avg': ...}, all
    tensors (DCP would pickle anything else), with a tied weight once; plus the aliases and the
    optimizer's param groups (names and hyperparameters), which go in state.pt."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat, seen, aliases = {}, {}, {}
    for name, t in model_sd.items():
        where = (local(t).data_ptr(), tuple(t.shape))  # a tied weight: two names, one storage
        if where in seen:
            aliases[name] = seen[where]
        else:
            seen[where] = name
            flat[f"model.{name}"] = t
    for name, stats in optim_sd["state"].items():
        for stat, t in stats.items():
            flat[f"optim.{name}.{stat}"] = t
    return flat, aliases, model_sd, optim_sd


def load_sharded(folder, model, optimizer):
    """Each rank reads its share of a checkpoint folder, whatever world size wrote it (DCP reshards).
    The flat dict's tensors are the state dicts' own, so DCP's in-place load fills both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.api import CheckpointException
    flat, _, model_sd, optim_sd = _flat(model, optimizer)
    try:  # DCP gathers every rank's failure and raises it on all of them: one line each, the same
        dcp.load(flat, checkpoint_id=folder)
    except (Exception, CheckpointException) as e:  # (DCP's is a BaseException)
        raise checkpoint.CheckpointError(f"could not read {folder} ({_why(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


class ShardedSaver:
    """Checkpoint folders under FSDP: every rank writes its own shard at once (DCP), then the folder is
    committed (checkpoint.commit_folder) when all of them have finished. With background=True the
    tensors are first copied to host memory (DCP's staging: the only stall) and a thread writes them
    while training goes on; the Checkpointer asks busy() once per iteration, OR-ed over ranks, and
    calls finish() when no rank is writing any more. At most one save is in flight.

    DCP's process-based writer is not used: it starts its process with multiprocessing's 'spawn',
    which runs the main script again, and train.py is a script, as nanoGPT's is."""

    def __init__(self, device):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        self.group = dist.new_group(backend="gloo")  # the writer's collectives stay off the training group
        # background saves copy the shard into host buffers kept from one save to the next (pinned
        # on a GPU, for fast copies): the memory of one more copy of this rank's share of the state
        options = StagingOptions(use_pinned_memory=device.startswith("cuda"), use_shared_memory=False,
                                 use_async_staging=False, use_non_blocking_copy=False)
        self.new_stager = lambda: DefaultStager(options)
        self.stager = self.new_stager()
        self.pool = ThreadPoolExecutor(1)
        self.pending = None
        self.tag = [os.getpid()]
        dist.broadcast_object_list(self.tag, src=0, group=self.group)  # one temp name for all ranks

    def save(self, plain, path, model, optimizer, background=False):
        """Every rank calls this, with nothing in flight. In the foreground it returns once the folder
        is committed; in the background once the shard is staged, and finish() commits it. A failure
        on any rank (the state, the staging copy, the write, the commit) raises CheckpointError on
        every rank: the ranks agree before each step that waits for all of them."""
        import torch.distributed.checkpoint as dcp
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_TAG}{self.tag[0]}")
        why = None
        try:
            flat, aliases, _, optim_sd = _flat(model, optimizer)
            plain = dict(plain, aliases=aliases, optimizer_groups=optim_sd["param_groups"])
            if background:  # host copies (the only stall), which training cannot change under the write
                flat = self.stager.stage(flat)
        except Exception as e:  # out of host memory on this rank alone: the others must not wait in DCP for it
            why = _why(e)
            if background:  # the buffers the failed copy took go back to training
                self.stager.close()
                self.stager = self.new_stager()
        self._agree(why, tmp, path)
        write = lambda: dcp.save(flat, checkpoint_id=tmp, process_group=self.group)  # noqa: E731
        if background:
            self.pending = (self.pool.submit(self._written, write, tmp), tmp, path, plain)
        else:
            self._commit(self._written(write, tmp), tmp, path, plain)

    def busy(self):
        return self.pending is not None and not self.pending[0].done()

    def finish(self):
        """Commit the save in flight, waiting for its writes if need be. Every rank calls it at once;
        raises CheckpointError on every rank if the write failed on any rank."""
        if self.pending is not None:
            task, *rest = self.pending
            self.pending = None
            self._commit(task.result(), *rest)

    @staticmethod
    def _written(write, tmp):
        """Run the DCP write; then the size and CRC-32 of the files this rank wrote (its shard; rank 0
        also DCP's .metadata), or one line saying why the write failed."""
        from torch.distributed.checkpoint.api import CheckpointException
        try:
            write()
            rank = dist.get_rank()
            mine = [n for n in os.listdir(tmp) if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata")]
            return {n: checkpoint.crc32(os.path.join(tmp, n)) for n in mine}
        except (Exception, CheckpointException) as e:  # (DCP's is a BaseException)
            return _why(e)

    def _agree(self, mine, tmp, path):
        """Every rank's outcome (a str says why it failed) gathered: if any rank failed, every rank
        raises CheckpointError with the first one's line (rank 0 removes the temp folder)."""
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=self.group)
        failed = [e for e in every if isinstance(e, str)]
        if failed:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint.CheckpointError(f"could not write {path} ({failed[0].splitlines()[0][:200]})")
        return every

    def _commit(self, files, tmp, path, plain):
        """files: this rank's {name: [size, crc]}, or why its write failed. Rank 0 commits the folder,
        and every rank learns how that went."""
        every = self._agree(files, tmp, path)
        why = None
        if dist.get_rank() == 0:
            try:
                checkpoint.commit_folder(tmp, path, plain, {n: c for f in every for n, c in f.items()})
            except checkpoint.CheckpointError as e:
                why = str(e)
        why = from_rank0(why, self.group)
        if why:
            raise checkpoint.CheckpointError(why)


def _why(e):
    """A failed folder write as one line: the rank and its OS error (DCP gathers every rank's)."""
    from torch.distributed.checkpoint.api import CheckpointException
    if isinstance(e, CheckpointException) and e.failures:
        r = min(e.failures)
        return f"rank {r}: {checkpoint.os_error(e.failures[r][0])}"
    return f"rank {dist.get_rank()}: {checkpoint.os_error(e)}"


def any_rank(flags, device):
    """The flags OR-ed over all ranks (one small all-reduce), so that every rank takes the same branch."""
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
