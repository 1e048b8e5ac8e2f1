"""
Measure training speed (ms/iter, tokens/s, MFU) on any device, CPU included:

    python bench.py --device=cpu --compile=False --batch_size=12 --block_size=64 --n_layer=4
    python bench.py --profile=True          # also writes a torch profiler trace to bench_trace.json
    python bench.py --mode=checkpoint       # checkpoint save (sync and async), load, size

Warm-up steps first (allocations, compilation), then timed steps; the median is reported.
"""
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from configurator import check_data, configure
from console import one_line_errors
from dataset import TokenData
from devices import (DeviceError, autocast_context, one_line_out_of_memory, peak_flops_for,
                     pick_device, pick_dtype)
from keep import store
from keep.files import MODEL_ARGS
from keep.rng import capture_rng
from keep.worker import snapshot
from model import GPT, GPTConfig

_ROOT = os.path.dirname(os.path.abspath(__file__))  # (private: not a config key)

# -----------------------------------------------------------------------------------------------
mode = "train"  # 'train': step time; 'checkpoint': save/load times
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
dropout = 0.0
bias = False
real_data = True  # batches from data/<dataset>/train.bin; False: random tokens
dataset = "openwebtext"
seed = 1337
device = "auto"
dtype = "auto"
compile = True
warmup_steps = 10
timed_steps = 20
profile = False  # write a torch profiler trace (chrome://tracing) of a few steps
peak_flops = 0.0  # see train.py
bench_dir = ""  # checkpoint mode: folder to write into (default: a temp folder in the project root)
configure(globals())
# -----------------------------------------------------------------------------------------------
one_line_out_of_memory()
one_line_errors()  # dataset.TokenData's RunError (a missing or damaged dataset): one line

torch.manual_seed(seed)
try:
    device = pick_device(device)
except DeviceError as e:
    raise SystemExit(f"error: {e}")
dtype = pick_dtype(dtype, device)
device_type = "cuda" if device.startswith("cuda") else device
ctx = autocast_context(device, dtype)
sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

if real_data:
    data = TokenData(dataset)
    check_data(block_size, data.tokens(), dataset)
    vocab_size = data.vocab_size() or vocab_size

    def get_batch(it):
        return data.train_batch(seed, it, 0, batch_size, block_size, 1)
else:
    def get_batch(it):
        x = torch.randint(vocab_size, (batch_size, block_size + 1))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=dropout, bias=bias)).to(device)
optimizer = model.configure_optimizers(1e-1, 1e-4, (0.9, 0.95), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
print(f"{model.get_num_params() / 1e6:.2f}M parameters, vocab {vocab_size}"
      f"{' (from the dataset)' if real_data and data.meta_path else ''}, "
      f"device {device}, dtype {dtype}, compile {compile}")


def step(it):
    X, Y = get_batch(it)
    with ctx:
        _, loss = model(X.to(device), Y.to(device))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def bench_train():
    global model
    raw = model
    if compile:
        model = torch.compile(model)
    peak = peak_flops_for(device, dtype, peak_flops)
    for it in range(warmup_steps):
        step(it)
    sync()
    times = []
    for it in range(warmup_steps, warmup_steps + timed_steps):
        t0 = time.perf_counter()
        loss = step(it)
        loss.item()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = batch_size * block_size
    print(f"median {dt * 1000:.2f} ms/iter (min {min(times) * 1000:.2f}, "
          f"max {max(times) * 1000:.2f}), "
          f"{tokens / dt:,.0f} tokens/s, MFU {raw.estimate_mfu(tokens, dt, peak) * 100:.2f}% "
          f"of {peak / 1e12:.2f} TFLOP/s, loss {loss.item():.4f}")
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        activities = ([ProfilerActivity.CPU]
                      + ([ProfilerActivity.CUDA] if device_type == "cuda" else []))
        with torch_profile(activities=activities) as prof:
            for it in range(5):
                step(it)
            sync()
        prof.export_chrome_trace("bench_trace.json")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        print("trace written to bench_trace.json")


def bench_checkpoint():
    """Sync save, async save's stall (the snapshot), load, file size, against plain disk writes.
    Saves go as the Checkpointer's do: a GPU state is copied into host buffers (snapshot) before a
    sync write; a background save is that snapshot, then the write on a writer thread."""
    step(0)  # optimizer state exists after a first step, as in a real checkpoint
    model_args = {k: getattr(model.config, k) for k in MODEL_ARGS}
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                 iter_num=1, best_val_loss=0.0, config={}, rng=[capture_rng()])
    folder = tempfile.mkdtemp(dir=bench_dir or _ROOT, prefix="bench-ckpt-")
    path = os.path.join(folder, "ckpt.pt")
    results = {"sync save": [], "async stall": [], "async total": [], "load": []}
    buffers, writer = {}, ThreadPoolExecutor(1)
    for _ in range(3):
        t0 = time.perf_counter()
        store.save(snapshot(state, buffers) if device_type == "cuda" else state, path)
        results["sync save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy = snapshot(state, buffers)
        sync()
        results["async stall"].append(time.perf_counter() - t0)
        writer.submit(store.save, copy, path).result()
        results["async total"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.load(path)
        results["load"].append(time.perf_counter() - t0)
    size = os.path.getsize(path)
    # the disk's own speed for the same number of bytes, written and fsynced the same way
    block = os.urandom(2**20)
    t0 = time.perf_counter()
    with open(os.path.join(folder, "raw"), "wb") as f:
        for _ in range(size // 2**20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    disk = time.perf_counter() - t0
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    print(f"checkpoint file {size / 2**20:.1f} MB; disk write+fsync of as many bytes {disk:.2f}s "
          f"({size / disk / 2**20:.0f} MB/s)")
    for name, ts in results.items():
        t = statistics.median(ts)
        print(f"{name:>12}: {t:.3f}s median of {len(ts)}"
              + (f" ({size / t / 2**20:.0f} MB/s)" if "save" in name or "total" in name else ""))
    stall = statistics.median(results["async stall"]) / statistics.median(results["sync save"])
    print(f"async stall is {stall * 100:.1f}% of a sync save")


if mode == "train":
    bench_train()
elif mode == "checkpoint":
    bench_checkpoint()
else:
    raise SystemExit(f"error: mode={mode!r} is not 'train' or 'checkpoint'")
