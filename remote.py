"""
The remote copy (docs/remote.md). out_dir is the fast local tier, with
every guarantee; remote_dir, an fsspec URL (s3://bucket/run, gs://..., az://..., file:///mnt/disk/run
or a plain path on another disk), is the durable one. Every checkpoint that is durable in out_dir
is copied there by one background thread (Uploader; under FSDP one per rank, each copying its own
shards), with metrics.jsonl; a start whose out_dir lacks
remote_dir's newest complete checkpoint downloads it first (Remote.restore), so the same command on
a new machine continues the run.

Object stores have no rename, so a remote checkpoint is made complete by a commit object written
after all of its data:

    remote_dir/ckpt-00000200.pt.commit      JSON: iteration, run id, branch, kind, and the size and
                                            CRC-32 of every data object; written last
    remote_dir/data/00000200-1a2b3c4d/...   the data: the file (ckpt-00000200.pt) or each file of a
                                            folder (ckpt-00000200/state.pt, ...), under a new prefix
    remote_dir/metrics.jsonl                the run's metrics, copied after each commit

Each upload writes under a new prefix, so replacing ckpt.pt never touches the bytes an older commit
names; a prefix that no commit names is a killed upload's, and is deleted when the next run with
this remote_dir starts. A download checks each object's size and CRC against its commit before the
checkpoint appears in out_dir, whole or not at all. One run writes to a remote_dir at a time, as to
an out_dir (whose lock cannot reach another machine).

Credentials, region and endpoint come from each backend's own environment and files (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws/), never from a knob, so they are
never stored in a checkpoint.
"""
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
import zlib

from atomicfile import atomic_write, fsync_dir, remove_whole, replace_folder, temp_name
from checkpoint import BEST, NAMES, folder_files, rank, scan
from configurator import RunError, first_line
from metrics import say

COMMIT = ".commit"
DATA = "data"
METRICS = "metrics.jsonl"
FORMAT = 1
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


