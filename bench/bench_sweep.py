"""
The sweep's own overhead (docs/sweeps.md): the CPU recipe's learning-rate grid
(config/sweep_shakespeare_char_cpu.py, three trials) run by sweep.py against the same three trials
run by hand, back to back. From the project root, with nothing else running:

    python bench/bench_sweep.py                     # the whole recipe (2000 iterations), 2 pairs
    python bench/bench_sweep.py --max_iters=500 --pairs=3
    python bench/bench_sweep.py --workers           # workers=2 against workers=1 instead

A: `python sweep.py config/sweep_shakespeare_char_cpu.py --out_dir=<new folder>`, its wall time
   from start to exit (the study, the checks of every trial's knobs, three train.py processes and
   their watching, sweep.json, the table).
B: `python train.py config/train_shakespeare_char_cpu.py --learning_rate=X --min_lr=X/10
   --out_dir=<new folder>` for each of the grid's three values, one after the other, the same
   knobs sweep.py gives its trials; the wall time of the three.
The runs alternate A B A B; the overhead is the median of A/B - 1 over the pairs, and the median
of A - B in seconds. On a 2-core machine whose speed changes from run to run (one training run at
35 ms/iter, the next at 44), the whole recipe's pairs scatter by +-10%; short trials
(--max_iters=100) measure the sweep's own fixed cost in seconds, which is what it adds to any grid.

--workers runs the sweep with workers=2 against workers=1 instead (A B A B): on a 2-core machine
each trial then gets one thread (OMP_NUM_THREADS=1 is set for both, so that the only difference is
two trials at a time, not thread oversubscription).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root
SWEEP = "config/sweep_shakespeare_char_cpu.py"
TRAIN = "config/train_shakespeare_char_cpu.py"
GRID = (5e-4, 1e-3, 2e-3)


def timed(cmds, env=None):
    """Wall seconds of these commands run one after the other (each must exit 0)."""
    t0 = time.perf_counter()
    for cmd in cmds:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} exited {p.returncode}: {p.stderr[-500:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--max_iters", type=int, default=2000, help="each trial's (the recipe: 2000)")
    ap.add_argument("--workers", action="store_true", help="workers=2 against workers=1 instead")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-sweep-")
    py = sys.executable
    iters = [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    flags = f"--flags={{'max_iters': {args.max_iters}, 'lr_decay_iters': {args.max_iters}}}"
    ratios, extra = [], []
    try:
        for i in range(0 if args.workers else args.pairs):
            a = timed([[py, "sweep.py", SWEEP, f"--out_dir={work}/sweep-{i}", flags]])
            b = timed([[py, "train.py", TRAIN, f"--learning_rate={lr!r}", f"--min_lr={lr / 10!r}",
                        *iters, f"--out_dir={work}/hand-{i}-{j}"] for j, lr in enumerate(GRID)])
            ratios.append(a / b)
            extra.append(a - b)
            print(f"pair {i}: sweep.py {a:.1f} s, by hand {b:.1f} s, ratio {a / b:.4f}, "
                  f"{a - b:+.1f} s", flush=True)
        if ratios:
            print(f"sweep.py overhead: {100 * (statistics.median(ratios) - 1):+.2f}%, "
                  f"{statistics.median(extra):+.1f} s (medians of {len(ratios)} pairs, "
                  f"{len(GRID)} trials of {args.max_iters} iterations)")
        if args.workers:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            speed = []
            for i in range(args.pairs):
                one = timed([[py, "sweep.py", SWEEP, f"--out_dir={work}/w1-{i}", flags,
                              "--workers=1"]], env)
                two = timed([[py, "sweep.py", SWEEP, f"--out_dir={work}/w2-{i}", flags,
                              "--workers=2"]], env)
                speed.append(one / two)
                print(f"pair {i}: workers=1 {one:.1f} s, workers=2 {two:.1f} s, "
                      f"speed-up {one / two:.2f}x", flush=True)
            print(f"workers=2 against workers=1 (OMP_NUM_THREADS=1): "
                  f"{statistics.median(speed):.2f}x (median of {len(speed)} pairs)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
