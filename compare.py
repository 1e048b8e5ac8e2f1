"""
Runs side by side: a sweep's trials, or plain run folders, as rows of knobs and results, labelled
by the knobs that differ between them (not by folder name). `python sweep.py --show ...` prints
the table; plot.py draws the same runs with the same labels.

A sweep folder is read from its sweep.json (written by sweep.py after every trial); a plain run
from its metrics.jsonl, whose start event holds the run's config.
"""
import json
import os

from console import UsageError, say
from metrics import METRICS, reached, read_rows

SWEEP = "sweep.json"
# knobs that say where or how a run ran, not what it learned: never a label
NOT_LABELS = {"out_dir", "remote_dir", "time_limit", "init_from", "resume_from", "wandb_run_name",
              "wandb_log", "wandb_project", "device", "backend", "compile", "log_interval",
              "async_save", "checkpoint_interval", "checkpoint_minutes", "keep_last", "keep_every",
              "remote_wait", "remote_lease", "eval_only", "peak_flops"}


def is_sweep(folder):
    return os.path.isfile(os.path.join(folder, SWEEP))


def is_run(folder):
    """A plain run's folder (a sweep's trials are runs, the sweep folder is not)."""
    return not is_sweep(folder) and any(os.path.exists(os.path.join(folder, f))
                                        for f in (METRICS, "ckpt.pt"))


def read_sweep(folder):
    """sweep.json, judged before it is used: a damaged or foreign one is one error line."""
    path = os.path.join(folder, SWEEP)
    try:
        with open(path) as f:
            sweep = json.load(f)
        ok = isinstance(sweep, dict) and isinstance(sweep.get("trials"), list) and all(
            isinstance(t, dict) and isinstance(t.get("params"), dict) and "number" in t
            and isinstance(t.get("out_dir") or "", str) for t in sweep["trials"])
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read: {e}") from None
    if not ok:
        raise UsageError(f"{path} is not a sweep's (sweep.py writes trials with number, params "
                         "and out_dir)")
    return sweep


def run_row(folder):
    """A plain run's row from its metrics.jsonl: its config, state, iterations, best val loss, last
    task scores and training time."""
    path = os.path.join(folder, METRICS)
    if not os.path.isfile(path):
        raise UsageError(f"{folder!r} is neither a sweep (no {SWEEP}) nor a run (no {METRICS})")
    rows = [r for r in read_rows(path) if not r.get("superseded")]
    events = [r for r in rows if r["kind"] == "event"]
    evals = [r for r in rows if r["kind"] == "eval" and r.get("val_loss") is not None]
    start = next((r for r in reversed(events) if r["event"] == "start"), {})
    config = start.get("config") or {}
    saved = [r["iter"] for r in events if r["event"] in ("end", "checkpoint")]
    iters = max(saved + [r["iter"] + 1 for r in rows if r["kind"] == "train"] or [0])
    max_iters = start.get("max_iters")
    last = evals[-1] if evals else {}
    return dict(out_dir=folder, knobs=config if isinstance(config, dict) else {},
                state="complete" if isinstance(max_iters, int) and reached(events, max_iters)
                else "stopped", iters=iters,
        best_val_loss=min((r["val_loss"] for r in evals), default=None), value=None,
        scores={k: v for k, v in last.items() if k.endswith(("_acc", "_acc_norm"))},
        seconds=sum(r.get("seconds") or 0 for r in events if r["event"] == "end"), number=None)


def rows(folders):
    """(rows, objective, maximize): every trial of the sweep folders and every plain run, each a
    dict with its label (the knobs that differ between all of them) and whether it is a sweep's
    best."""
    out, objective, maximize = [], None, False
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"{folder!r} is not a folder: give sweep out_dirs or run out_dirs")
        if not is_sweep(folder):
            out.append(run_row(folder))
            continue
        sweep = read_sweep(folder)
        objective = objective or sweep.get("objective")
        maximize = sweep.get("direction") == "maximize"
        for t in sweep["trials"]:  # (found beside sweep.json: the folder may have been moved)
            here = os.path.join(folder, os.path.basename(t["out_dir"])) if t.get("out_dir") \
                else folder
            out.append(dict(t, knobs=t["params"], best=t["number"] == sweep.get("best"),
                            out_dir=here))
    keys = differing([r["knobs"] for r in out])
    for r in out:
        r["label"] = ", ".join(f"{k}={short(r['knobs'].get(k))}" for k in keys) or \
            os.path.basename(r["out_dir"].rstrip("/"))
    return out, objective, maximize


def differing(knobs):
    """The knobs whose values are not the same in every one of these configs (in their order)."""
    keys = []
    for k in (k for d in knobs for k in d):
        if k not in keys and k not in NOT_LABELS and len({repr(d.get(k)) for d in knobs}) > 1:
            keys.append(k)
    return keys


def short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show(folders, head=None):
    """Print the runs of these folders as a table, best first by the sweep's objective (or by best
    val loss)."""
    if not folders:
        raise UsageError("--show needs folders: a sweep's out_dir, or run out_dirs")
    table, objective, maximize = rows(folders)
    key = "value" if objective else "best_val_loss"
    sign = -1 if maximize and objective else 1
    # complete trials by their value, best first; then the others (a pruned trial's value is its
    # last eval's, not comparable)
    table.sort(key=lambda r: (r["state"] != "complete" and r.get("number") is not None,
                              r[key] is None, sign * (r[key] or 0)))
    tasks = sorted({k for r in table for k in r.get("scores") or {} if not k.endswith("_bpb")})
    head_cells = ["", "run", "state", "iters", "best val"] + \
        ([objective] if objective and objective != "val_loss" else []) + tasks + ["time"]
    lines = []
    for r in table[:head] if head else table:
        scores = r.get("scores") or {}
        # a waiting copy of a try that ended (stopped, killed, lost) continues from its checkpoint
        state = {"fail": "failed"}.get(r["state"], r["state"])
        state = "to continue" if state == "waiting" and r.get("ended") else state
        cells = ["*" if r.get("best") else "", r["label"], state, str(r.get("iters") or 0),
                 num(r.get("best_val_loss"))]
        if objective and objective != "val_loss":
            cells.append(num(r.get("value")))
        cells += [num(scores.get(t)) for t in tasks]
        cells.append(clock(r.get("seconds")))
        lines.append(cells)
    widths = [max(len(c[i]) for c in [head_cells] + lines) for i in range(len(head_cells))]
    for cells in [head_cells] + lines:
        say("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    if head and len(table) > head:
        say(f"... {len(table) - head} more: python sweep.py --show {' '.join(folders)}")


def num(v):
    return "-" if v is None else f"{v:.4f}"


def clock(seconds):
    if not seconds:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"
