"""
The remote copy (docs/remote.md). out_dir is the fast local tier, with every guarantee; remote_dir,
an fsspec URL (s3://bucket/run, gs://..., az://..., file:///mnt/disk/run or an absolute path on
another disk), is the durable one. Every checkpoint that is durable in out_dir is copied there by
one background thread (Uploader; under FSDP one per rank, each copying its own shards), with
metrics.jsonl; a start whose out_dir lacks remote_dir's newest complete checkpoint downloads it
first (Remote.restore), so the same command on a new machine continues the run.

What a run writes in remote_dir, and nothing else:

    ckpt-00000200.pt.commit          JSON: iteration, run id, branch, kind, and the size and CRC-32
                                     of every data object; written last: the checkpoint is complete
    data/00000200-1a2b3c4d.0.intent  JSON: run id, this start's token, rank; written before the data
    data/00000200-1a2b3c4d/...       the data, under a new prefix per upload
    metrics.jsonl                    the run's metrics, copied after each commit
    lease.json                       run id, host, pid; refreshed while the run lives

A run owns what it can prove it wrote: a commit with its run id, or a prefix that an intent of its
own names. Leftovers of a killed upload are found by that intent (and only when an earlier start
wrote it), never by the absence of a commit, so another run's objects, a commit of a format this
code cannot read and unrelated files are never deleted or replaced. A start refuses a remote_dir
that holds another run, or only things that are not a run's. The lease keeps a second live run
out: a start finds it fresh and stops with one line; a lease of a process that ended on this host
is taken over at once, one of another host after `lease` seconds without a refresh (a lost machine).

Credentials, region and endpoint come from each backend's own environment and files (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws/), never from a knob, so they are
never stored in a checkpoint.
"""
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field

from atomicfile import TMP_TAG, atomic_write, fsync_dir, remove_whole, replace_folder, temp_name
from checkpoint import BEST, KEPT_BEST, NAMES, folder_files, rank, scan
from configurator import RunError, first_line, url_problem
from metrics import say

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
PUT_TEMP = re.compile(rf"(.*/)?\.({re.escape(LEASE)}|{re.escape(METRICS)}|ckpt[^/]*{re.escape(COMMIT)}|[^/]*{re.escape(INTENT)})"
                      rf"{re.escape(TMP_TAG)}\d+")
KINDS = ("periodic", "best", "kept")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
# a dead endpoint is found in seconds, not minutes; the Uploader retries by itself (RETRY)
# the payload is not SHA-256 hashed for the signature (a second pass over every byte, also over plain
# http): botocore's CRC checksum on each request and the commit's CRCs guard the bytes
S3_OPTIONS = dict(config_kwargs=dict(connect_timeout=5, read_timeout=60, retries=dict(max_attempts=3, mode="standard"),
                                     s3=dict(payload_signing_enabled=False)))
OTHERS_WAIT = 600.0  # seconds rank 0 waits for the other ranks' shards of a folder before it tries again
RETRY = (2.0, 60.0)  # seconds before a failed upload is tried again: first pause, longest pause
CHUNK = 8 << 20
PART = 16 << 20  # bytes per part of a multipart upload: a 100 MB checkpoint goes up in 7 parallel parts
HOST = socket.gethostname()
LOST = threading.Lock()


class RemoteError(RunError):
    """remote_dir cannot be used, or one of its checkpoints cannot; the message says why in one line."""


def crc_of(fd):
    """(size, CRC-32) of an open file, read with pread (the descriptor's offset is left alone)."""
    crc, size = 0, 0
    while chunk := os.pread(fd, CHUNK, size):
        crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def lower_priority():
    """This thread at nice 19 (Linux's niceness applies per thread): it takes a small share of a CPU
    that training keeps busy, so the copy keeps up without slowing training. Not SCHED_IDLE, as the
    local writer uses: a CPU run leaves no idle time, and the remote copy would never get there."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def is_remote(path):
    """A URL for Remote (s3://, gs://, file://, ...) rather than a local path."""
    return isinstance(path, str) and "://" in path


def open_files(path, mine=lambda name: True):
    """[(name relative to path's folder, descriptor)] for a checkpoint file or each file of a folder
    that `mine` takes, opened now: the Uploader reads these, so local retention may delete the
    checkpoint meanwhile."""
    name = os.path.basename(path)
    if not os.path.isdir(path):
        return [(name, os.open(path, os.O_RDONLY))]
    return [(f"{name}/{f}", os.open(os.path.join(path, f), os.O_RDONLY)) for f in sorted(os.listdir(path))
            if mine(f) and os.path.isfile(os.path.join(path, f))]


def new_prefix(it):
    """A data prefix no upload has used: each upload of a checkpoint gets its own."""
    return f"{DATA}/{it:08d}-{secrets.token_hex(4)}"


def close_files(files):
    for _, fd in files:
        os.close(fd)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def judge_commit(c, name):
    """A commit object read from remote_dir, judged before anything uses it: the commit, or ValueError
    saying what is wrong. Its data prefix must be one of ours and every object a safe relative name
    under a checkpoint's name (its own, or the one it had before it was kept under another), with an
    integer size and CRC."""
    if not isinstance(c, dict) or c.get("format") != FORMAT:
        raise ValueError(f"format {c.get('format') if isinstance(c, dict) else '?'!r}, not {FORMAT}")
    c.setdefault("branch", 0)
    problems = [k for k, ok in (
        ("name", c.get("name") == name), ("iter_num", _is_int(c.get("iter_num"))), ("branch", _is_int(c["branch"])),
        ("kind", c.get("kind") in KINDS), ("data", isinstance(c.get("data"), str) and PREFIX.fullmatch(c["data"])),
        ("run_id", c.get("run_id") is None or isinstance(c.get("run_id"), str)),
        ("val_loss", c.get("val_loss") is None or isinstance(c.get("val_loss"), (int, float))),
        ("objects", isinstance(c.get("objects"), dict) and c["objects"] and all(
            isinstance(rel, str) and NAMES.match(rel.split("/")[0]) and ".." not in rel.split("/")
            and isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)
            for rel, v in c["objects"].items()))) if not ok]
    if problems:
        raise ValueError(f"bad {', '.join(problems)}")
    return c


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


