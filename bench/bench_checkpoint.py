"""
What checkpoints cost (docs/checkpoints.md), measured side by side in one run: the variants
alternate A B A B and each ratio is the median over the pairs, so it holds on a noisy shared
machine. From the project root:

    python bench/bench_checkpoint.py  # all three parts, sized for about 10 minutes on 2 quiet cores
    # also a state of GPT-2 124M's size (1.5 GB file)
    python bench/bench_checkpoint.py --parts=save --big
    python bench/bench_checkpoint.py --parts=recipe --pairs=5
    # a smoke run
    python bench/bench_checkpoint.py --pairs=1 --iters=20 --save_pairs=1 --gpt2_iters=6 \
        --gpt2_block=64

save:   one checkpoint file written with the call train.py makes (save_file below: one place to
        adapt) against a plain write + fsync of as many bytes to a file in the same folder, for the
        CPU recipe's state (weights and AdamW's moments after a step; --big: GPT-2 124M's too). The
        cost of a save inside train.py, retention and all, comes from the recipe part: (wall time
        every iteration sync - wall time without periodic checkpoints) / iterations, against the
        same plain write of that run's file size.
recipe: the README's CPU recipe for --iters iterations, wall time from its first `iter` line to its
        last line (a background write still in flight is waited for first), against no periodic
        checkpoints (--checkpoint_interval=0): every 10 iterations sync and async
        (--async_save=True), every iteration sync and async.
gpt2:   GPT-2 124M's shape (12 layers, 768 wide, vocab 50304, batch 1, block --gpt2_block), two
        periodic saves in --gpt2_iters iterations, sync and async: the stall of each (the gap
        between the `iter` lines around the save less a normal one, plus what the steps after it
        lost to a background writer still going), the ratio of the background stall to the sync one,
        and the throughput cost of one save every 10 iterations (stall / 10 iterations). The first
        save of a run allocates the snapshot's host buffers; later ones reuse them: both are shown.
Runs write into temp folders under --dir (default: the project root; bench-ckpt-* is git-ignored).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
# its modules (not this file's folder: this file is not the project's checkpoint.py)
sys.path.insert(0, ROOT)

RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=1",
          "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
          "--n_embd=128", "--lr_decay_iters=2000", "--dropout=0.0", "--eval_interval=100000"]
RECIPE_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)
GPT2 = ["--dataset=shakespeare", "--device=cpu", "--compile=False", "--n_layer=12", "--n_head=12",
        "--n_embd=768", "--batch_size=1", "--gradient_accumulation_steps=1", "--eval_iters=1",
        "--log_interval=1", "--eval_interval=100000", "--dropout=0.0", "--warmup_iters=0"]
GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+) ?ms")


def save_file(state, path):
    """Write a checkpoint file the way train.py does (the one place to adapt when that call
    changes)."""
    from keep import store
    store.save(state, path)


def plain_write(path, size, block):
    """size bytes into a new file, then fsync: what the disk costs for a file of that size."""
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[:size % len(block)])
        f.flush()
        os.fsync(f.fileno())


def training_state(shape):
    """A state like train.py's for a model of `shape`: weights, AdamW's moments after one step, and
    the small plain parts."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape, dropout=0.0, bias=False))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(shape["vocab_size"], (1, 8))
    model(x, x)[1].backward()
    optimizer.step()
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                model_args=dict(shape, dropout=0.0, bias=False),
                iter_num=1, best_val_loss=1e9, config={f"key{i}": i for i in range(100)}, scaler={},
                rng=[{"torch": torch.get_rng_state()}], format_version=1, metadata={})


def bench_save(name, shape, folder, pairs):
    """save_file against a plain write + fsync of as many bytes, alternating; returns the file
    size."""
    state = training_state(shape)
    probe = os.path.join(folder, "probe.pt")
    save_file(state, probe)
    size = os.path.getsize(probe)
    os.remove(probe)
    block = os.urandom(2**20)
    ratios, saves, plains = [], [], []
    for i in range(pairs):
        # a new name each time, as periodic checkpoints are
        path = os.path.join(folder, f"ckpt-{i:08d}.pt")
        t0 = time.perf_counter()
        plain_write(os.path.join(folder, "plain"), size, block)
        plains.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        save_file(state, path)
        saves.append(time.perf_counter() - t0)
        ratios.append(saves[-1] / plains[-1])
        os.remove(path)
        os.remove(os.path.join(folder, "plain"))
        print(f"  {name} pair {i + 1}: save {saves[-1] * 1000:.1f} ms, plain write + fsync "
              f"{plains[-1] * 1000:.1f} ms, ratio {ratios[-1]:.2f}", flush=True)
    print(f"{name} ({size / 2**20:.1f} MB): median save {statistics.median(saves) * 1000:.1f} ms, "
          f"plain write + fsync {statistics.median(plains) * 1000:.1f} ms "
          f"({size / statistics.median(plains) / 2**20:.0f} MB/s); median ratio save / plain "
          f"{statistics.median(ratios):.2f} (target <= 1.3)", flush=True)
    return size


