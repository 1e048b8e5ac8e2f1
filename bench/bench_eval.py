"""
Task scoring speed, side by side with lm-evaluation-harness's hf backend (docs/performance.md):

    python bench/bench_eval.py                       # GPT-2 124M's shape, HellaSwag's first 100
    python bench/bench_eval.py --limit=300 --pairs=3 --task=piqa

Both score the same HF folder (GPT-2 124M's shape, random weights, fp32 on this CPU) on the same
examples with the same batch size (4: one HellaSwag question's endings; lm-eval batches any 4
requests), A B A B. Each run's time is the whole command's wall time, start-up and data loading
included, as a user waits for it. It also checks that the two agree: the same acc and acc_norm.
"""
import argparse
import json
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
sys.path.insert(0, ROOT)  # its modules, when run as python bench/bench_eval.py
from evals.tasks import write_lm_eval_tasks  # noqa: E402
from tokenizer import BPE_DIR  # noqa: E402


def gpt2_folder(path):
    """GPT-2 124M's shape with random weights, saved by transformers, with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    with open(os.path.join(BPE_DIR, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(BPE_DIR, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().splitlines()[1:] if line]
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(path)


def timed(cmd, env):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=4)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-eval-", dir=ROOT)
    model, tasks = os.path.join(tmp, "gpt2"), os.path.join(tmp, "tasks")
    os.makedirs(tasks)
    gpt2_folder(model)
    write_lm_eval_tasks(tasks)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=os.path.join(tmp, "hf_home"), TOKENIZERS_PARALLELISM="false")
    ours = [sys.executable, "eval.py", f"--init_from={model}", f"--tasks={a.task}",
            f"--limit={a.limit}", "--device=cpu", "--dtype=float32", f"--json={tmp}/ours.json"]
    theirs = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
              f"pretrained={model},dtype=float32", "--tasks", f"{a.task}_local", "--include_path",
              tasks, "--limit", str(a.limit), "--device", "cpu", "--batch_size", str(a.batch_size),
              "--output_path", os.path.join(tmp, "lm")]
    try:
        compare(a, tmp, ours, theirs, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(a, tmp, ours, theirs, env):
    times = {"ours": [], "lm-eval": []}
    for i in range(a.pairs):
        times["lm-eval"].append(timed(theirs, env))
        times["ours"].append(timed(ours, env))
        lm, mine = times["lm-eval"][-1], times["ours"][-1]
        print(f"pair {i + 1}: lm-eval {lm:.1f} s, ours {mine:.1f} s, {lm / mine:.2f}x", flush=True)
    mine = json.load(open(os.path.join(tmp, "ours.json")))[a.task]
    [path] = sorted(glob.glob(os.path.join(tmp, "lm", "*", "results_*.json")))[-1:]
    lm = json.load(open(path))["results"][f"{a.task}_local"]
    same = all(abs(mine[k] - lm[f"{k},none"]) < 1e-9 for k in ("acc", "acc_norm") if k in mine)
    print(f"{a.task}, first {a.limit}, batch {a.batch_size}: ours acc {mine['acc']:.4f} "
          f"acc_norm {mine.get('acc_norm', float('nan')):.4f}; lm-eval acc {lm['acc,none']:.4f} "
          f"acc_norm {lm.get('acc_norm,none', float('nan')):.4f} "
          f"({'equal' if same else 'DIFFERENT'})")
    ratio = statistics.median(t / o for t, o in zip(times["lm-eval"], times["ours"]))
    print(f"median wall: lm-eval {statistics.median(times['lm-eval']):.1f} s, ours "
          f"{statistics.median(times['ours']):.1f} s; ours is {ratio:.2f}x as fast")


if __name__ == "__main__":
    main()