class Remote:
    hold = None  # (attempt, bound): restore() takes the lease with these (connect)
    held = None  # (run_id, attempt, bound) once this process holds the lease
    lost = None  # who took the lease from this process: it copies nothing more

    def __init__(self, url):
        import fsspec
        problem = url_problem(url)
        if problem:
            raise RemoteError(f"remote_dir {url!r} {problem}")
        self.url = url.rstrip("/")
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(S3_OPTIONS if protocol in ("s3", "s3a") else {}))
        except ImportError:
            package = PACKAGES.get(protocol, f"fsspec backend for {protocol}://")
            raise RemoteError(f"remote_dir {url!r} needs the {package} package: pip install {package}") from None
        except ValueError as e:  # a protocol fsspec does not know
            raise RemoteError(f"remote_dir {url!r}: {first_line(e)}") from None
        self.root = root.rstrip("/")
        protocols = [self.fs.protocol] if isinstance(self.fs.protocol, str) else list(self.fs.protocol)
        self.local, self.s3 = "file" in protocols, "s3" in protocols

    def key(self, *parts):
        return "/".join((self.root,) + parts)

    def why(self, e):
        """What to fix, for an error of the backend."""
        text = first_line(e)
        if isinstance(e, PermissionError) and self.local:
            return f"permission denied ({text}): make the folder writable by this user, or pick another"
        if isinstance(e, PermissionError):
            return (f"access refused ({text}): check the credentials (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    f"or ~/.aws/) and that they may put, get, list and delete objects under {self.url} "
                    f"(docs/remote.md, Minimal S3 permissions)")
        if isinstance(e, FileNotFoundError) and not self.local:
            return f"the bucket does not exist ({text}): create it, or fix the name in remote_dir"
        if isinstance(e, (ConnectionError, TimeoutError)) or "connect" in type(e).__name__.lower() or \
                "Could not connect" in text:
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if not self.local else ""
            return (f"cannot reach the storage ({text}): check the network" +
                    (f" and AWS_ENDPOINT_URL={endpoint}" if endpoint else ""))
        return text

    # -- checks ----------------------------------------------------------------------------------
    def probe(self):
        """Every kind of call a run makes, tried now on a small object: put, head, get, list, delete
        and (S3) a multipart upload begun, listed under the run's prefix and aborted. A bucket that
        does not exist, wrong credentials, a missing permission or an unreachable endpoint is found
        in seconds, not at the first upload hours in. Raises RemoteError."""
        probe = self.key(f".probe-{secrets.token_hex(4)}")
        step = "write to"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"probe")
            step = "read from"
            if self.fs.cat_file(probe) != b"probe" or self.fs.info(probe)["size"] != 5:
                raise OSError("the probe object read back other bytes")
            step = "list"
            self.fs.ls(self.root, detail=False)
            if self.s3:  # what cleaning up a killed upload takes: its parts listed and aborted
                from fsspec.asyn import sync
                bucket, _, key = probe.partition("/")
                up = sync(self.fs.loop, self.fs._call_s3, "create_multipart_upload", Bucket=bucket, Key=key)
                self.unfinished(probe[len(self.root) + 1:])
                step = "abort an upload in"
                sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=key,
                     UploadId=up["UploadId"])
            step = "delete in"
            self.fs.rm_file(probe)
        except Exception as e:
            raise RemoteError(f"cannot {step} remote_dir {self.url}: {self.why(e)}") from None

    def probe_read(self):
        try:
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            raise RemoteError(f"no checkpoint in remote_dir {self.url} (nothing is there)") from None
        except Exception as e:
            raise RemoteError(f"cannot list remote_dir {self.url}: {self.why(e)}") from None

    # -- what is there -------------------------------------------------------------------------
    def _objects(self):
        """{key below root: info} of everything under remote_dir, listed afresh."""
        self.fs.invalidate_cache()
        if self.local and not os.path.isdir(self.root):
            return {}
        if self.s3:  # one listing under the prefix: find() would also HEAD the prefix's own key, which a
            from fsspec.asyn import sync  # policy scoped to the prefix (docs/remote.md) refuses
            found = {e["name"]: e for e in sync(self.fs.loop, self.fs._lsdir, self.root, delimiter="")
                     if e.get("type") == "file"}
        else:
            found = self.fs.find(self.root, detail=True)
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return {k[len(root):]: v for k, v in found.items() if k.startswith(root)}

    def _read_json(self, key):
        return json.loads(self.fs.cat_file(self.key(key)))

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
                                                      f"{got} bytes, its commit says {c['objects'][rel][0]}")))
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
                    isinstance(intent.get("run_id"), str) and isinstance(intent.get("attempt"), str)):
                continue
            intent["key"] = key
            out.intents.setdefault(intent["prefix"], []).append(intent)
            out.runs.add(intent["run_id"])
            ours.add(key)
        if LEASE in objects:
            try:
                lease = self._read_json(LEASE)
                if isinstance(lease, dict) and isinstance(lease.get("attempt"), str):
                    out.lease = dict(lease, mtime=mtime(objects[LEASE]))
                    out.runs.add(lease.get("run_id"))
                    ours.add(LEASE)
            except FileNotFoundError:
                pass
            except Exception:
                pass  # not a lease of ours: foreign
        if out.runs and METRICS in objects:
            ours.add(METRICS)
        for key, info in objects.items():
            m = PREFIX.match(key)
            prefix = m.group(0) if m and key.startswith(m.group(0) + "/") else None
            if prefix in named:
                continue
            if prefix in out.intents:
                out.leftovers[prefix] = out.leftovers.get(prefix, 0) + (info.get("size") or 0)
            elif key not in ours and not key.startswith(".probe-") and not (self.local and PUT_TEMP.fullmatch(key)):
                out.foreign.append(key)
        for prefix in out.intents:  # an intent whose data never arrived is a leftover too
            if prefix not in named:
                out.leftovers.setdefault(prefix, 0)
        out.committed = named
        out.runs.discard(None)
        out.good.sort(key=rank, reverse=True)
        return out

    def owner_problem(self, listing, run_id):
        """Why a run with this id (None: a run not started yet) may not write to remote_dir, or None."""
        others = sorted(listing.runs - {run_id})
        if run_id is not None and others:
            return (f"remote_dir {self.url} holds run {others[0]}, this run is {run_id}: one remote_dir "
                    f"holds one run; give this run its own remote_dir (or continue run {others[0]} in its own "
                    f"out_dir)")
        if len(others) > 1:
            return (f"remote_dir {self.url} holds more than one run ({', '.join(others)}): give this run its "
                    f"own remote_dir")
        if not listing.runs and listing.foreign:
            n = len(listing.foreign)
            return (f"remote_dir {self.url} is not empty and holds no run ({n} other object{'s' * (n > 1)}, "
                    f"e.g. {sorted(listing.foreign)[0]!r}): give this run an empty or new remote_dir (a "
                    f"subfolder); nothing of it is touched")
        return None

    # -- the lease: one live writer --------------------------------------------------------------
    def now(self):
        """The store's clock, as the modification time of an object written now: a lease's age is
        then read on one clock, whatever the machines' clocks say."""
        key = self.key(f".probe-{secrets.token_hex(4)}")
        self.fs.pipe_file(key, b"clock")
        try:
            return mtime(self.fs.info(key))
        finally:
            self.fs.rm_file(key)

    def take_lease(self, run_id, attempt, bound, log=say):
        """Hold remote_dir for this process: refuse it (RemoteError) when it holds another run, or
        while another live process holds it. A lease of this host's process that has ended is taken
        over at once; another host's after its bound without a refresh (a lost machine), waiting for
        that when it is this very run (a re-queued job on a new machine). Once held, a thread rewrites
        it every bound/4 seconds (again with this run id, when a new run learns its own)."""
        mine = lease_record(run_id, attempt, bound)
        try:
            waited = False
            while True:
                listing = self.checkpoints()
                problem = self.owner_problem(listing, run_id)
                if problem:
                    raise RemoteError(problem)
                lease = listing.lease
                if lease is None or lease.get("attempt") == attempt:
                    break
                age = self.now() - lease["mtime"]
                lapse = lease["bound"] if isinstance(lease.get("bound"), (int, float)) else bound  # the holder's
                who = (f"run {lease.get('run_id')} (host {lease.get('host')}, pid {lease.get('pid')}, refreshed "
                       f"{age:.0f}s ago)")
                if age > lapse:
                    log(f"note: taking over remote_dir's lease of {who}: not refreshed for longer than "
                        f"its remote_lease={lapse:g}s, so its machine is taken for lost")
                    break
                if lease.get("host") == HOST and not alive(lease.get("pid")):
                    break  # a process of this host that has ended (killed): nothing else writes
                if lease.get("run_id") != run_id or waited:
                    raise RemoteError(f"remote_dir {self.url} is in use by {who}: one live run writes to a "
                                      f"remote_dir; stop that one, or give this run its own remote_dir"
                                      + (" (a lost machine's lease lapses remote_lease seconds after its "
                                         "last refresh)" if lease.get("run_id") == run_id else ""))
                log(f"note: remote_dir is held by this run's process on host {lease.get('host')} (pid "
                    f"{lease.get('pid')}, refreshed {age:.0f}s ago); waiting up to {lapse - age + 1:.0f}s for it "
                    f"to lapse, as a lost machine's does")
                seen = lease["mtime"]
                deadline = time.time() + lapse - age + 1
                while time.time() < deadline:
                    time.sleep(min(2.0, lapse / 8))
                    now = self.checkpoints().lease
                    if now is None or now["mtime"] != seen:
                        break
                waited = True
            self._put_small(LEASE, mine)
            first, self.held = self.held is None, (run_id, attempt, bound)
            if first:
                threading.Thread(target=self._keep_lease, name="remote-lease", daemon=True).start()
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"cannot take remote_dir's lease ({self.url}): {self.why(e)}") from None

    def check_lease(self):
        """Who took the lease from this process (one line, said once as a warning), or None while it
        holds it (or holds none). Raises what the backend raises."""
        held = self.held
        if held is None or self.lost is not None:
            return self.lost
        try:
            lease = self._read_json(LEASE)
        except FileNotFoundError:
            lease = "nobody (its lease.json was deleted)"
        with LOST:  # (the uploader and the lease's thread both ask)
            if self.lost is not None or (isinstance(lease, dict) and lease.get("attempt") == held[1]):
                return self.lost
            self.lost = (f"run {lease.get('run_id')} on host {lease.get('host')} (pid {lease.get('pid')})"
                         if isinstance(lease, dict) else str(lease))
            say(f"warning: remote_dir {self.url} was taken over by {self.lost}: this process copies nothing "
                f"more there (its checkpoints stay in out_dir)", err=True)
            return self.lost

    def _keep_lease(self):
        """Rewrite the lease every quarter of its bound while this process holds it. A store that
        cannot be reached is the uploader's outage to report; tried again next round."""
        while self.held is not None and self.lost is None:
            time.sleep(self.held[2] / 4)
            try:
                if self.held is not None and self.check_lease() is None:
                    self._put_small(LEASE, lease_record(*self.held))
            except Exception:
                pass

    def release(self, reachable=True):
        """Give the lease up at the end of the run (only while it is still this process's). A failure,
        or a store known unreachable, costs nothing: the lease lapses by itself after its bound."""
        held, self.held = self.held, None
        if held is None or not reachable or self.lost is not None:
            return
        try:
            lease = self._read_json(LEASE)
            if isinstance(lease, dict) and lease.get("attempt") == held[1]:
                self.fs.rm_file(self.key(LEASE))
        except Exception:
            pass

    # -- writing -----------------------------------------------------------------------------------
    def intent(self, prefix, run_id, attempt, rank=0):
        """Before any data goes under prefix: the record that proves it is this run's (a leftover of
        a killed upload is recognised by it, and deleted by a later start of the run)."""
        self._put_small(f"{prefix}.{rank}{INTENT}", json.dumps(dict(
            format=FORMAT, prefix=prefix, run_id=run_id, attempt=attempt, rank=rank, host=HOST,
            pid=os.getpid())).encode())

    def upload(self, files, header, attempt, prefix=None, others=None, abandon=lambda: False):
        """Copy one checkpoint ([(relative name, open descriptor)], see open_files) under a new data
        prefix (or `prefix`), check each object's size there, then write its commit object (header:
        iter_num, run_id, branch, kind, val_loss). others: {relative name: [size, crc]} of objects
        other ranks upload under the same prefix (a folder's shards): the commit waits until they
        are all there, unless abandon() says a newer checkpoint is waiting. A commit it replaces is
        this run's and branch's (its data is then deleted), or another branch's ckpt.pt (kept under
        KEPT_BEST's name); anything else is refused. Returns the commit. Raises what the backend
        raises; nothing is visible until the commit is written."""
        name = files[0][0].split("/")[0]
        prefix = prefix or new_prefix(header["iter_num"])
        self.intent(prefix, header["run_id"], attempt)
        objects = self.put_objects(files, prefix)
        deadline = time.time() + OTHERS_WAIT
        for rel, (size, crc) in (others or {}).items():
            while True:
                try:
                    if self.fs.info(self.key(prefix, rel), refresh=True)["size"] == size:
                        break
                except FileNotFoundError:
                    pass
                if abandon() or time.time() > deadline:
                    raise OSError(f"{rel}, another rank's part, did not arrive")
                time.sleep(0.5)
            objects[rel] = [size, crc]
        try:
            old = self.read_commit(name)
        except FileNotFoundError:
            old = None
        except ValueError:
            raise RemoteError(f"remote_dir's {name}{COMMIT} is not a commit of this run's format; it is left "
                              f"as it is and {name} is not copied") from None
        if old is not None and old["run_id"] not in (header["run_id"], None):
            raise RemoteError(f"remote_dir's {name} belongs to run {old['run_id']}, not this run "
                              f"({header['run_id']}); it is not written over")
        if old is not None and old["branch"] != header["branch"] and name == BEST:
            kept = KEPT_BEST.format(old["branch"], old["iter_num"])
            self._put_small(kept + COMMIT, json.dumps(dict(old, name=kept, kind="kept")).encode())
            old = None  # its data is named by the kept commit now
        commit = dict(format=FORMAT, name=name, data=prefix, objects=objects, written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      **{k: header.get(k) for k in ("iter_num", "run_id", "branch", "kind", "val_loss")})
        if old is not None and old["data"] != prefix:  # once replaced, only an intent proves its data ours
            self.intent(old["data"], header["run_id"], attempt)
        self._put_small(name + COMMIT, json.dumps(commit).encode())
        ranks = {0} | {int(m.group(1)) for rel in (others or {}) if (m := re.search(r"/__(\d+)_", rel))}
        for r in ranks:  # the commit proves the data ours from now on (names known: no listing needed)
            try:
                self.fs.rm_file(self.key(f"{prefix}.{r}{INTENT}"))
            except FileNotFoundError:
                pass
        if old is not None and old["data"] != prefix:
            self.drop(old["data"])
        return commit

    def put_objects(self, files, prefix):
        """The files under prefix, each one's size checked there: {relative name: [size, crc]}."""
        objects = {}
        for rel, fd in files:
            size, crc = crc_of(fd)
            key = self.key(prefix, rel)
            source = f"/proc/self/fd/{fd}"  # the very file opened at push time, even if deleted since
            if self.local:
                os.makedirs(os.path.dirname(key), exist_ok=True)
                with open(source, "rb") as src:
                    atomic_write(key, lambda f: shutil.copyfileobj(src, f, CHUNK))
            else:  # s3fs: a multipart upload over PART, parts in parallel
                self.fs.put_file(source, key, chunksize=max(PART, -(-size // 10_000)))  # (S3 takes 10,000 parts)
            got = self.fs.info(key)["size"]
            if got != size:
                raise OSError(f"{rel}: {got} bytes arrived of {size}")
            objects[rel] = [size, crc]
        return objects

    def _put_small(self, name, data):
        """One small object, whole or absent: a PUT is atomic on an object store; a file is renamed in."""
        key = self.key(name)
        if self.local:
            os.makedirs(os.path.dirname(key), exist_ok=True)
            atomic_write(key, lambda f: f.write(data))
        else:
            self.fs.pipe_file(key, data)

    def delete(self, commit, attempt):
        """An intent for its data, then the commit object (the checkpoint is invisible from then on),
        then its data: a failure or a kill midway leaves data that the run's next start deletes."""
        self.intent(commit["data"], commit["run_id"], attempt)
        self.fs.rm_file(self.key(commit["name"] + COMMIT))
        self.drop(commit["data"])

    def drop(self, prefix):
        """A data prefix of this run's: its objects, the parts of its unfinished multipart uploads, then
        its intents (last: a kill midway leaves the record that lets the next start finish the job)."""
        if self.fs.exists(self.key(prefix)):
            self.fs.rm(self.key(prefix), recursive=True)
        for up in self.unfinished(prefix + "/"):
            from fsspec.asyn import sync
            sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload", Bucket=self.root.split("/")[0],
                 Key=up["Key"], UploadId=up["UploadId"])
        for key in self.fs.glob(self.key(f"{prefix}.*{INTENT}")):
            self.fs.rm_file(key)

    def unfinished(self, below):
        """S3's unfinished multipart uploads whose keys start with remote_dir/below, every page of
        them (none elsewhere). Asked with that prefix only: a policy may allow no wider listing."""
        if not self.s3:
            return []
        from fsspec.asyn import sync
        bucket, _, path = self.root.partition("/")
        ask, found = dict(Bucket=bucket, Prefix=f"{path}/{below}" if path else below), []
        while True:
            page = sync(self.fs.loop, self.fs._call_s3, "list_multipart_uploads", **ask)
            found += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return found
            ask.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))

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

    def copy_metrics(self, out_dir):
        """metrics.jsonl up to its last whole line (a row may be half-written while it is read)."""
        try:
            with open(os.path.join(out_dir, METRICS), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        self._put_small(METRICS, data[:data.rfind(b"\n") + 1])

    # -- reading -----------------------------------------------------------------------------------
    def download(self, commit, dest_dir):
        """The checkpoint of `commit` into dest_dir under its name, each object's size and CRC checked
        first: whole, or not there at all. Returns its path. Raises RemoteError."""
        name = commit["name"]
        final = os.path.join(dest_dir, name)
        tmp = temp_name(final)  # a temporary: never read, removed at the next start (atomicfile.recover)
        folder = any("/" in rel for rel in commit["objects"])
        try:
            for rel, (size, crc) in commit["objects"].items():
                local = os.path.join(tmp, rel.split("/", 1)[1]) if folder else tmp
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    got = self._get(self.key(commit["data"], rel), fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if got != (size, crc):
                    raise RemoteError(damage(rel, got, size, crc))
            if folder:
                fsync_dir(tmp)
                replace_folder(tmp, final)
            else:
                os.replace(tmp, final)
                fsync_dir(dest_dir)
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"could not download {name} from remote_dir: {self.why(e)}") from None
        finally:
            if os.path.lexists(tmp):
                remove_whole(tmp)
        return final

    def verify(self, commit):
        """Each object of a commit read back and its size and CRC compared: None, or what is wrong."""
        for rel, (size, crc) in commit["objects"].items():
            got, n = 0, 0
            with self.fs.open(self.key(commit["data"], rel), "rb") as src:
                while chunk := src.read(CHUNK):
                    got, n = zlib.crc32(chunk, got), n + len(chunk)
            if (n, got) != (size, crc):
                return damage(rel, (n, got), size, crc)
        return None

    def _get(self, key, fd, size):
        """An object into an open file. Returns (bytes, CRC-32) of what arrived, counted as it arrives
        (no second pass over the file). From an object store it comes in PART-sized ranges fetched in
        parallel (one GET stream is slower than a multipart upload's parts), each sent on its way to
        the disk once counted, so the fsync after it is short."""
        if self.local or size <= PART:
            crc, n = 0, 0
            with self.fs.open(key, "rb") as src:
                while chunk := src.read(CHUNK):
                    os.write(fd, chunk)
                    crc, n = zlib.crc32(chunk, crc), n + len(chunk)
            return n, crc
        import asyncio
        from fsspec.asyn import sync
        os.ftruncate(fd, size)
        gate, early, counted = asyncio.Semaphore(8), {}, [0, 0]  # parts ahead of the count; [bytes, CRC] so far

        async def part(start):
            async with gate:
                data = await self.fs._cat_file(key, start=start, end=min(start + PART, size))
            os.pwrite(fd, data, start)
            early[start] = data
            while counted[0] in early:  # the CRC runs over the parts in order
                data = early.pop(counted[0])
                counted[1] = zlib.crc32(data, counted[1])
                os.posix_fadvise(fd, counted[0], len(data), os.POSIX_FADV_DONTNEED)  # (starts its writeback)
                counted[0] += len(data)

        async def every_part():
            await asyncio.gather(*(part(start) for start in range(0, size, PART)))

        sync(self.fs.loop, every_part)
        return tuple(counted)

    def restore(self, out_dir, log=say):
        """At start, out_dir held (checkpointer.claim): remote_dir judged first (RemoteError when it
        holds another run than out_dir, several runs, or only things that are no run's); then, when
        its newest complete checkpoint is newer than anything readable in out_dir, or out_dir has
        none, download it (metrics.jsonl too, when out_dir has none), so the resume that follows
        continues from it. A damaged one is skipped with one line, and the previous complete one
        tried. Returns the path downloaded, or None."""
        listing = self.checkpoints()
        heads, _ = scan(out_dir)
        local = heads[0] if heads else None
        problem = self.owner_problem(listing, local["run_id"] if local else None)
        if problem:
            raise RemoteError(problem)
        if self.hold is not None:  # before anything is downloaded: a second live run stops here
            self.take_lease(local["run_id"] if local else next(iter(listing.runs), None), *self.hold, log=log)
        for name, why in listing.bad:
            say(f"warning: remote_dir's {name} is not complete ({why}); not used", err=True)
        good = listing.good
        for i, c in enumerate(good):
            if local is not None and rank(c) <= rank(local):
                return None
            t0 = time.time()
            try:
                path = self.download(c, out_dir)
            except RemoteError as e:
                nxt = f"trying {good[i + 1]['name']}" if i + 1 < len(good) else "no older complete one left"
                say(f"warning: skipping remote_dir's {c['name']}: {e}; {nxt}", err=True)
                continue
            mb = sum(size for size, _ in c["objects"].values()) / 2**20
            log(f"downloaded {c['name']} (iteration {c['iter_num']}, {mb:.1f} MB in {time.time() - t0:.1f}s) from "
                f"{self.url}: " + ("out_dir had no checkpoint" if local is None else
                                   f"newer than out_dir's {os.path.basename(local['path'])}"))
            if not os.path.exists(os.path.join(out_dir, METRICS)):
                try:  # whole or absent, as every file in out_dir
                    data = self.fs.cat_file(self.key(METRICS))
                    atomic_write(os.path.join(out_dir, METRICS), lambda f: f.write(data))
                except FileNotFoundError:
                    pass
                except Exception as e:  # the checkpoint is what matters; the curve starts afresh
                    say(f"warning: could not download remote_dir's {METRICS} ({self.why(e)})", err=True)
            return path
        return None

    def fetch(self, which="best", log=say):
        """A local folder holding one checkpoint of remote_dir, for sample.py and export.py: ckpt.pt
        (which='best', or the newest complete one when there is none), the newest complete one
        ('latest'), or the one of that name. Kept in a cache folder (XDG_CACHE_HOME or ~/.cache) and
        downloaded only when remote_dir's commit differs from the cached one. Raises RemoteError."""
        self.probe_read()
        listing = self.checkpoints()
        good, bad = listing.good, listing.bad
        if not good:
            why = f" ({bad[0][0]}: {bad[0][1]})" if bad else ""
            raise RemoteError(f"no complete checkpoint in remote_dir {self.url}{why}")
        if which in ("best", "latest"):
            best = [c for c in good if c["name"] == BEST]
            pick = best[0] if which == "best" and best else good[0]
        else:
            pick = next((c for c in good if c["name"] == which), None)
            if pick is None:
                raise RemoteError(f"remote_dir {self.url} has no complete checkpoint named {which!r}")
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanogpt-remote",
                             hashlib.blake2b(self.url.encode(), digest_size=8).hexdigest())
        try:
            os.makedirs(cache, exist_ok=True)
            marker = os.path.join(cache, pick["name"] + COMMIT)
            try:
                with open(marker) as f:
                    fresh = json.load(f).get("data") == pick["data"] and os.path.exists(os.path.join(cache, pick["name"]))
            except (OSError, ValueError):
                fresh = False
            for other in os.listdir(cache):  # one checkpoint in the folder: the one asked for
                if other != pick["name"] and NAMES.match(other):
                    remove_whole(os.path.join(cache, other))
            if not fresh:
                log(f"downloading {pick['name']} (iteration {pick['iter_num']}) from {self.url} into {cache}")
                self.download(pick, cache)
                atomic_write(marker, lambda f: f.write(json.dumps(pick).encode()))
        except OSError as e:
            raise RemoteError(f"cannot use the cache folder {cache} ({first_line(e)}): set XDG_CACHE_HOME to a "
                              f"writable folder") from None
        return cache


