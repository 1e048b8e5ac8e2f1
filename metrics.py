"""
What a run records: out_dir/metrics.jsonl (and wandb, when asked for); its console lines are
console.py's.

metrics.jsonl holds one JSON object per line: one per logged iteration ("kind": "train"), one
per eval ("eval") and one per event ("event": start, resume, checkpoint, signal, end), each
with "iter". Rows are appended and flushed as they are written, by rank 0 only. A run resumed
from iteration k redoes the work after k, so on resume the rows of that work (train rows from k
on, eval and event rows after k) are marked "superseded": true; the rows not so marked read as
one run, with no iteration twice and none missing. A line torn by a crash is dropped.

wandb gets the same rows, into one wandb run per run (its id is the run's id). A resumed run
first sends the rows of metrics.jsonl that the wandb run does not hold yet (an offline run
loses the records it had not written out when the process was killed), then logs live only the
steps past what it holds, so every step is there once.
"""
import json
import glob
import math
import os
import struct
import time

from keep.atomic import atomic_write
from console import say

METRICS = "metrics.jsonl"


def read_rows(path):
    """The rows of a metrics file, in order; a torn line (a crash mid-write) or any line that is not
    a row is skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_rows(f.read())


def parse_rows(text):
    """The whole rows of a piece of a metrics file (sweep.py reads a growing one piece by piece)."""
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


def reached(rows, max_iters):
    """Whether a run's rows show it reached max_iters: an end event or a checkpoint there."""
    return any(r["kind"] == "event" and r.get("event") in ("end", "checkpoint")
               and r["iter"] >= max_iters and not r.get("superseded") for r in rows)


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


def median(values):
    return sorted(values)[len(values) // 2]


def speed_line(it, step_times, started):
    """The last line of a run: where it ended, its median step time and its wall time."""
    steady = step_times[min(10, len(step_times) // 2):]  # past the warm-up steps
    return (f"done at iteration {it}: median {median(steady) * 1000:.2f} ms/iter, "
            f"{time.time() - started:.1f}s wall")


def wandb_offline_steps(out_dir, run_id):
    """The history steps that the offline wandb runs of this id in out_dir/wandb hold, oldest run
    first (wandb names their folders by start time), read from
    their run-<id>.wandb files: a 7-byte header, then 32 KiB blocks of records, each a 7-byte header
    (crc, length, type) and a piece of one protobuf Record (wandb writes them; `wandb sync` sends
    them)."""
    from wandb.proto.wandb_internal_pb2 import Record
    steps = []
    for path in sorted(glob.glob(os.path.join(out_dir, "wandb", f"offline-run-*-{run_id}",
                                              f"run-{run_id}.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        pos, record = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            # the end, or a record cut short by a kill
            if kind == 0 or pos + 7 + length > len(data):
                break
            record += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                r = Record.FromString(record)
                if r.WhichOneof("record_type") == "history":
                    steps.append(r.history.step.num)
                record = b""
    return steps


class MetricsLog:
    """Appends rows to out_dir/metrics.jsonl and, given wandb's settings (project, name, config,
    id), logs them to that wandb run too. A failed write (disk full) is one warning, then the file
    is left alone: metrics never stop a run."""

    @classmethod
    def for_run(cls, out_dir, run, config, resumed_from=None, **start):
        """A training run's log (run: its RunState), wandb as the config's wandb_* knobs say, under
        the run's id; its start event written (with `start`'s fields), and a resumed run's resume
        event."""
        wandb = dict(project=config["wandb_project"], name=config["wandb_run_name"], config=config,
                     id=run.run_id) if config["wandb_log"] else None
        log = cls(out_dir, run.tokens_at, run.start_iter if resumed_from else None, wandb)
        log.event(run.start_iter, "start", init_from=run.origin, dataset=config["dataset"],
                  max_iters=config["max_iters"], config=config, **start)
        if resumed_from:
            log.event(run.start_iter, "resume", path=resumed_from, branch=run.branch)
        return log

    def __init__(self, out_dir, tokens_at, resumed_at=None, wandb=None):
        """tokens_at(it): tokens trained on before update `it`, recorded with each event.
        resumed_at: the iteration a resumed run starts from (None: a fresh start). out_dir None:
        write nothing (the other ranks), so callers need not ask which rank they are."""
        self.path = os.path.join(out_dir, METRICS) if out_dir else None
        self.tokens_at = tokens_at
        self.file = None
        self.wandb = None
        if self.path is None:
            return
        self.held = -1  # the last step the wandb run held when this process started
        # the run's own id: a resumed run continues the same wandb run; its files in out_dir
        if wandb:
            import wandb as wandb_lib
            try:
                offline = max(wandb_offline_steps(out_dir, wandb["id"]), default=-1)
            except Exception as e:
                # a file of another wandb version: resend rather than stop the run
                say(f"warning: cannot read the offline wandb runs in {out_dir}/wandb ({e}); "
                    f"the rows of metrics.jsonl are sent again", err=True)
                offline = -1
            self.wandb = wandb_lib.init(**wandb, resume="allow", dir=out_dir)
            self.held = max(offline, getattr(self.wandb, "step", 0) - 1)  # online: the server says
        try:
            rows = self._settle(resumed_at)
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            say(f"warning: {self.path} cannot be written ({e.strerror or e}); training goes on "
                f"without it", err=True)
            rows = []
        # what the wandb run lost, from the file
        if self.wandb is not None and resumed_at is not None:
            for r in rows:
                if not r.get("superseded") and r["kind"] != "event" and r["iter"] > self.held:
                    self._send(r["kind"], r["iter"], r)

    def _settle(self, k):
        """Before appending: mark the rows that this start redoes as superseded, and drop a torn
        last line, rewriting the file atomically (temp file, fsync, rename) when anything
        changes."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        rows = parse_rows(text)
        stale = [r for r in rows if not r.get("superseded") and redone(r, k)]
        if not stale and (not text or text.endswith("\n")):
            return rows
        for r in stale:
            r["superseded"] = True
        atomic_write(self.path,
                     lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return rows

    def row(self, kind, it, **fields):
        # strict JSON has no NaN or Infinity: a diverged loss is written as null
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in fields.items()}
        row = dict(kind=kind, iter=it, time=round(time.time(), 3), **fields)
        if self.file is not None:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:
                say(f"warning: {self.path} cannot be written ({e.strerror or e}); training goes on "
                    f"without it", err=True)
                self.file = None
        # a resumed run redoes steps that the wandb run may hold: the same values again, which a
        # server would drop (warning each time) and an offline run would hold twice
        if self.wandb is not None and kind != "event" and it > self.held:
            self._send(kind, it, fields)

    def _send(self, kind, it, fields):
        skip = ("kind", "iter", "time", "superseded")
        self.wandb.log({f"{kind}/{k}": v for k, v in fields.items() if k not in skip
                        and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=it)

    def event(self, it, event, **fields):
        self.row("event", it, event=event, tokens=self.tokens_at(it), **fields)
