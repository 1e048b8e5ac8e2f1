"""
The machine a script runs on: which device and dtype (pick_device, pick_dtype), mixed precision
(autocast_context), how much memory there is (memory) and whether a training fits in it
(check_fits: said before anything is built), the peak FLOP/s that MFU is measured against
(peak_flops_for), and out of memory as one line (one_line_out_of_memory). Shared by train.py,
sample.py, eval.py and bench/.

Library code: a device that is not on this machine raises DeviceError, which a script turns into
one `error:` line and exit 1. Whether a device name is well formed is config validation, done by
configurator.py before any of this runs.
"""
import os
import sys
import time
from contextlib import nullcontext

import torch

from console import RunError, fail, first_line, say


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


def check_fits(model_args, device, known, shards=1, batch_size=0, procs=1, host_copy=False):
    """Training that cannot fit in the device's memory, said before anything is built or written.
    A training state (fp32 weights, gradients and AdamW's two moments: 16 bytes per parameter, split
    `shards` ways under FSDP) larger than the device's whole memory can never train. On a CPU the
    state plus one micro-batch's activations (batch_size rows of block_size, forward and backward;
    0: not checked) must also fit in the memory available now, for `procs` training processes on
    this host: Linux overcommits memory, so a too-big batch does not fail an allocation, the OOM
    killer ends it minutes later without a word. (A GPU's allocation fails at once, and
    one_line_out_of_memory makes that one line.) host_copy: background checkpoints keep a
    copy of the weights and AdamW's moments in host memory (12 bytes per parameter). known: the
    device's (total, available) memory in bytes (memory()), or None when it cannot be told."""
    d, L, V, T = (model_args["n_embd"], model_args["n_layer"], model_args["vocab_size"],
                  model_args["block_size"])
    params = n_params(model_args)
    if known is None:
        return
    total, available = known
    state = 16 * params / shards
    if state > total:
        fail(f"n_layer={L}, n_embd={d}, block_size={T}, vocab {V}: {params / 1e9:.1f}B parameters "
             f"need {state / 2**30:.0f} GiB to train (weights, gradients, AdamW"
             f"{f', sharded {shards} ways' if shards > 1 else ''}), more than this {device}'s "
             f"{total / 2**30:.0f} GiB; make the model smaller"
             + ("" if shards > 1 else " or use --parallelism=fsdp on several GPUs"))
    if device != "cpu" or not batch_size:
        return
    act = activation_bytes(model_args, batch_size)
    state += 12 * params / shards if host_copy else 0
    each = f" in each of {procs} processes" if procs > 1 else ""
    if procs * (state + act + STEP_OVERHEAD) <= available:
        return
    if procs * (state + STEP_OVERHEAD) > available:  # the model alone is too much
        fail(f"{params / 1e6:.0f}M parameters need {_size(state)} to train{each} (weights, "
             f"gradients, AdamW), more than the {_size(available)} this machine has available; "
             "make the model smaller or free memory")
    fail(f"batch_size={batch_size} x block_size={T} needs about {_size(act)} for one micro-batch's "
         f"activations (forward and backward) on top of {_size(state)} of training state{each}, "
         f"more than the {_size(available)} this machine has available; lower batch_size (raising "
         "gradient_accumulation_steps keeps the global batch) or block_size")


def _size(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# Peak memory of one CPU training step (forward, backward, grad clip, fused AdamW), over what the
# process held before it built the model: ru_maxrss of a child process running tests/test_model.py's
# STEP (torch 2.13, eager, fp32, 2026-12-01 on 2-core AMD EPYC, one thread; the third row also with
# two threads and with torch.compile), MiB:
#   n_layer n_head n_embd block_size vocab dropout batch | measured | estimate: 16 n_params +
#                                                        |          | activations + overhead
#         1      1      8          8    65     0.0     1 |       82 |   128
#         6      6    384        256    65     0.0    16 |     1073 |  1449
#         6      6    384        256    65     0.2    16 |     1788 |  3561 (two threads 1797;
#                                                        |          |       compiled 1317)
#         6      6    384        256    65     0.2    32 |     3210 |  4430
#         8      4     64        256    65     0.0     8 |      187 |   265
#         8      4     64        256    65     0.1     8 |      492 |  1193
#         2      4    128        256 50304     0.0     8 |     1827 |  2262
#         1      2     64        128 50304     0.0     4 |      531 |   673
#         2      4    128        128  4000     0.0    16 |      263 |   362
#         2      8     64       1024    65     0.2     4 |     1048 |  1992
#         2      8     64       1024    65     0.0     4 |      142 |   200
#         1      8     32        512    65     0.1     2 |      181 |   422
#         2      8     32        512    65     0.1     2 |      268 |   650 (484 on the CI machine;
#                                                        |          |       596 in a full suite run,
#                                                        |          |       2026-12-07)
#         4      8     32        512    65     0.1     2 |      434 |  1106
# Saved for backward (counted with torch.autograd.graph.saved_tensors_hooks), per token: 16 floats
# per layer and n_embd (18 with dropout), 1 per vocab entry (the log-softmax), and with dropout 3
# per layer and entry of the attention matrix; without dropout the CPU's fused attention keeps no
# batch x n_head x block^2 matrix. The coefficients below add backward's gradients and what the
# allocator keeps: with dropout the peak held 5-6 attention matrices per layer where each is under
# malloc's 32 MiB mmap threshold (freed ones stay in the heap), 3.7 where each is larger. The
# 2-layer, block 512 row measured 484 MiB on another machine (the CI run of 2026-12-01; the freed
# matrices stayed in its heap twice as often), and 596 MiB in a full `make test` here (2026-12-07),
# so under the threshold 14 per layer are counted.
# Every estimate is over every measurement, and at most 3x the lowest. Under bf16 autocast
# the saved tensors measured 0.66x (layers), 1.1x (logits), 0.93x (attention) of fp32's: the fp32
# figure is used for every dtype.
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: a freed block under it stays in the process's heap


# the first step's kernels and thread pools (82 MiB for a 1,472-parameter model)
STEP_OVERHEAD = 128 * 2**20


def n_params(model_args):
    """GPT's parameter count from its shape, biases and LayerNorms left out: 12 n_embd^2 per layer
    (attention 4, MLP 8), and the token and position embeddings."""
    d = model_args["n_embd"]
    return (12 * model_args["n_layer"] * d * d
            + (model_args["vocab_size"] + model_args["block_size"]) * d)


def activation_bytes(model_args, batch_size):
    """About the most memory one micro-batch's forward and backward hold at once on a CPU (see
    above)."""
    d, L, V, T, H = (model_args[k]
                     for k in ("n_embd", "n_layer", "vocab_size", "block_size", "n_head"))
    tokens = batch_size * T
    # the layers' saved tensors and gradients; logits, log-softmax, theirs
    floats = tokens * (32 * L * d + 5 * V)
    # attention's dropout runs the math path: the whole matrix per layer
    if model_args.get("dropout", 0.0) > 0:
        matrix = batch_size * H * T * T
        # freed ones stay in the heap
        kept = 14 * L + 4 if 4 * matrix < MMAP_THRESHOLD else 6 * L + 2
        floats += kept * matrix
    return 4 * floats