def damage(rel, got, size, crc):
    what = f"{got[0]} bytes" if got[0] != size else f"CRC-32 {got[1]:08x}"
    theirs = f"{size} bytes" if got[0] != size else f"{crc:08x}"
    return f"{rel} in remote_dir is damaged ({what}, its commit says {theirs})"


def mtime(info):
    """An object's modification time (seconds) from fsspec's info: local files and S3 name it apart."""
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def lease_record(run_id, attempt, bound):
    """The lease's bytes: who holds remote_dir, and after how long without a refresh it lapses."""
    return json.dumps(dict(format=FORMAT, run_id=run_id, attempt=attempt, host=HOST, pid=os.getpid(),
                           bound=bound, written=time.strftime("%Y-%m-%dT%H:%M:%S%z"))).encode()


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or no pid: taken as alive
    return True


def connect(url, out_dir, attempt, bound):
    """A checked Remote for train.py (probe), or RemoteError: a backend that is not installed, a
    wrong bucket, credentials, permission or endpoint, or remote_dir being out_dir itself. attempt,
    bound: this start's token and remote_lease, for the lease that restore() takes."""
    remote = Remote(url)
    remote.hold = (attempt, bound)
    if remote.local and os.path.realpath(remote.root) == os.path.realpath(out_dir):
        raise RemoteError(f"remote_dir {url!r} is out_dir itself: the durable copy must be elsewhere")
    remote.probe()
    problem = remote.owner_problem(remote.checkpoints(), None)  # (out_dir's run is judged once it is held)
    if problem:
        raise RemoteError(problem)
    return remote


