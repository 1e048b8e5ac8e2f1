"""
DDP against FSDP on 2 ranks for GPT-2 124M's shape (docs/distributed.md): each rank's
peak RSS in training, and checkpoint save times: rank 0 writing one file (DDP, and every checkpoint
before FSDP), every rank writing its shard of a DCP folder, and the stall of a background (async)
save.

    python bench/bench_fsdp.py                       # 3 pairs of launches, DDP and FSDP interleaved
    python bench/bench_fsdp.py --pairs=1 --n_layer=2 # a quick look

Each launch is `torchrun --standalone --nproc_per_node=2 bench/bench_fsdp.py --worker=ddp|fsdp ...`:
the model (vocab 50304, block_size 256, batch 1, fp32, no compile) is built, trained for --steps
steps on random tokens (AdamW's state exists from the first), then saved --saves times each way with
the project's own code (store.save, folders.ShardedSaver) into a temp folder on this disk.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
sys.path.insert(0, ROOT)  # its modules, when run as python bench/bench_fsdp.py


def worker(a):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from keep.files import FORMAT_VERSION
    from keep import store
    import distributed
    from keep.atomic import remove_whole
    from keep.folders import ShardedSaver
    from keep.worker import snapshot
    from devices import pick_device
    from model import GPT, GPTConfig
    fsdp = a.worker == "fsdp"
    _, world, device = distributed.init(pick_device(a.device), "auto", fsdp)
    rank = dist.get_rank()
    torch.manual_seed(1337)
    args = dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=256,
                vocab_size=50304, dropout=0.0, bias=False)
    model = GPT(GPTConfig(**args)).to(device)
    net = distributed.shard(model, "float32") if fsdp else DDP(model)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    step_ms = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        x = torch.randint(0, 50304, (1, 256), device=device)
        _, loss = net(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        step_ms.append((time.perf_counter() - t0) * 1000)
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KB)
    with open("/proc/self/status") as f:  # what the process holds now, after the steps
        now_rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
    plain = dict(model_args=args, iter_num=a.steps, best_val_loss=0.0, config={}, scaler={}, rng=[],
                 format_version=FORMAT_VERSION, metadata={})
    times = {}

    def timed(name, fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.setdefault(name, []).append(time.perf_counter() - t0)

    saver = ShardedSaver(device) if fsdp else None
    host = {}  # the host buffers a snapshot reuses from one save to the next
    for i in range(a.saves):
        path = os.path.join(a.dir, f"ckpt-{i:08d}")
        if fsdp:
            timed("dcp_sync", lambda: saver.save(plain, path, model, optimizer))
            stall = []

            def background():
                t0 = time.perf_counter()
                saver.save(plain, path + "-async", model, optimizer, background=True)
                stall.append(time.perf_counter() - t0)
                saver.finish()
            timed("dcp_async_total", background)
            times.setdefault("dcp_async_stall", []).append(stall[0])
            size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        else:
            # as the Checkpointer writes a file: GPU tensors copied to host buffers first
            def one_file():
                if rank == 0:
                    state = dict(plain, model=model.state_dict(), optimizer=optimizer.state_dict())
                    store.save(snapshot(state, host) if device.startswith("cuda") else state,
                               path + ".pt")
            timed("file_rank0", one_file)
            size = os.path.getsize(path + ".pt")
        dist.barrier()
        if rank == 0:
            for n in os.listdir(a.dir):
                remove_whole(os.path.join(a.dir, n))
    result = dict(rank=rank, train_rss_mb=train_rss, now_rss_mb=now_rss,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  step_ms=statistics.median(step_ms), size_mb=size / 2**20,
                  **{k: statistics.median(v) for k, v in times.items()})
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        print("RESULT " + json.dumps(every), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(mode, a, folder):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={a.nproc}", os.path.abspath(__file__), f"--worker={mode}",
           f"--dir={folder}", f"--n_layer={a.n_layer}", f"--n_head={a.n_head}",
           f"--n_embd={a.n_embd}", f"--steps={a.steps}", f"--saves={a.saves}",
           f"--device={a.device}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"error: the {mode} launch failed (exit "
                         f"{p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_head", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench_fsdp-") as folder:
        for pair in range(a.pairs):
            ddp, fsdp = launch("ddp", a, folder), launch("fsdp", a, folder)
            rows.append((ddp, fsdp))
            rss = [r["train_rss_mb"] for r in ddp], [r["train_rss_mb"] for r in fsdp]
            print(f"pair {pair + 1}: peak RSS per rank in training: DDP "
                  f"{'/'.join(f'{x:,.0f}' for x in rss[0])} MB, FSDP "
                  f"{'/'.join(f'{x:,.0f}' for x in rss[1])} MB; save: one file by rank 0 "
                  f"{ddp[0]['file_rank0']:.2f} s ({ddp[0]['size_mb']:,.0f} MB), DCP folder "
                  f"{fsdp[0]['dcp_sync']:.2f} s ({fsdp[0]['size_mb']:,.0f} MB), async stall "
                  f"{fsdp[0]['dcp_async_stall']:.3f} s of {fsdp[0]['dcp_async_total']:.2f} s; "
                  f"ms/step DDP {ddp[0]['step_ms']:,.0f}, FSDP {fsdp[0]['step_ms']:,.0f}",
                  flush=True)

    def med(f):
        return statistics.median(f(d, s) for d, s in rows)
    print(f"\nmedians over {a.pairs} pair(s), {a.nproc} ranks, n_layer={a.n_layer} "
          f"n_embd={a.n_embd}:")
    print("  peak RSS per rank (max over ranks): DDP "
          f"{med(lambda d, s: max(r['train_rss_mb'] for r in d)):,.0f} MB, FSDP "
          f"{med(lambda d, s: max(r['train_rss_mb'] for r in s)):,.0f} MB, ratio FSDP/DDP "
          f"""{med(lambda d, s: max(r['train_rss_mb'] for r in s)
                   / max(r['train_rss_mb'] for r in d)):.2f}""")
    print("  RSS per rank after the steps (max over ranks): DDP "
          f"{med(lambda d, s: max(r['now_rss_mb'] for r in d)):,.0f} MB, FSDP "
          f"{med(lambda d, s: max(r['now_rss_mb'] for r in s)):,.0f} MB, ratio FSDP/DDP "
          f"""{med(lambda d, s: max(r['now_rss_mb'] for r in s)
                   / max(r['now_rss_mb'] for r in d)):.2f}""")
    print(f"  save: one file by rank 0 {med(lambda d, s: d[0]['file_rank0']):.2f} s, DCP folder by "
          f"every rank {med(lambda d, s: s[0]['dcp_sync']):.2f} s, ratio DCP/file "
          f"{med(lambda d, s: s[0]['dcp_sync'] / d[0]['file_rank0']):.2f}")
    print(f"  async: stall {med(lambda d, s: s[0]['dcp_async_stall']):.3f} s = "
          f"{100 * med(lambda d, s: s[0]['dcp_async_stall'] / s[0]['dcp_sync']):.1f}% of a sync "
          f"DCP save; until committed {med(lambda d, s: s[0]['dcp_async_total']):.2f} s")


if __name__ == "__main__":
    main()
