"""torchrun setup: the process group, and a store that survives torchrun's own restarts.

torchrun --max-restarts restarts every worker when one dies. By default its agent shares one
TCPStore with the workers for the whole job, so a restarted group finds the dead group's keys
(addresses, NCCL ids) still there: gloo then dials a dead port and fails the restart, or hangs.
On one node we put each restart's keys under their own prefix (the restart count, which a single
agent keeps consistent); across nodes the agents' counts can differ, so there the fix is
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node (README, "Preemptible and scheduled jobs"),
and a run without it is warned.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from metrics import say


def under_torchrun():
    return "RANK" in os.environ


def init(device, backend):
    """Join the process group torchrun set up. Returns (local_rank, world_size, device)."""
    if not under_torchrun():
        return 0, 1, device
    local_rank, world_size, rank = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    store = restart_store(rank, world_size)
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return local_rank, world_size, device


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
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; tearing down gloo under it aborts the other ranks
        dist.destroy_process_group()