class Uploader:
    """One background thread that copies every checkpoint made durable in out_dir to remote_dir,
    oldest first; a newer checkpoint of the same kind waiting behind it replaces an older one still
    waiting (keep_every's are all copied). A failure is one warning line for the whole outage, then
    retries with backoff (RETRY) while training goes on; the first success after it says so. After
    each periodic commit, remote retention: this run's and branch's periodic checkpoints beyond the
    newest keep_last (and not kept by keep_every) are deleted. Runs on rank 0, and under FSDP on
    every rank: a folder's shards go up from the rank that wrote them (rank r: __r_*.distcp), under
    the prefix rank 0 picked, and rank 0 writes the commit once they are all there.

    attempt: this start's token, the same on every rank (intents carry it, so that the leftovers of
    an earlier start are told from this start's uploads in flight). On rank 0 the remote holds the
    lease (Remote.take_lease): one found taken stops this process's copying with one line."""

    def __init__(self, remote, out_dir, *, run_id, branch, keep_last, keep_every, attempt, rank=0, log=say):
        self.remote, self.out_dir, self.run_id, self.branch = remote, out_dir, run_id, branch
        self.keep_last, self.keep_every, self.rank, self.log = keep_last, keep_every, rank, log
        self.attempt = attempt
        self.cv = threading.Condition()
        self.queue, self.current = [], None  # jobs: dict(header, files)
        self.newest = None  # header of the newest checkpoint handed over
        self.done = None  # header of the newest checkpoint complete in remote_dir
        self.outage, self.pause = None, RETRY[0]
        self.warned = set()  # retention and metrics warnings said once each
        self.seconds = 0.0  # the last upload's duration: time_limit leaves room for one
        if not remote.local:  # fsspec's I/O thread (the requests) at the same low priority
            from fsspec.asyn import sync

            async def low():
                lower_priority()
            sync(remote.fs.loop, low)
        threading.Thread(target=self._run, name="remote-upload", daemon=True).start()  # (a daemon: never holds up an exit)

    def new_prefix(self, it):
        return new_prefix(it)

    def push(self, path, header, prefix=None):
        """Hand over a checkpoint just made durable (its files are opened now). prefix: a folder's data
        prefix, the same on every rank, each rank copying its own files of it."""
        header = dict(header, name=os.path.basename(path))
        others = None
        if prefix is None:
            files = open_files(path)
        else:
            def mine(f):
                return f.startswith(f"__{self.rank}_") or (self.rank == 0 and not f.startswith("__"))
            files = open_files(path, mine)
            try:
                if self.rank == 0:  # state.pt names every rank's file with its size and CRC
                    others = {f"{header['name']}/{f}": list(v) for f, v in folder_files(path).items()
                              if not mine(f)}
            except BaseException:
                close_files(files)
                raise
        job = dict(header=header, files=files, prefix=prefix, others=others)
        with self.cv:
            for old in [j for j in self.queue if self._replaces(job, j)]:
                self.queue.remove(old)
                close_files(old["files"])
            self.queue.append(job)
            if self.newest is None or rank(header) >= rank(self.newest):
                self.newest = header
            self.cv.notify_all()

    def _replaces(self, new, old):
        a, b = new["header"], old["header"]
        if a["kind"] != b["kind"]:
            return False
        kept = self.keep_every and b["kind"] == "periodic" and b["iter_num"] % self.keep_every == 0
        return not kept

    def _run(self):
        lower_priority()  # its CRCs (the network I/O is fsspec's thread)
        first = True
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                self.current = job = self.queue.pop(0)
            try:
                t0 = time.time()
                if self.rank:  # a folder's shards of this rank; rank 0 commits them
                    self.remote.intent(job["prefix"], self.run_id, self.attempt, self.rank)
                    self.remote.put_objects(job["files"], job["prefix"])
                else:
                    if self.remote.check_lease() is not None:
                        raise RemoteError(f"remote_dir was taken over by {self.remote.lost}")
                    if first:  # an earlier start's leftovers, once, before the first new data
                        self.remote.clean(self.remote.checkpoints(), self.run_id, self.attempt)
                        first = False
                    self.remote.upload(job["files"], job["header"], self.attempt, job["prefix"], job["others"],
                                       abandon=lambda: any(self._replaces(j, job) for j in self.queue))
                self.seconds = time.time() - t0
            except Exception as e:
                with self.cv:
                    if self.remote.lost is not None:  # nothing more is copied: every job is dropped
                        for j in [job] + self.queue:
                            close_files(j["files"])
                        self.queue.clear()
                        self.current = None
                        self.cv.notify_all()
                        continue
                    if self.outage is None:
                        self.outage = first_line(e) if isinstance(e, RemoteError) else self.remote.why(e)
                        say(f"warning: could not copy {job['header']['name']} to remote_dir {self.remote.url} "
                            f"({self.outage}); training goes on, retrying in the background (said once until it works)",
                            err=True)
                    if any(self._replaces(j, job) for j in self.queue):
                        close_files(job["files"])  # a newer one is waiting: copy that instead
                    else:
                        self.queue.insert(0, job)
                    self.current = None
                    self.cv.notify_all()
                    self.cv.wait(timeout=self.pause)
                    self.pause = min(2 * self.pause, RETRY[1])
                continue
            close_files(job["files"])
            with self.cv:
                if self.outage is not None:
                    self.log(f"remote_dir reachable again: {job['header']['name']} copied")
                self.outage, self.pause = None, RETRY[0]
                if self.done is None or rank(job["header"]) >= rank(self.done):
                    self.done = job["header"]
            if not self.rank:  # the copy is complete: what follows is housekeeping, its failure a warning
                self._after(job["header"])
            with self.cv:
                self.current = None
                self.cv.notify_all()

    def _after(self, header):
        """Remote retention and metrics.jsonl after a commit. A failure is one warning (said once per
        kind) and is tried again after the next commit; it never makes the checkpoint go up again."""
        for what, step in (("apply keep_last in", lambda: self._retain(header)),
                           (f"copy {METRICS} to", lambda: self.remote.copy_metrics(self.out_dir))):
            try:
                step()
            except Exception as e:
                if what not in self.warned:
                    self.warned.add(what)
                    say(f"warning: could not {what} remote_dir {self.remote.url} ({self.remote.why(e)}); "
                        f"tried again after the next copy", err=True)

    def _retain(self, newest):
        if newest["kind"] != "periodic":
            return
        mine = [c for c in self.remote.checkpoints().good if c["kind"] == "periodic" and
                c["run_id"] == self.run_id and c["branch"] == self.branch and
                not (self.keep_every and c["iter_num"] % self.keep_every == 0)]
        for c in mine[self.keep_last:]:
            if rank(c) < rank(newest):
                self.remote.delete(c, self.attempt)

    def finish(self, bound, interrupted=lambda: False):
        """At the end of a run or at a stop: wait up to `bound` seconds for what is waiting or in flight
        (less if interrupted() turns true: a stop signal), then give the lease up. Returns (True,
        line) when the newest checkpoint handed over is complete in remote_dir, else (False, line)
        saying what is lost if this machine is."""
        deadline = time.time() + bound
        cut = False
        with self.cv:
            if self.queue or self.current:
                self.log(f"waiting up to {bound:g}s (remote_wait) for the copy to remote_dir")
            while (self.queue or self.current) and time.time() < deadline:
                if interrupted():
                    cut = True
                    break
                self.cv.wait(timeout=max(0.01, min(0.5, deadline - time.time())))
            newest, done = self.newest, self.done
        if not self.rank:
            self.remote.release(reachable=self.outage is None)
        if newest is None:
            return True, None
        if done is not None and rank(done) >= rank(newest):
            return True, f"remote_dir {self.remote.url} holds the newest checkpoint ({newest['name']}, iteration {newest['iter_num']})"
        why = f" ({self.outage})" if self.outage else f" (taken over by {self.remote.lost})" if self.remote.lost else ""
        has = f"its newest complete one is {done['name']} (iteration {done['iter_num']})" if done else \
            "it has nothing of this process's"
        when = "the wait was cut short by a signal" if cut else f"within remote_wait={bound:g}s"
        return False, (f"warning: {newest['name']} (iteration {newest['iter_num']}) did not reach remote_dir "
                       f"{self.remote.url} {when}{why}; it is in out_dir only, and {has}")