class Remote:
    def __init__(self, url):
        import fsspec
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
        self.local = "file" in ([self.fs.protocol] if isinstance(self.fs.protocol, str) else list(self.fs.protocol))

    def key(self, *parts):
        return "/".join((self.root,) + parts)

    def why(self, e):
        """What to fix, for an error of the backend."""
        text = first_line(e)
        if isinstance(e, PermissionError) and self.local:
            return f"permission denied ({text}): make the folder writable by this user, or pick another"
        if isinstance(e, PermissionError):
            return (f"access refused ({text}): check the credentials (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    f"or ~/.aws/) and that they may put, get, list and delete objects under {self.url}")
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
        """A small object written, read back and deleted, and the folder listed: a bucket that does not
        exist, wrong credentials, no permission or an unreachable endpoint is found now, in seconds,
        rather than at the first upload hours in. Raises RemoteError."""
        probe = self.key(f".probe-{secrets.token_hex(4)}")
        step = "write to"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"probe")
            step = "read from"
            if self.fs.cat_file(probe) != b"probe":
                raise OSError("the probe object read back other bytes")
            step = "delete in"
            self.fs.rm_file(probe)
            step = "list"
            self.fs.ls(self.root, detail=False)
        except Exception as e:
            raise RemoteError(f"cannot {step} remote_dir {self.url}: {self.why(e)}") from None

    # -- what is there -------------------------------------------------------------------------
    def _objects(self):
        """{key below root: size} of everything under remote_dir, listed afresh."""
        self.fs.invalidate_cache()
        if self.local and not os.path.isdir(self.root):
            return {}
        found = self.fs.find(self.root, detail=True)
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return {k[len(root):]: v.get("size") for k, v in found.items() if k.startswith(root)}

    def _read_commit(self, name):
        c = json.loads(self.fs.cat_file(self.key(name + COMMIT)))
        if not (isinstance(c, dict) and c.get("format") == FORMAT and c.get("name") == name and
                isinstance(c.get("objects"), dict) and isinstance(c.get("iter_num"), int) and
                isinstance(c.get("data"), str) and c["data"].startswith(DATA + "/")):
            raise ValueError("not a commit object of this format")
        c.setdefault("branch", 0)
        return c

    def checkpoints(self):
        """(complete commits newest first, [(name, why)] for the incomplete or damaged ones, {data
        prefix: bytes} of uploads that no commit names). Complete: every object its commit names is
        there with its size (the CRCs are checked when it is downloaded). Raises RemoteError."""
        try:
            return self._checkpoints()
        except Exception as e:  # the store went away since the probe, a listing refused, ...
            raise RemoteError(f"cannot list remote_dir {self.url}: {self.why(e)}") from None

    def _checkpoints(self):
        objects = self._objects()
        good, bad, named = [], [], set()
        for key in sorted(objects):
            if "/" in key or not key.endswith(COMMIT) or not NAMES.match(key[:-len(COMMIT)]):
                continue
            name = key[:-len(COMMIT)]
            try:
                c = self._read_commit(name)
            except FileNotFoundError:
                continue  # deleted since listed (retention)
            except (ValueError, UnicodeDecodeError) as e:
                bad.append((name, f"its commit object is damaged ({first_line(e)})"))
                continue
            named.add(c["data"])
            missing = [rel for rel, (size, _) in c["objects"].items()
                       if objects.get(f"{c['data']}/{rel}") != size]
            if missing:
                rel = missing[0]
                got = objects.get(f"{c['data']}/{rel}")
                bad.append((name, f"{rel} is " + ("missing" if got is None else f"{got} bytes, its commit says "
                                                                                f"{c['objects'][rel][0]}")))
            else:
                good.append(c)
        leftovers = {}
        for key, size in objects.items():
            parts = key.split("/")
            if len(parts) > 2 and parts[0] == DATA and f"{DATA}/{parts[1]}" not in named:
                leftovers[f"{DATA}/{parts[1]}"] = leftovers.get(f"{DATA}/{parts[1]}", 0) + (size or 0)
        return sorted(good, key=rank, reverse=True), bad, leftovers

    # -- writing -----------------------------------------------------------------------------------
    def upload(self, files, header, prefix=None, others=None, abandon=lambda: False):
        """Copy one checkpoint ([(relative name, open descriptor)], see open_files) under a new data
        prefix (or `prefix`), check each object's size there, then write its commit object (header:
        iter_num, run_id, branch, kind, val_loss) and delete the data of the commit it replaces.
        others: {relative name: [size, crc]} of objects other ranks upload under the same prefix (a
        folder's shards): the commit waits until they are all there, unless abandon() says a newer
        checkpoint is waiting. Returns the commit. Raises what the backend raises; nothing is
        visible until the commit is written."""
        name = files[0][0].split("/")[0]
        prefix = prefix or new_prefix(header["iter_num"])
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
            old = self._read_commit(name)
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            old = None
        commit = dict(format=FORMAT, name=name, data=prefix, objects=objects, written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      **{k: header.get(k) for k in ("iter_num", "run_id", "branch", "kind", "val_loss")})
        self._put_small(name + COMMIT, json.dumps(commit).encode())
        if old is not None and old["data"] != prefix:
            self.fs.rm(self.key(old["data"]), recursive=True)
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
            atomic_write(key, lambda f: f.write(data))
        else:
            self.fs.pipe_file(key, data)

    def delete(self, commit):
        """The commit object first (the checkpoint is invisible from then on), then its data."""
        self.fs.rm_file(self.key(commit["name"] + COMMIT))
        self.fs.rm(self.key(commit["data"]), recursive=True)

    def clean(self, leftovers):
        """Delete the data of uploads that no commit names (a killed upload's), and on S3 the parts
        of multipart uploads under remote_dir that were never completed."""
        for prefix in leftovers:
            self.fs.rm(self.key(prefix), recursive=True)
        if "s3" in self.fs.protocol:
            from fsspec.asyn import sync
            bucket, _, path = self.root.partition("/")
            for up in sync(self.fs.loop, self.fs._list_multipart_uploads, bucket):
                if up["Key"].startswith(path + "/" + DATA + "/"):
                    sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                         UploadId=up["UploadId"])

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
                    what = f"{got[0]} bytes" if got[0] != size else f"CRC-32 {got[1]:08x}"
                    theirs = f"{size} bytes" if got[0] != size else f"{crc:08x}"
                    raise RemoteError(f"{rel} in remote_dir is damaged ({what}, its commit says {theirs})")
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
        """At start, out_dir held (checkpointer.claim): when remote_dir's newest complete checkpoint is
        newer than anything readable in out_dir, or out_dir has none, download it (metrics.jsonl too,
        when out_dir has none), so the resume that follows continues from it. A damaged one is skipped
        with one line, and the previous complete one tried. Returns the path downloaded, or None."""
        good, bad, _ = self.checkpoints()
        heads, _ = scan(out_dir)
        local = heads[0] if heads else None
        for name, why in bad:
            say(f"warning: remote_dir's {name} is not complete ({why}); not used", err=True)
        for i, c in enumerate(good):
            if local is not None and rank(c) <= rank(local):
                return None
            if local is not None and None not in (local["run_id"], c["run_id"]) and local["run_id"] != c["run_id"]:
                raise RemoteError(f"out_dir {out_dir!r} holds run {local['run_id']}, remote_dir {self.url} holds "
                                  f"run {c['run_id']}: give this run its own remote_dir (or its own out_dir)")
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
                try:
                    self.fs.get_file(self.key(METRICS), os.path.join(out_dir, METRICS))
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
        good, bad, _ = self.checkpoints()
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
        return cache

    def probe_read(self):
        try:
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            raise RemoteError(f"no checkpoint in remote_dir {self.url} (nothing is there)") from None
        except Exception as e:
            raise RemoteError(f"cannot list remote_dir {self.url}: {self.why(e)}") from None


