"""
What the remote copy costs (docs/remote.md), measured side by side against a
real S3 server on this machine (SeaweedFS on loopback, tests/s3server.py): variants alternate
A B B A and each ratio is the median over the pairs. From the project root:

    python bench/bench_remote.py                      # all parts, about 10 minutes on 2 quiet cores
    python bench/bench_remote.py --parts=transfer --mb=512
    python bench/bench_remote.py --pairs=1 --iters=40 --mb=32 --gpt2_iters=0   # a smoke run

transfer: one checkpoint file (a real training state, about --mb MB) uploaded by
          remote.Remote.upload (CRC, size check, commit object) against a plain s3fs put_file of the
          same file to the same server; then downloaded by Remote.download (CRC check, fsync,
          rename) against a plain s3fs get_file. Throughput ratio ours / plain (target >= 0.8).
recipe:   the README's CPU recipe for --iters iterations, checkpoint every 10, with --remote_dir
          against without it: the training's time, from the first `iter` line to the last (every
          upload but the last runs meanwhile), ratio with / without (target <= 1.02); and how much
          longer the end takes with it (the last save's upload, waited for).
gpt2:     GPT-2 124M's shape (block --gpt2_block, batch 1) for --gpt2_iters iterations, checkpoint
          every 100, with and without --remote_dir, the same ratio (0: skipped).
start:    seconds from the start of train.py to its first `iter` line when out_dir is empty and the
          checkpoint comes from remote_dir (a new machine), against the same resume from a local
          out_dir that holds it (the recipe's state after --iters iterations).
The S3 server runs on the same cores as training here, at the lowest CPU priority (SCHED_IDLE), as a
store on another machine takes none of training's CPU time; what the costs then measure is the
client's work: CRCs, requests and their signing (SigV4 hashes the payload over plain http), copies.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # s3server.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_checkpoint.py

from bench_checkpoint import GPT2, RECIPE, save_file, train, training_state  # noqa: E402


def bench_transfer(s3, folder, pairs, mb):
    from keep import remote
    # 12 bytes a parameter (weights, AdamW's two moments): 12 * (12 blocks * 12 d^2 + 50304 d) =
    # mb MB
    a, b = 12 * 144, 12 * 50304
    n_embd = 64 * max(1, round((-b + (b * b + 4 * a * mb * 2**20) ** 0.5) / (2 * a) / 64))
    state = training_state(dict(n_layer=12, n_head=8, n_embd=n_embd, block_size=256,
                                vocab_size=50304))
    path = os.path.join(folder, "ckpt-00000001.pt")
    save_file(state, path)
    del state
    size = os.path.getsize(path)
    fs = s3.fs()
    ours = remote.Remote(f"s3://{s3.bucket('bench')}/transfer")
    up, down = [], []
    for i in range(pairs):
        t0 = time.perf_counter()
        fs.put_file(path, f"bench/plain/{i}.pt")
        plain_up = time.perf_counter() - t0
        files = remote.open_files(path)
        t0 = time.perf_counter()
        commit = ours.upload(files, dict(iter_num=1, run_id="bench", branch=0, kind="periodic",
                                         val_loss=None))
        our_up = time.perf_counter() - t0
        remote.close_files(files)
        t0 = time.perf_counter()
        fs.get_file(f"bench/plain/{i}.pt", os.path.join(folder, "plain.pt"))
        plain_down = time.perf_counter() - t0
        dest = tempfile.mkdtemp(dir=folder)
        t0 = time.perf_counter()
        ours.download(commit, dest)
        our_down = time.perf_counter() - t0
        shutil.rmtree(dest)
        os.remove(os.path.join(folder, "plain.pt"))
        fs.rm(f"bench/plain/{i}.pt")
        up.append((plain_up / our_up, plain_up, our_up))
        down.append((plain_down / our_down, plain_down, our_down))
        mbs = size / 2**20
        print(f"  transfer pair {i + 1} ({mbs:.0f} MB): upload plain {mbs / plain_up:.0f} MB/s, "
              f"ours {mbs / our_up:.0f} MB/s; download plain {mbs / plain_down:.0f} MB/s, ours "
              f"{mbs / our_down:.0f} MB/s", flush=True)
    os.remove(path)
    for name, got in (("upload", up), ("download", down)):
        print(f"transfer {name} of a {size / 2**20:.0f} MB checkpoint: median throughput ours / "
              f"plain s3fs {statistics.median(r for r, _, _ in got):.2f} (target >= 0.8)",
              flush=True)


def bench_cost(s3, folder, pairs, args, label, target=1.02):
    """Training throughput with remote_dir against without: seconds from the first `iter` line to
    the last one (the uploads run meanwhile); the wait at the end for the last upload is shown
    apart."""
    remote_dir = f"s3://{s3.bucket('bench')}/{label.replace(' ', '-').replace(',', '')}"
    ratios, waits = [], []
    for i in range(pairs):
        fs = s3.fs()
        if fs.exists(remote_dir[5:]):
            fs.rm(remote_dir[5:], recursive=True)
        runs, order = {}, [("without", []), ("with", [f"--remote_dir={remote_dir}"])]
        # A B, then B A: no side always goes first
        for variant, extra in order if i % 2 == 0 else order[::-1]:
            wall, arrived, _, _ = train([*args, *extra], folder)
            span = arrived[max(arrived)] - arrived[min(arrived)]
            # (training, the end: last save, and the last upload's wait)
            runs[variant] = (span, wall - span)
        ratios.append(runs["with"][0] / runs["without"][0])
        waits.append(runs["with"][1] - runs["without"][1])
        print(f"  {label} pair {i + 1}: training {runs['without'][0]:.2f}s without remote_dir, "
              f"{runs['with'][0]:.2f}s with (ratio {ratios[-1]:.3f}); the end took "
              f"{runs['with'][1]:.2f}s with, {runs['without'][1]:.2f}s without", flush=True)
    print(f"{label}: median training time with remote_dir / without "
          f"{statistics.median(ratios):.3f} (target <= {target}); the end waits "
          f"{statistics.median(waits):.2f}s more for the last upload (median)", flush=True)


def first_iter(args):
    """Seconds from the start of train.py to its first `iter` line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter "):
            seconds = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return seconds
    sys.exit("error: train.py ended before its first iter line:\n" + "".join(lines[-20:]))


