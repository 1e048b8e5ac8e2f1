"""
What in remote_dir is this run's (docs/remote.md). What a run writes there, and nothing else:

    ckpt-00000200.pt.commit          JSON: iteration, run id, branch, kind, and the size and CRC-32
                                     of every data object; written last: the checkpoint is complete
    data/00000200-1a2b3c4d.0.intent  JSON: run id, this start's token, rank; written before the data
    data/00000200-1a2b3c4d/...       the data, under a new prefix per upload
    metrics.jsonl                    the run's metrics, copied after each commit
    lease.json                       run id, host, pid; refreshed while the run lives (lease.py)

A run owns what it can prove it wrote: a commit with its run id, or a prefix that an intent of its
own names. Leftovers of a killed upload are found by that intent (and only when an earlier start
wrote it), never by the absence of a commit, so another run's objects, a commit of a format this
code cannot read and unrelated files are never deleted or replaced. A start refuses a remote_dir
that holds another run, or only things that are not a run's. Every commit and intent is judged
before it is used; a bad one costs only itself.
"""
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field

from console import first_line
from keep.atomic import TMP_TAG
from keep.files import NAMES
from keep.objects import RemoteError, Store, mtime
from keep.store import rank


COMMIT = ".commit"
INTENT = ".intent"
DATA = "data"
METRICS = "metrics.jsonl"
LEASE = "lease.json"
FORMAT = 1
PREFIX = re.compile(rf"{DATA}/(\d{{8}}-[0-9a-f]{{8}})")  # a data prefix of ours: iteration, random
INTENT_NAME = re.compile(rf"{PREFIX.pattern}\.(\d+){re.escape(INTENT)}")


# what _put_small leaves in a file:// remote_dir when killed before its rename: never an object (an
# object store has no rename), so neither a checkpoint nor someone else's object
PUT_TEMP = re.compile(rf"(.*/)?\.({re.escape(LEASE)}|{re.escape(METRICS)}|"
                      rf"ckpt[^/]*{re.escape(COMMIT)}|[^/]*{re.escape(INTENT)})"
                      rf"{re.escape(TMP_TAG)}\d+")
KINDS = ("periodic", "best", "kept")
HOST = socket.gethostname()


def new_prefix(it):
    """A data prefix no upload has used: each upload of a checkpoint gets its own."""
    return f"{DATA}/{it:08d}-{secrets.token_hex(4)}"


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def judge_commit(c, name):
    """A commit object read from remote_dir, judged before anything uses it: the commit, or
    ValueError saying what is wrong. Its data prefix must be one of ours and every object a safe
    relative name under a checkpoint's name (its own, or the one it had before it was kept under
    another), with an integer size and CRC."""
    if not isinstance(c, dict) or c.get("format") != FORMAT:
        raise ValueError(f"format {c.get('format') if isinstance(c, dict) else '?'!r}, not "
                         f"{FORMAT}")
    c.setdefault("branch", 0)
    problems = [k for k, ok in (
        ("name", c.get("name") == name), ("iter_num", _is_int(c.get("iter_num"))),
        ("branch", _is_int(c["branch"])), ("kind", c.get("kind") in KINDS),
        ("data", isinstance(c.get("data"), str) and PREFIX.fullmatch(c["data"])),
        ("run_id", c.get("run_id") is None or isinstance(c.get("run_id"), str)),
        ("val_loss", c.get("val_loss") is None or isinstance(c.get("val_loss"), (int, float))),
        ("objects", isinstance(c.get("objects"), dict) and c["objects"] and all(
            isinstance(rel, str) and NAMES.match(rel.split("/")[0])
            and not {"", ".", ".."} & set(rel.split("/"))  # (`a//b` would join to an absolute path)
            and isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)
            for rel, v in c["objects"].items()))) if not ok]
    if problems:
        raise ValueError(f"bad {', '.join(problems)}")
    return c