def connect(url, out_dir):
    """A checked Remote for train.py (probe), or RemoteError: a backend that is not installed, a
    wrong bucket, credentials, permission or endpoint, or remote_dir being out_dir itself."""
    remote = Remote(url)
    if remote.local and os.path.realpath(remote.root) == os.path.realpath(out_dir):
        raise RemoteError(f"remote_dir {url!r} is out_dir itself: the durable copy must be elsewhere")
    remote.probe()
    return remote


class Uploader:
    """One background thread that copies every checkpoint made durable in out_dir to remote_dir,
    oldest first; a newer checkpoint of the same kind waiting behind it replaces an older one still
    waiting (keep_every's are all copied). A failure is one warning line for the whole outage, then
    retries with backoff (RETRY) while training goes on; the first success after it says so. After
    each periodic commit, remote retention: this run's and branch's periodic checkpoints beyond the
    newest keep_last (and not kept by keep_every) are deleted. Runs on rank 0, and under FSDP on
    every rank: a folder's shards go up from the rank that wrote them (rank r: __r_*.distcp), under
    the prefix rank 0 picked, and rank 0 writes the commit once they are all there."""

    def __init__(self, remote, out_dir, *, run_id, branch, keep_last, keep_every, rank=0, log=say):
        self.remote, self.out_dir, self.run_id, self.branch = remote, out_dir, run_id, branch
        self.keep_last, self.keep_every, self.rank, self.log = keep_last, keep_every, rank, log
        self.cv = threading.Condition()
        self.queue, self.current = [], None  # jobs: dict(header, files)
        self.newest = None  # header of the newest checkpoint handed over
        self.done = None  # header of the newest checkpoint complete in remote_dir
        self.outage, self.pause = None, RETRY[0]
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
            if self.rank == 0:  # state.pt names every rank's file with its size and CRC
                others = {f"{header['name']}/{f}": list(v) for f, v in folder_files(path).items()
                          if not mine(f)}
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
                if first and not self.rank:  # a killed upload's leftovers, once per run, before the first new data
                    self.remote.clean(self.remote.checkpoints()[2])
                    first = False
                t0 = time.time()
                if self.rank:  # a folder's shards of this rank; rank 0 commits them
                    self.remote.put_objects(job["files"], job["prefix"])
                else:
                    self.remote.upload(job["files"], job["header"], job["prefix"], job["others"], abandon=lambda: any(
                        self._replaces(j, job) for j in self.queue))
                    if job["header"]["kind"] == "periodic":
                        self._retain(job["header"])
                    self.remote.copy_metrics(self.out_dir)
                self.seconds = time.time() - t0
            except Exception as e:
                with self.cv:
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
                self.current = None
                self.cv.notify_all()

    def _retain(self, newest):
        good, _, _ = self.remote.checkpoints()
        mine = [c for c in good if c.get("kind") == "periodic" and c.get("run_id") == self.run_id and
                c["branch"] == self.branch and not (self.keep_every and c["iter_num"] % self.keep_every == 0)]
        for c in mine[self.keep_last:]:
            if rank(c) < rank(newest):
                self.remote.delete(c)

    def finish(self, bound):
        """At the end of a run or at a stop: wait up to `bound` seconds for what is waiting or in flight.
        Returns (True, line) when the newest checkpoint handed over is complete in remote_dir, else
        (False, line) saying what is lost if this machine is."""
        if self.newest is None:
            return True, None
        deadline = time.time() + bound
        with self.cv:
            if self.queue or self.current:
                self.log(f"waiting up to {bound:g}s (remote_wait) for the copy to remote_dir")
            while (self.queue or self.current) and time.time() < deadline:
                self.cv.wait(timeout=max(0.01, min(1.0, deadline - time.time())))
            newest, done = self.newest, self.done
            ok = done is not None and rank(done) >= rank(newest)
        if ok:
            return True, f"remote_dir {self.remote.url} holds the newest checkpoint ({newest['name']}, iteration {newest['iter_num']})"
        why = f" ({self.outage})" if self.outage else ""
        has = f"its newest complete one is {done['name']} (iteration {done['iter_num']})" if done else \
            "it has nothing of this process's"
        return False, (f"warning: {newest['name']} (iteration {newest['iter_num']}) did not reach remote_dir "
                       f"{self.remote.url} within remote_wait={bound:g}s{why}; it is in out_dir only, and {has}")


