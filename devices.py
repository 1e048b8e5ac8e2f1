"""
The machine a script runs on: which device and dtype (pick_device, pick_dtype), mixed precision
(autocast_context), how much memory there is (memory), the peak FLOP/s that MFU is measured
against (peak_flops_for), and out of memory as one line (one_line_out_of_memory). Shared by
train.py, sample.py and bench/.

Library code: a device that is not on this machine raises DeviceError, which a script turns into
one `error:` line and exit 1. Whether a device name is well formed is config validation, done by
configurator.py before any of this runs.
"""
import os
import sys
import time
from contextlib import nullcontext

import torch

from console import RunError, first_line, say


class DeviceError(RunError):
    """The device asked for is not on this machine (no CUDA GPU, no such GPU, no MPS)."""


def pick_device(device):
    """'auto' -> cuda > mps > cpu; anything else is taken as given (cuda:1, cpu, ...) once it is
    known to exist here."""
    if device != "auto":
        # a malformed name raises RuntimeError; configurator.py checks names first
        d = torch.device(device)
        if d.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device={device!r}: this project runs on cpu, cuda or mps")
        if d.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device={device!r} but no CUDA GPU is visible; use --device=cpu or "
                              "--device=auto")
        if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r} but this machine has {torch.cuda.device_count()} "
                              "CUDA GPU(s)")
        if d.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceError(f"device={device!r} but MPS is not available here; use --device=auto")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype, device, log=None):
    """'auto' -> bfloat16 on CUDA that has it, else float16 on CUDA, float32 elsewhere.
    bf16 autocast on a CPU without bf16 matrix units is many times slower than fp32 (bench.py
    --device=cpu --dtype=bfloat16 against --dtype=float32 shows it on yours): CPUs get fp32,
    and log (if given) warns of another dtype asked for on a CPU."""
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    dtype = names.get(dtype, dtype)
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    if log and device == "cpu" and dtype != "float32":
        log(f"warning: {dtype} on this CPU is much slower than float32 (no bf16/fp16 matrix "
            "units); use --dtype=float32 for speed")
    return dtype


def allow_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast_context(device, dtype):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype == "float32":
        return nullcontext()
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def memory(device):
    """(total, available) bytes of the device's memory, or None where it is not known (mps). On a
    CPU, available is the kernel's MemAvailable: what can be allocated before swapping or the OOM
    killer, which (memory being overcommitted) is how a too-big CPU job ends otherwise."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    if device != "cpu":
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: only the total is known
        available = total
    return total, available


def one_line_out_of_memory(advice="lower batch_size (raising gradient_accumulation_steps keeps the "
                                   "global batch), block_size or the model's size"):
    """Running out of memory anywhere (a batch or model too big for the device) ends the process
    with one error line and exit 1 instead of a traceback; checkpoints already written are intact.
    For scripts: it installs the process's excepthook."""
    previous = sys.excepthook

    def hook(kind, e, tb):
        if (isinstance(e, (torch.OutOfMemoryError, MemoryError))
                or "can't allocate memory" in str(e)):
            say(f"error: out of memory ({first_line(e)[:160]}); {advice}", err=True)
        else:
            previous(kind, e, tb)
    sys.excepthook = hook


# dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops_for(device, dtype, configured=0.0):
    """The FLOP/s MFU is measured against: the configured figure if set, a data-sheet peak for
    known GPUs, else (CPUs, unknown GPUs) a measured fp32 matmul rate, so MFU is never against
    a pretend A100."""
    if configured:
        return float(configured)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                # tf32 runs at about half the bf16 rate
                return peak if dtype != "float32" else peak / 2
    return measure_matmul_flops(device)


def measure_matmul_flops(device, n=1024, reps=5, rounds=5):
    """The device's fp32 matmul rate: the best of several short rounds, so that a moment of
    contention from another process does not pass for the peak (and MFU then for over 100%)."""
    # constant inputs: drawing random ones would move the global RNG and break exact resume
    a = torch.full((n, n), 0.5, device=device)
    b = torch.full((n, n), 0.25, device=device)
    for _ in range(2):
        a @ b  # warm up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best
