"""
The object store under remote_dir, through fsspec (S3, GCS, Azure, or a folder on another disk):
the probe at start, listing, small whole-or-absent objects, checkpoint objects up and down with
their size and CRC-32 counted on the way. Store knows bytes and keys; what in remote_dir belongs
to a run is claims.py's, the lease lease.py's, checkpoints remote.py's.

Credentials, region and endpoint come from each backend's own environment and files (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws/), never from a knob, so they are
never stored in a checkpoint.
"""
import asyncio
import json
import os
import secrets
import shutil
import zlib

import fsspec
from fsspec.asyn import sync

from configurator import url_problem
from console import RunError, first_line
from keep.atomic import atomic_write
from keep.files import CHUNK, crc_of


PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
            "abfs": "adlfs", "abfss": "adlfs"}


# a dead endpoint is found in seconds, not minutes; the Uploader retries by itself (RETRY)
# the payload is not SHA-256 hashed for the signature (a second pass over every byte, also over
# plain http): botocore's CRC checksum on each request and the commit's CRCs guard the bytes
S3_OPTIONS = dict(config_kwargs=dict(connect_timeout=5, read_timeout=60,
                                     retries=dict(max_attempts=3, mode="standard"),
                                     s3=dict(payload_signing_enabled=False)))
# bytes per part of a multipart upload: a 100 MB checkpoint goes up in 7 parallel parts
PART = 16 << 20


class RemoteError(RunError):
    """remote_dir cannot be used, or one of its checkpoints cannot; the message says why in one
    line."""


def is_remote(path):
    """A URL for Remote (s3://, gs://, file://, ...) rather than a local path."""
    return isinstance(path, str) and "://" in path


def damage(rel, got, size, crc):
    what = f"{got[0]} bytes" if got[0] != size else f"CRC-32 {got[1]:08x}"
    theirs = f"{size} bytes" if got[0] != size else f"{crc:08x}"
    return f"{rel} in remote_dir is damaged ({what}, its commit says {theirs})"


def mtime(info):
    """An object's modification time (seconds) from fsspec's info: local files and S3 name it
    apart."""
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