def catch_up(remote, out_dir, *, run_id, branch, attempt, keep_last, keep_every, wait, log=say):
    """A run found complete at its start (train.py exits before it builds an Uploader): its newest
    periodic checkpoint and ckpt.pt, durable in out_dir, may never have reached remote_dir (a kill
    during their upload). Copy those the remote lacks (an earlier start's leftovers are cleaned
    first, as at every start), wait up to `wait` seconds, say so, and give the lease up."""
    up = Uploader(remote, out_dir, run_id=run_id, branch=branch, keep_last=keep_last, keep_every=keep_every,
                  attempt=attempt, log=log)
    have = {c["name"]: c for c in remote.checkpoints().good}
    heads = [h for h in scan(out_dir)[0] if h["run_id"] in (run_id, None) and h["branch"] == branch]
    for kind in ("periodic", "best"):
        h = next((h for h in heads if h["kind"] == kind), None)  # (newest first)
        name = h and os.path.basename(h["path"])
        if h is not None and (name not in have or rank(have[name]) < rank(h)):
            up.push(h["path"], dict(iter_num=h["iter_num"], run_id=run_id, branch=branch, kind=kind,
                                    val_loss=h["val_loss"]))
    if up.newest is None:  # nothing to copy: the leftovers are still this start's to clean
        try:
            remote.clean(remote.checkpoints(), run_id, attempt)
        except Exception as e:
            say(f"warning: could not clean remote_dir {remote.url} ({remote.why(e)})", err=True)
    ok, line = up.finish(wait)
    if line:
        log(line) if ok else say(line, err=True)