def bench_start(s3, folder, pairs, iters):
    remote_dir = f"s3://{s3.bucket('bench')}/start"
    fs = s3.fs()
    if fs.exists(remote_dir[5:]):
        fs.rm(remote_dir[5:], recursive=True)
    first = os.path.join(folder, "first")
    base = [*RECIPE, f"--max_iters={iters}", "--checkpoint_interval=0",
            f"--remote_dir={remote_dir}"]
    subprocess.run([sys.executable, "train.py", *base, f"--out_dir={first}"], cwd=ROOT, check=True,
                   capture_output=True)
    longer = [*base[:-1], f"--max_iters={iters + 1000}"]
    got = []
    for i in range(pairs):
        local = os.path.join(folder, f"local-{i}")
        shutil.copytree(first, local)
        os.remove(os.path.join(local, ".lock"))
        t_local = first_iter([*longer, f"--out_dir={local}"])
        t_new = first_iter([*longer, f"--remote_dir={remote_dir}",
                            f"--out_dir={os.path.join(folder, f'new-{i}')}"])
        got.append((t_new, t_local))
        print(f"  start pair {i + 1}: local out_dir {t_local:.2f}s, new machine (from remote_dir) "
              f"{t_new:.2f}s", flush=True)
    print(f"start to the first iteration: new machine {statistics.median(n for n, _ in got):.2f}s, "
          f"local resume {statistics.median(l for _, l in got):.2f}s (medians)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="transfer,recipe,gpt2,start",
                    help="comma-separated: transfer, recipe, gpt2, start")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=256, help="transfer: the checkpoint's size, about")
    ap.add_argument("--iters", type=int, default=300, help="recipe: iterations per run")
    ap.add_argument("--gpt2_iters", type=int, default=200,
                    help="gpt2: iterations per run (0: skip)")
    ap.add_argument("--gpt2_block", type=int, default=64)
    ap.add_argument("--dir", default=ROOT, help="where the temp folders go")
    a = ap.parse_args()
    from s3server import S3Server
    folder = tempfile.mkdtemp(prefix="bench-remote-", dir=a.dir)
    s3 = S3Server(os.path.join(folder, "s3"), idle=True)
    os.environ.update(s3.env())
    try:
        parts = a.parts.split(",")
        if "transfer" in parts:
            bench_transfer(s3, folder, a.pairs, a.mb)
        if "recipe" in parts:
            bench_cost(s3, folder, a.pairs,
                       [*RECIPE, f"--max_iters={a.iters}", "--checkpoint_interval=10"],
                       "recipe, checkpoint every 10")
        if "gpt2" in parts and a.gpt2_iters:
            if not os.path.exists(os.path.join(ROOT, "data", "shakespeare", "train.bin")):
                subprocess.run([sys.executable, "data/shakespeare/prepare.py"], cwd=ROOT,
                               check=True, stdout=subprocess.DEVNULL)
            bench_cost(s3, folder, a.pairs,
                       [*GPT2, f"--block_size={a.gpt2_block}", f"--max_iters={a.gpt2_iters}",
                        "--checkpoint_interval=100"],
                       "gpt2 shape, checkpoint every 100")
        if "start" in parts:
            bench_start(s3, folder, a.pairs, a.iters)
    finally:
        s3.kill()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