def lease_problem(lease):
    """Why a lease.json read from remote_dir is not a lease of ours (None if it is one)."""
    if not isinstance(lease, dict) or lease.get("format", FORMAT) != FORMAT:
        return "not a lease of this format"
    bad = [k for k, ok in (
        ("attempt", isinstance(lease.get("attempt"), str)),
        ("run_id", lease.get("run_id") is None or isinstance(lease.get("run_id"), str)),
        ("host", isinstance(lease.get("host"), str)), ("pid", _is_int(lease.get("pid"))),
        ("bound", isinstance(lease.get("bound"), (int, float)) and 0 < lease["bound"] < 1e7))
           if not ok]
    return f"bad {', '.join(bad)}" if bad else None


@dataclass
class Listing:
    """What remote_dir holds, each object judged. good: complete commits, newest first; bad: [(name,
    why)] of commits that are damaged or incomplete; intents: {data prefix: [intent]}; lease: the
    lease or None; foreign: keys that are no run's of this format (never touched); leftovers: {data
    prefix: bytes} of uploads that no commit names; runs: the run ids its commits, intents and
    lease name."""
    good: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    intents: dict = field(default_factory=dict)
    lease: dict = None
    foreign: list = field(default_factory=list)
    leftovers: dict = field(default_factory=dict)
    runs: set = field(default_factory=set)
    committed: set = field(default_factory=set)  # data prefixes that a commit names