def train(args, folder):
    """Run train.py into a fresh out_dir under folder. Returns (seconds from its first `iter` line
    to its last line, 'done at iteration ...': the final save and any background write are finished
    then, the interpreter's teardown, seconds on a loaded machine, is left out), {iteration: when
    its line arrived}, {iteration: its step ms}, the size of its newest periodic file or 0)."""
    out = tempfile.mkdtemp(prefix="run-", dir=folder)
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrived, step_ms, lines, end = {}, {}, [], None
    for line in proc.stdout:
        end = time.perf_counter()
        lines.append(line)
        m = ITER.match(line)
        if m:
            arrived[int(m[1])], step_ms[int(m[1])] = end, float(m[2])
    proc.wait()
    if proc.returncode != 0 or not arrived:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{''.join(lines[-20:])}")
    files = sorted(n for n in os.listdir(out) if re.fullmatch(r"ckpt-\d{8}\.pt", n))
    size = os.path.getsize(os.path.join(out, files[-1])) if files else 0
    shutil.rmtree(out)
    return end - arrived[min(arrived)], arrived, step_ms, size


def bench_recipe(folder, pairs, iters, save_pairs):
    variants = {"none": ["--checkpoint_interval=0"],
                "every 10 sync": ["--checkpoint_interval=10"],
                "every 10 async": ["--checkpoint_interval=10", "--async_save=True"],
                "every 1 sync": ["--checkpoint_interval=1"],
                "every 1 async": ["--checkpoint_interval=1", "--async_save=True"]}
    walls = {v: [] for v in variants}
    size = 0
    for pair in range(pairs):
        for v, extra in variants.items():
            wall, _, _, s = train([*RECIPE, f"--max_iters={iters}", *extra], folder)
            walls[v].append(wall)
            size = size or s
        print(f"  recipe pair {pair + 1}: "
              + ", ".join(f"{v} {walls[v][-1]:.2f}s" for v in variants), flush=True)
    ratio = {v: statistics.median(a / b for a, b in zip(walls[v], walls["none"]))
             for v in variants if v != "none"}
    print(f"recipe, {iters} iterations, median ratio against no periodic checkpoints over {pairs} "
          "pair(s): "
          + ", ".join(f"{v} {r:.3f}x" for v, r in ratio.items())
          + " (targets: every 10 async <= 1.05, sync <= 1.10; every 1 async <= 1.5)")
    for every in ("10", "1"):
        a_s = statistics.median(a / s for a, s in zip(walls[f"every {every} async"],
                                                      walls[f"every {every} sync"]))
        print(f"  every {every}: async / sync {a_s:.3f}x (target: <= 1)")
    # a save's cost inside train.py (writing, retention, announcing) against the plain write of its
    # bytes
    per_save = statistics.median((a - b) / iters
                                 for a, b in zip(walls["every 1 sync"], walls["none"]))
    if size:
        block, plain = os.urandom(2**20), []
        for _ in range(save_pairs):
            t0 = time.perf_counter()
            plain_write(os.path.join(folder, "plain"), size, block)
            plain.append(time.perf_counter() - t0)
            os.remove(os.path.join(folder, "plain"))
        print(f"  one sync save inside train.py: {per_save * 1000:.1f} ms, a plain write + fsync "
              f"of its {size / 2**20:.1f} MB {statistics.median(plain) * 1000:.1f} ms: ratio "
              f"{per_save / statistics.median(plain):.2f} (target <= 1.3)", flush=True)