def describe(url):
    """checkpoint.py's listing of a remote_dir: one line per checkpoint, complete or not and why,
    and the leftovers of killed uploads."""
    remote = Remote(url)
    remote.probe_read()
    good, bad, leftovers = remote.checkpoints()
    if not good and not bad and not leftovers:
        raise RemoteError(f"no checkpoint in remote_dir {url!r}")
    lines = [f"{'checkpoint (newest first)':<26} {'branch':>6} {'iter':>8} {'val loss':>9} {'size':>12}  {'written':<24}  status"]
    for c in good:
        val = f"{c['val_loss']:.4f}" if isinstance(c.get("val_loss"), float) else "-"
        mb = sum(size for size, _ in c["objects"].values()) / 2**20
        lines.append(f"{c['name']:<26} {c['branch']:>6} {c['iter_num']:>8} {val:>9} {mb:9.1f} MB  {c.get('written', '?'):<24}  "
                     f"complete")
    for name, why in bad:
        lines.append(f"{name:<26} {'-':>6} {'-':>8} {'-':>9} {'-':>12}  {'-':<24}  INCOMPLETE: {why}")
    for prefix, size in sorted(leftovers.items()):
        lines.append(f"{prefix:<26} {'-':>6} {'-':>8} {'-':>9} {size / 2**20:9.1f} MB  {'-':<24}  no commit object: an "
                     f"upload in progress or killed (removed when the next run starts)")
    return lines