class Store:

    def __init__(self, url):
        problem = url_problem(url)
        if problem:
            raise RemoteError(f"remote_dir {url!r} {problem}")
        self.url = url.rstrip("/")
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        try:
            self.fs, root = fsspec.core.url_to_fs(
                self.url, **(S3_OPTIONS if protocol in ("s3", "s3a") else {}))
        except ImportError:
            package = PACKAGES.get(protocol, f"fsspec backend for {protocol}://")
            raise RemoteError(f"remote_dir {url!r} needs the {package} package: pip install "
                              f"{package}") from None
        except ValueError as e:  # a protocol fsspec does not know
            raise RemoteError(f"remote_dir {url!r}: {first_line(e)}") from None
        self.root = root.rstrip("/")
        protocols = ([self.fs.protocol] if isinstance(self.fs.protocol, str)
                     else list(self.fs.protocol))
        self.local, self.s3 = "file" in protocols, "s3" in protocols

    def key(self, *parts):
        return "/".join((self.root,) + parts)

    def why(self, e):
        """What to fix, for an error of the backend."""
        text = first_line(e)
        if isinstance(e, PermissionError) and self.local:
            return (f"permission denied ({text}): make the folder writable by this user, or pick "
                    "another")
        if isinstance(e, PermissionError):
            return (f"access refused ({text}): check the credentials (for S3: AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY, or ~/.aws/) and that they may put, get, list and "
                    f"delete objects under {self.url} (docs/remote.md, Minimal S3 permissions)")
        if isinstance(e, FileNotFoundError) and not self.local:
            return f"the bucket does not exist ({text}): create it, or fix the name in remote_dir"
        if isinstance(e, (ConnectionError, TimeoutError)) or \
                "connect" in type(e).__name__.lower() or "Could not connect" in text:
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
                bucket, _, key = probe.partition("/")
                up = sync(self.fs.loop, self.fs._call_s3, "create_multipart_upload", Bucket=bucket,
                          Key=key)
                self.unfinished(probe[len(self.root) + 1:])
                step = "abort an upload in"
                self.abort(key, up["UploadId"])
            step = "delete in"
            self.fs.rm_file(probe)
        except Exception as e:
            raise RemoteError(f"cannot {step} remote_dir {self.url}: {self.why(e)}") from None

    def probe_read(self):
        try:
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            raise RemoteError(f"no checkpoint in remote_dir {self.url} (nothing is "
                              "there)") from None
        except Exception as e:
            raise RemoteError(f"cannot list remote_dir {self.url}: {self.why(e)}") from None

    # -- what is there -------------------------------------------------------------------------
    def _objects(self):
        """{key below root: info} of everything under remote_dir, listed afresh."""
        self.fs.invalidate_cache()
        if self.local and not os.path.isdir(self.root):
            return {}
        # one listing under the prefix: find() would also HEAD the prefix's own key, which a
        # policy scoped to the prefix (docs/remote.md) refuses
        if self.s3:
            found = {e["name"]: e
                     for e in sync(self.fs.loop, self.fs._lsdir, self.root, delimiter="")
                     if e.get("type") == "file"}
        else:
            found = self.fs.find(self.root, detail=True)
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return {k[len(root):]: v for k, v in found.items() if k.startswith(root)}

    def _read_json(self, key):
        return json.loads(self.fs.cat_file(self.key(key)))

    def put_objects(self, files, prefix):
        """The files under prefix, each one's size checked there: {relative name: [size, crc]}."""
        objects = {}
        for rel, fd in files:
            size, crc = crc_of(fd)
            key = self.key(prefix, rel)
            # the very file opened at push time, even if deleted since
            source = f"/proc/self/fd/{fd}"
            if self.local:
                os.makedirs(os.path.dirname(key), exist_ok=True)
                with open(source, "rb") as src:
                    atomic_write(key, lambda f: shutil.copyfileobj(src, f, CHUNK))
            else:  # s3fs: a multipart upload over PART, parts in parallel
                # (S3 takes 10,000 parts)
                self.fs.put_file(source, key, chunksize=max(PART, -(-size // 10_000)))
            got = self.fs.info(key)["size"]
            if got != size:
                raise OSError(f"{rel}: {got} bytes arrived of {size}")
            objects[rel] = [size, crc]
        return objects

    def _put_small(self, name, data):
        """One small object, whole or absent: a PUT is atomic on an object store; a file is renamed
        in."""
        key = self.key(name)
        if self.local:
            os.makedirs(os.path.dirname(key), exist_ok=True)
            atomic_write(key, lambda f: f.write(data))
        else:
            self.fs.pipe_file(key, data)

    def _get(self, key, fd, size):
        """An object into an open file. Returns (bytes, CRC-32) of what arrived, counted as it
        arrives (no second pass over the file). From an object store it comes in PART-sized ranges
        fetched in parallel (one GET stream is slower than a multipart upload's parts), each sent on
        its way to the disk once counted, so the fsync after it is short."""
        if self.local or size <= PART:
            crc, n = 0, 0
            with self.fs.open(key, "rb") as src:
                while chunk := src.read(CHUNK):
                    os.write(fd, chunk)
                    crc, n = zlib.crc32(chunk, crc), n + len(chunk)
            return n, crc
        os.ftruncate(fd, size)
        # parts ahead of the count; [bytes, CRC] so far
        gate, early, counted = asyncio.Semaphore(8), {}, [0, 0]

        async def part(start):
            async with gate:
                data = await self.fs._cat_file(key, start=start, end=min(start + PART, size))
            os.pwrite(fd, data, start)
            early[start] = data
            while counted[0] in early:  # the CRC runs over the parts in order
                data = early.pop(counted[0])
                counted[1] = zlib.crc32(data, counted[1])
                # (starts its writeback)
                os.posix_fadvise(fd, counted[0], len(data), os.POSIX_FADV_DONTNEED)
                counted[0] += len(data)

        async def every_part():
            await asyncio.gather(*(part(start) for start in range(0, size, PART)))

        sync(self.fs.loop, every_part)
        return tuple(counted)

    def verify(self, commit):
        """Each object of a commit read back and its size and CRC compared: None, or what is
        wrong."""
        for rel, (size, crc) in commit["objects"].items():
            got, n = 0, 0
            with self.fs.open(self.key(commit["data"], rel), "rb") as src:
                while chunk := src.read(CHUNK):
                    got, n = zlib.crc32(chunk, got), n + len(chunk)
            if (n, got) != (size, crc):
                return damage(rel, (n, got), size, crc)
        return None

    def abort(self, key, upload_id):
        """Abort one unfinished multipart upload (key: the bucket's, as `unfinished` lists it)."""
        sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload",
             Bucket=self.root.split("/")[0], Key=key, UploadId=upload_id)

    def unfinished(self, below):
        """S3's unfinished multipart uploads whose keys start with remote_dir/below, every page of
        them (none elsewhere). Asked with that prefix only: a policy may allow no wider listing."""
        if not self.s3:
            return []
        bucket, _, path = self.root.partition("/")
        ask, found = dict(Bucket=bucket, Prefix=f"{path}/{below}" if path else below), []
        while True:
            page = sync(self.fs.loop, self.fs._call_s3, "list_multipart_uploads", **ask)
            found += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return found
            ask.update(KeyMarker=page.get("NextKeyMarker"),
                       UploadIdMarker=page.get("NextUploadIdMarker"))

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