def stalls(arrived, step_ms, saves):
    """([the stall of each save in `saves`], a normal gap): a save taken before update `at` sits
    between the lines of iterations at-1 and at; its stall is that gap (which holds the snapshot,
    and the step at `at` slowed by a background writer) less a normal gap. A background writer still
    going slows the steps after it too: those are added (their excess over a normal step)."""
    gaps = {k: arrived[k] - arrived[k - 1] for k in arrived if k - 1 in arrived}
    normal_step = statistics.median(step_ms[k] for k in step_ms if k not in saves) / 1000
    normal = statistics.median(g for k, g in gaps.items() if k not in saves)
    out = []
    for i, at in enumerate(saves):
        later = [k for k in sorted(step_ms)
                 if at < k < (saves[i + 1] if i + 1 < len(saves) else max(step_ms) + 1)]
        out.append(gaps[at] - normal
                   + sum(max(0.0, step_ms[k] / 1000 - normal_step) for k in later))
    return out, normal


def bench_gpt2(folder, pairs, iters, block):
    """Two periodic saves, at a third and two thirds of the run: the first allocates the snapshot's
    host buffers (a one-time cost of a run), the second reuses them (every later save of a run)."""
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare/prepare.py"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    at = iters // 3
    args = [*GPT2, f"--block_size={block}", f"--max_iters={iters}", f"--checkpoint_interval={at}"]
    got = {"sync": [], "async": []}
    for pair in range(pairs):
        line = []
        for v in got:
            _, arrived, step_ms, size = train([*args, f"--async_save={v == 'async'}"], folder)
            s, normal = stalls(arrived, step_ms, [at, 2 * at])
            got[v].append((s, normal))
            line.append(f"{v}: stalls {s[0]:.2f}s, {s[1]:.2f}s (iteration {normal:.2f}s; steps "
                        f"{', '.join(f'{step_ms[k] / 1000:.2f}' for k in sorted(step_ms))}s)")
        print(f"  gpt2 pair {pair + 1}, file {size / 2**20:.0f} MB: " + "; ".join(line), flush=True)
    for i, which in enumerate(("first save (allocates the host buffers)",
                               "later saves (buffers reused)")):
        ratio = statistics.median(a[0][i] / s[0][i] for a, s in zip(got["async"], got["sync"])
                                  if s[0][i] > 0)
        cost = {v: statistics.median(s[i] / (10 * n) for s, n in got[v]) for v in got}
        print(f"gpt2 (block {block}), {which}: background stall / sync stall {ratio * 100:.1f}% "
              f"(target <= 5%); one save every 10 iterations costs {cost['sync'] * 100:.1f}% of "
              f"throughput sync, {cost['async'] * 100:.1f}% async", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="save,recipe,gpt2",
                    help="comma-separated: save, recipe, gpt2")
    ap.add_argument("--pairs", type=int, default=2, help="recipe: A B A B rounds")
    ap.add_argument("--iters", type=int, default=300, help="recipe: iterations per run")
    ap.add_argument("--save_pairs", type=int, default=5,
                    help="save: rounds of save against plain write")
    ap.add_argument("--big", action="store_true", help="save: also a state of GPT-2 124M's size")
    ap.add_argument("--gpt2_pairs", type=int, default=1)
    ap.add_argument("--gpt2_iters", type=int, default=9,
                    help="gpt2: iterations per run (saves at 1/3 and 2/3)")
    ap.add_argument("--gpt2_block", type=int, default=1024)
    ap.add_argument("--dir", default=ROOT,
                    help="where the temp folders go (the disk being measured)")
    a = ap.parse_args()
    parts = a.parts.split(",")
    if (set(parts) - {"save", "recipe", "gpt2"}
            or min(a.pairs, a.iters, a.save_pairs, a.gpt2_pairs) < 1 or a.gpt2_iters < 6):
        sys.exit("error: --parts takes save, recipe, gpt2; counts are at least 1, --gpt2_iters at "
                 "least 6")
    if not os.path.isdir(a.dir):
        sys.exit(f"error: --dir {a.dir!r} is not a folder")
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare_char", "train.bin")):
        sys.exit("error: no data/shakespeare_char/train.bin; run python "
                 "data/shakespeare_char/prepare.py first")
    folder = tempfile.mkdtemp(prefix="bench-ckpt-", dir=a.dir)
    t0 = time.time()
    try:
        if "save" in parts:
            bench_save("CPU recipe state", RECIPE_SHAPE, folder, a.save_pairs)
            if a.big:
                bench_save("GPT-2 124M state", GPT2_SHAPE, folder, a.save_pairs)
        if "recipe" in parts:
            bench_recipe(folder, a.pairs, a.iters, a.save_pairs)
        if "gpt2" in parts:
            bench_gpt2(folder, a.gpt2_pairs, a.gpt2_iters, a.gpt2_block)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
