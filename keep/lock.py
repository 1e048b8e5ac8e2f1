"""
out_dir's lock: one training process holds an out_dir, from before anything in it is read to the
end of the process (the OS drops the lock however the process ends).
"""
import errno
import fcntl
import os

import distributed
from console import console, say
from keep.atomic import TMP_TAG, recover
from keep.files import CheckpointError, os_error


def claim(out_dir, create=False, remote=None):
    """Take out_dir for this training process before anything in it is read: an exclusive lock on
    out_dir/.lock for the life of the process (the OS drops it however the process ends), so a
    second trainer is refused before it opens any checkpoint; then the leftovers of a killed process
    are cleaned up (atomic.recover) and a probe file shows the folder takes writes; then, with a
    remote (remote.Remote), a newer checkpoint of remote_dir is downloaded into it. Returns the
    lock's file, or None when out_dir does not exist yet and create is False (there is nothing to
    read). Raises CheckpointError: busy, or not writable; RemoteError: remote_dir cannot be read."""
    if remote is not None and not create and not os.path.isdir(out_dir):
        # a new machine: out_dir is made to take the download
        create = bool(remote.checkpoints().good)
    if not create and not os.path.isdir(out_dir):
        return None
    try:
        os.makedirs(out_dir, exist_ok=True)
        # not inherited by programs this one starts (close-on-exec)
        f = open(os.path.join(out_dir, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = (f.read().strip().splitlines() or ["another process"])[0][:80]
            f.close()
            raise CheckpointError(f"out_dir {out_dir!r} is in use by another training process "
                                  f"({holder}); wait for it to end, or pick another "
                                  "--out_dir") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        recover(out_dir)
        probe = os.path.join(out_dir, f".write-check{TMP_TAG}{os.getpid()}")
        with open(probe, "wb") as p:
            p.write(b"0" * 4096)
            p.flush()
            os.fsync(p.fileno())
        os.remove(probe)
    except OSError as e:
        fix = {errno.ENOSPC: "its disk is full: free space",
               errno.EDQUOT: "its disk quota is used up: free space",
               errno.EROFS: "it is on a read-only file system"}.get(e.errno, "fix its permissions")
        raise CheckpointError(f"out_dir {out_dir!r} is not writable ({os_error(e)}); {fix}, or "
                              "pick another --out_dir") from None
    if remote is not None:
        remote.restore(out_dir)
    return f


def claim_on_every_rank(out_dir, master, create=False, held=None, remote=None):
    """claim() on rank 0 (unless it already holds the lock, `held`), every rank stopping with it if
    it fails (distributed.on_rank0). Returns the lock's file on rank 0 (None elsewhere, or while
    out_dir does not exist and create is False)."""
    return distributed.on_rank0(
        lambda: held if held is not None else claim(out_dir, create, remote), master)


def settle_in(out_dir, master, held, run_id, remote=None, attempt=None, log=say):
    """Every rank, once the start is known good: rank 0 takes remote_dir's lease in the run's name
    (attempt: this start's token; a new run had no id when out_dir was claimed), makes out_dir if it
    is new and holds it, and opens its console.log. So a start that fails on its config, data or
    model leaves nothing behind, and an unwritable out_dir is found before training, not at the
    first save hours later. Returns the lock's file on rank 0."""
    if attempt:
        distributed.on_rank0(lambda: remote.take_lease(run_id, *remote.hold, log=log), master)
    held = claim_on_every_rank(out_dir, master, create=True, held=held)
    console.open(out_dir)
    return held
