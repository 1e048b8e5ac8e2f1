"""
Score a model on multiple-choice tasks, as lm-evaluation-harness 0.4 scores them (docs/evals.md).

    python eval.py --out_dir=out-shakespeare                  # its ckpt.pt (or newest good one)
    python eval.py --ckpt=out-gpt2/ckpt-00001000.pt --tasks=hellaswag,piqa --limit=500
    python eval.py --init_from=gpt2 --tasks=hellaswag,piqa,winogrande,arc_easy --json=gpt2.json

It only reads: nothing in out_dir changes, and a live run may be scored while it trains. Each
task's acc (and acc_norm: the log-likelihood per character of the answer) goes to a table on the
console and, with --json, to a file: {"<task>": {"acc": x, "acc_norm": y, "n": N, ...}}.
"""
import json as jsonlib
import sys
import time

from configurator import configure
from console import one_line_errors, say

# -----------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (a checkpoint of out_dir or --ckpt); 'gpt2', ..., an HF folder
out_dir = "out"  # a run's folder, or its remote_dir (s3://...)
which = "best"  # from out_dir: 'best': ckpt.pt, else the newest good checkpoint; 'latest'
ckpt = ""  # a checkpoint file or FSDP checkpoint folder (local or s3://...) instead of out_dir's
tasks = "hellaswag"  # comma-separated: hellaswag, piqa, winogrande, arc_easy
limit = -1  # score the first N examples of each task, in the dataset's order (-1: all of them)
json = ""  # also write the scores to this file
samples = ""  # also write every example's log-likelihoods and choices to this JSON Lines file
eval_data = ""  # the folder holding the tasks' data (default: the project's data/evals)
device = "auto"
dtype = "auto"
configure(globals())
# -----------------------------------------------------------------------------------------------
one_line_errors()  # a UsageError (exit 2) or RunError (exit 1): one line, no traceback

from tqdm import tqdm  # noqa: E402

import tokenizer  # noqa: E402
from devices import autocast_context, one_line_out_of_memory, pick_device, pick_dtype  # noqa: E402
from evals import score  # noqa: E402
from evals.tasks import TASKS, load, names  # noqa: E402
from keep.atomic import atomic_write  # noqa: E402
from reading import read_model  # noqa: E402

one_line_out_of_memory("score on a smaller device, or a smaller model")
wanted = names(tasks)
device = pick_device(device)
dtype = pick_dtype(dtype, device)
ctx = autocast_context(device, dtype)
log = lambda m: say(m, err=True)  # noqa: E731  (stdout: the table only)
model, record, what = read_model(init_from, out_dir, ckpt, which, log=log)
model.eval()
model.to(device)
codec = tokenizer.codec(record)
data = {name: load(name, max(limit, 0), eval_data) for name in wanted}
for name, examples in data.items():  # a char vocab that lacks a task's characters: said at once
    score.check_vocab(codec, name, examples)
log(f"scoring {what} on {', '.join(f'{n} ({len(e)})' for n, e in data.items())}")

results, log_rows = {}, []
t0 = time.time()
for name, examples in data.items():
    rows = [] if samples else None
    with tqdm(total=len(examples), desc=name, unit="ex", file=sys.stderr, leave=False) as bar:
        r = score.score_task(model, codec, examples, device, ctx, progress=bar.update, samples=rows)
    if not TASKS[name].norm:
        r.pop("acc_norm")
    results[name] = dict(r, seconds=round(time.time() - t0, 2))
    log_rows += [dict(task=name, **row) for row in sorted(rows or [], key=lambda r: r["index"])]
    t0 = time.time()

say(f"{'task':<12} {'n':>6} {'acc':>8} {'acc_norm':>9}")
for name, r in results.items():
    norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
    say(f"{name:<12} {r['n']:>6} {r['acc']:>8.4f} {norm:>9}")
for path, text in ((json, jsonlib.dumps(results, indent=1) + "\n"),
                   (samples, "".join(jsonlib.dumps(r) + "\n" for r in log_rows))):
    if path:  # whole or absent, never half-written
        atomic_write(path, lambda f, text=text: f.write(text.encode()))
        log(f"wrote {path}")
