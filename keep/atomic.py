"""
Files and folders that are either whole or absent: checkpoints, exports, metrics.jsonl rewrites,
token bins, meta.pkl and data/prepare.py's manifest are written through atomic_write; checkpoint
folders are replaced and deleted through replace_folder and remove_whole. Torch-free, so that data
preparation does not load torch.

Names that are not a checkpoint's: '.<name>.tmp-<pid>' is something being written or deleted
(never read; removed at the next start), '.<name>.old-<pid>' is a folder being replaced (put back
at the next start if the new one never arrived, see recover).
"""
import glob
import os
import shutil

TMP_TAG = ".tmp-"  # temporary files are '.<name>.tmp-<pid>'; never read, removed on start
OLD_TAG = ".old-"  # a replaced folder on its way out: '.<name>.old-<pid>'


def temp_name(path, tag=TMP_TAG, suffix=""):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{tag}{os.getpid()}{suffix}")


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """fsync every file under folder, then each folder from the deepest up: a folder written with
    plain open() (by us or by a library such as transformers) is then on disk whole, ready to be
    renamed into place (replace_folder) as atomic_write does for one file."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)  # fsync needs no write access
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def atomic_write(path, write):
    """Call write(f) on a new binary file that then becomes path, so that path is either the old
    file or the whole new one, even if the process is killed or the machine loses power mid-write:
    temp file in the same folder, flush + fsync, os.replace (atomic on POSIX), then fsync the folder
    so the rename is durable."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


def remove_whole(path):
    """Delete a file or a folder so that nothing partial is ever left under its name: a folder is
    first renamed to a temporary name (one atomic step, made durable), then deleted; a kill during
    the delete leaves only that temporary, which the next start removes."""
    if os.path.isdir(path) and not os.path.islink(path):
        gone = temp_name(path, suffix="-del")
        os.rename(path, gone)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        # a leftover is a temporary: removed at the next start
        shutil.rmtree(gone, ignore_errors=True)
    else:
        os.remove(path)


def replace_folder(tmp, path):
    """Make the finished folder `tmp` be `path`, replacing a folder already there. POSIX cannot
    rename a folder over a non-empty one, so the old one steps aside to '.<name>.old-<pid>' first;
    a kill between the two renames leaves the old one there, and recover() puts it back. The only
    good copy is never under a name that the next start deletes."""
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.lexists(path):
        old = temp_name(path, OLD_TAG)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(parent)
    if old:
        remove_whole(old)


def recover(folder):
    """At start, before anything in `folder` is read: temporaries of a process that was killed
    mid-write or mid-delete are removed, and a folder that was being replaced when the process died
    is put back under its name if its replacement never arrived. Temporaries go first: an old folder
    killed mid-delete is one ('..NAME.old-PID.tmp-PID-del'), never an old folder to put back."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".*{TMP_TAG}*")):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
    for old in glob.glob(os.path.join(glob.escape(folder), f".*{OLD_TAG}*")):
        name = os.path.basename(old)[1:].rsplit(OLD_TAG, 1)[0]
        target = os.path.join(folder, name)
        if os.path.lexists(target):
            remove_whole(old)
        else:
            os.rename(old, target)
            fsync_dir(folder)