def describe(url, verify=False):
    """checkpoint.py's listing of a remote_dir: one line per checkpoint, complete or not and why, the
    leftovers of killed uploads and what is not a run's. verify: every object of the complete ones
    read back and its CRC checked. Returns (lines, whether every checkpoint is complete and sound)."""
    remote = Remote(url)
    remote.probe_read()
    listing = remote.checkpoints()
    if not listing.good and not listing.bad and not listing.leftovers and not listing.foreign:
        raise RemoteError(f"no checkpoint in remote_dir {url!r}")
    ok = not listing.bad
    lines = [f"{'checkpoint (newest first)':<26} {'branch':>6} {'iter':>8} {'val loss':>9} {'size':>12}  {'written':<24}  status"]
    for c in listing.good:
        val = f"{c['val_loss']:.4f}" if isinstance(c.get("val_loss"), float) else "-"
        mb = sum(size for size, _ in c["objects"].values()) / 2**20
        status = "complete"
        if verify:
            try:
                problem = remote.verify(c)
            except Exception as e:
                problem = f"cannot be read ({remote.why(e)})"
            status = f"BAD: {problem}" if problem else "complete, every CRC checked"
            ok = ok and problem is None
        lines.append(f"{c['name']:<26} {c['branch']:>6} {c['iter_num']:>8} {val:>9} {mb:9.1f} MB  "
                     f"{c.get('written', '?'):<24}  {status}")
    for name, why in listing.bad:
        lines.append(f"{name:<26} {'-':>6} {'-':>8} {'-':>9} {'-':>12}  {'-':<24}  INCOMPLETE: {why}")
    for prefix, size in sorted(listing.leftovers.items()):
        lines.append(f"{prefix:<26} {'-':>6} {'-':>8} {'-':>9} {size / 2**20:9.1f} MB  {'-':<24}  no commit object: an "
                     f"upload in progress or killed (removed by the run's next start)")
    for key in sorted(listing.foreign)[:20]:
        lines.append(f"{key:<26} {'-':>6} {'-':>8} {'-':>9} {'-':>12}  {'-':<24}  not ours: never touched")
    if len(listing.foreign) > 20:
        lines.append(f"... and {len(listing.foreign) - 20} more objects that are not ours")
    return lines, ok