class Claims(Store):
    """The store, and what in it is this run's."""

    def read_commit(self, name):
        """The judged commit object of a checkpoint name, or FileNotFoundError / ValueError."""
        try:
            c = self._read_json(name + COMMIT)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not JSON ({first_line(e)})") from None
        return judge_commit(c, name)

    def checkpoints(self):
        """The Listing of remote_dir. Complete: every object its commit names is there with its size
        (the CRCs are checked when it is downloaded). Raises RemoteError."""
        try:
            return self._listing()
        except Exception as e:  # the store went away since the probe, a listing refused, ...
            raise RemoteError(f"cannot list remote_dir {self.url}: {self.why(e)}") from None

    def _listing(self):
        objects = self._objects()
        out, named, ours = Listing(), set(), set()
        for key in sorted(objects):
            name = key[:-len(COMMIT)]
            if "/" in key or not key.endswith(COMMIT) or not NAMES.match(name):
                continue
            try:
                c = self.read_commit(name)
            except FileNotFoundError:
                ours.add(key)  # deleted since listed (retention)
                continue
            except Exception as e:  # judged, never trusted: one bad object costs only itself
                if isinstance(e, ValueError) and str(e).startswith("format"):
                    continue  # another format's: not ours to judge or touch
                out.bad.append((name, f"its commit object is damaged ({first_line(e)})"))
                ours.add(key)
                continue
            ours.add(key)
            named.add(c["data"])
            out.runs.add(c["run_id"])
            missing = [rel for rel, (size, _) in c["objects"].items()
                       if (objects.get(f"{c['data']}/{rel}") or {}).get("size") != size]
            if missing:
                rel = missing[0]
                got = (objects.get(f"{c['data']}/{rel}") or {}).get("size")
                out.bad.append((name, f"{rel} is " + ("missing" if got is None else
                                                      f"{got} bytes, its commit says "
                                                      f"{c['objects'][rel][0]}")))
            else:
                out.good.append(c)
        for key in objects:
            m = INTENT_NAME.fullmatch(key)
            if m is None:
                continue
            try:
                intent = self._read_json(key)
            except Exception:  # gone since listed, or not JSON: not an intent of ours
                continue
            # judged with plain checks, not assert (python -O drops those): intents decide deletions
            if not (isinstance(intent, dict) and intent.get("prefix") == f"{DATA}/{m.group(1)}" and
                    isinstance(intent.get("run_id"), str) and
                    isinstance(intent.get("attempt"), str)):
                continue
            intent["key"] = key
            out.intents.setdefault(intent["prefix"], []).append(intent)
            out.runs.add(intent["run_id"])
            ours.add(key)
        if LEASE in objects:
            try:
                lease = self._read_json(LEASE)
                if lease_problem(lease) is None:
                    out.lease = dict(lease, mtime=mtime(objects[LEASE]))
                    out.runs.add(lease.get("run_id"))
                    ours.add(LEASE)
            except Exception:
                pass  # gone since listed, or not JSON: not a lease of ours (foreign)
        if out.runs and METRICS in objects:
            ours.add(METRICS)
        for key, info in objects.items():
            m = PREFIX.match(key)
            prefix = m.group(0) if m and key.startswith(m.group(0) + "/") else None
            if prefix in named:
                continue
            if prefix in out.intents:
                out.leftovers[prefix] = out.leftovers.get(prefix, 0) + (info.get("size") or 0)
            elif (key not in ours and not key.startswith(".probe-")
                    and not (self.local and PUT_TEMP.fullmatch(key))):
                out.foreign.append(key)
        for prefix in out.intents:  # an intent whose data never arrived is a leftover too
            if prefix not in named:
                out.leftovers.setdefault(prefix, 0)
        out.committed = named
        out.runs.discard(None)
        out.good.sort(key=rank, reverse=True)
        return out

    def owner_problem(self, listing, run_id):
        """Why a run with this id (None: a run not started yet) may not write to remote_dir, or
        None."""
        others = sorted(listing.runs - {run_id})
        if run_id is not None and others:
            return (f"remote_dir {self.url} holds run {others[0]}, this run is {run_id}: one "
                    "remote_dir holds one run; give this run its own remote_dir (or continue run "
                    f"{others[0]} in its own out_dir)")
        if len(others) > 1:
            return (f"remote_dir {self.url} holds more than one run ({', '.join(others)}): give "
                    "this run its own remote_dir")
        if not listing.runs and listing.foreign:
            n = len(listing.foreign)
            return (f"remote_dir {self.url} is not empty and holds no run ({n} other "
                    f"object{'s' * (n > 1)}, e.g. {sorted(listing.foreign)[0]!r}): give this run "
                    "an empty or new remote_dir (a subfolder); nothing of it is touched")
        return None

    # -- writing -----------------------------------------------------------------------------------
    def intent(self, prefix, run_id, attempt, rank=0):
        """Before any data goes under prefix: the record that proves it is this run's (a leftover of
        a killed upload is recognised by it, and deleted by a later start of the run)."""
        self._put_small(f"{prefix}.{rank}{INTENT}", json.dumps(dict(
            format=FORMAT, prefix=prefix, run_id=run_id, attempt=attempt, rank=rank, host=HOST,
            pid=os.getpid())).encode())

    def delete(self, commit, attempt):
        """An intent for its data, then the commit object (the checkpoint is invisible from then
        on), then its data: a failure or a kill midway leaves data that the run's next start
        deletes."""
        self.intent(commit["data"], commit["run_id"], attempt)
        self.fs.rm_file(self.key(commit["name"] + COMMIT))
        self.drop(commit["data"])

    def drop(self, prefix):
        """A data prefix of this run's: its objects, the parts of its unfinished multipart uploads,
        then its intents (last: a kill midway leaves the record that lets the next start finish the
        job)."""
        if self.fs.exists(self.key(prefix)):
            self.fs.rm(self.key(prefix), recursive=True)
        for up in self.unfinished(prefix + "/"):
            self.abort(up["Key"], up["UploadId"])
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        # intents of ours only, by their name
        for key in self.fs.glob(self.key(f"{prefix}.*{INTENT}")):
            if INTENT_NAME.fullmatch(key[len(root):]) and key[len(root):].startswith(prefix + "."):
                self.fs.rm_file(key)

    def clean(self, listing, run_id, attempt):
        """Delete the leftovers of this run's killed uploads: prefixes that an intent of this run,
        written by an earlier start, names and no commit does (and the intents of committed ones).
        Never anything else: not this start's uploads in flight, not another run's."""
        for prefix, intents in listing.intents.items():
            if not all(i["run_id"] == run_id and i["attempt"] != attempt for i in intents):
                continue
            if prefix in listing.committed:
                for i in intents:
                    self.fs.rm_file(self.key(i["key"]))
            else:
                self.drop(prefix)
