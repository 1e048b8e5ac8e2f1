"""
What a run reports: console lines and out_dir/metrics.jsonl (and wandb, when asked for).

The console lines go through say(), which a closed or broken stdout or stderr (a `| tee` or
`| head` that died, a closed terminal, a dropped ssh session) can never turn into an exception: a
run that cannot print goes on training and checkpointing, silently.

metrics.jsonl holds one JSON object per line: one per logged iteration ("kind": "train"), one
per eval ("eval") and one per event ("event": start, resume, checkpoint, signal, end), each
with "iter". Rows are appended and flushed as they are written, by rank 0 only. A run resumed
from iteration k redoes the work after k, so on resume the rows of that work (train rows from k
on, eval and event rows after k) are marked "superseded": true; the rows not so marked read as
one run, with no iteration twice and none missing. A line torn by a crash is dropped.
"""
import importlib.util
import json
import math
import os
import sys
import time

from atomicfile import atomic_write

METRICS = "metrics.jsonl"


def _silence(stream):
    """Point a broken stream's file descriptor at /dev/null: later writes, and the flush Python does
    at exit (a failed one turns exit code 0 into 120), then succeed quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def say(*parts, err=False):
    """print(), flushed (so `| tee` shows each line as it comes), and never raising."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(*parts, file=stream, flush=True)
    except (OSError, ValueError):  # EPIPE, EIO from a vanished terminal, a closed file
        _silence(stream)


def read_rows(path):
    """The rows of a metrics file, in order; a torn line (a crash mid-write) or any line that is not
    a row is skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return _rows(f.read())


def _rows(text):
    rows = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            continue  # torn
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "kind" in row and "iter" in row:
            rows.append(row)
    return rows


def redone(row, k):
    """Whether a run resumed at iteration k (None: started afresh) redoes the work of this row.
    A train row's iter is the update it logs, which the resumed run runs again from k on; an eval
    or event at k came before the checkpoint of iteration k was written, so it stays."""
    if k is None:
        return True
    return row["iter"] >= k if row["kind"] == "train" else row["iter"] > k


def humanize(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def has_wandb():
    return importlib.util.find_spec("wandb") is not None


class MetricsLog:
    """Appends rows to out_dir/metrics.jsonl and, given wandb's settings (project, name, config, id),
    logs them to that wandb run too. A
    failed write (disk full) is one warning, then the file is left alone: metrics never stop a run."""

    def __init__(self, out_dir, tokens_at, resumed_at=None, wandb=None):
        """tokens_at(it): tokens trained on before update `it`, recorded with each event. resumed_at:
        the iteration a resumed run starts from (None: a fresh start). out_dir None: write nothing
        (the other ranks), so callers need not ask which rank they are."""
        self.path = os.path.join(out_dir, METRICS) if out_dir else None
        self.tokens_at = tokens_at
        self.file = None
        self.wandb = None
        if self.path is None:
            return
        if wandb:  # the run's own id: a resumed run continues the same wandb run; its files in out_dir
            import wandb as wandb_lib
            self.wandb = wandb_lib.init(**wandb, resume="allow", dir=out_dir)
        try:
            self._settle(resumed_at)
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            say(f"warning: {self.path} cannot be written ({e.strerror or e}); training goes on without it", err=True)

    def _settle(self, k):
        """Before appending: mark the rows that this start redoes as superseded, and drop a torn
        last line, rewriting the file atomically (temp file, fsync, rename) when anything changes."""
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        rows = _rows(text)
        stale = [r for r in rows if not r.get("superseded") and redone(r, k)]
        if not stale and (not text or text.endswith("\n")):
            return
        for r in stale:
            r["superseded"] = True
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def row(self, kind, it, **fields):
        # strict JSON has no NaN or Infinity: a diverged loss is written as null
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
        row = dict(kind=kind, iter=it, time=round(time.time(), 3), **fields)
        if self.file is not None:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:
                say(f"warning: {self.path} cannot be written ({e.strerror or e}); training goes on without it", err=True)
                self.file = None
        # a resumed run redoes steps that wandb has seen (and would drop, warning each time)
        if self.wandb is not None and kind != "event" and it >= getattr(self.wandb, "step", 0):
            self.wandb.log({f"{kind}/{k}": v for k, v in fields.items() if isinstance(v, (int, float))}, step=it)

    def event(self, it, event, **fields):
        self.row("event", it, event=event, tokens=self.tokens_at(it), **fields)
