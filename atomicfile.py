"""
Files that are either whole or absent: checkpoints, exports, metrics.jsonl rewrites, token bins,
meta.pkl and data/prepare.py's manifest are all written through atomic_write. Torch-free, so that
data preparation does not load torch.
"""
import os

TMP_TAG = ".tmp-"  # temporary files are '.<name>.tmp-<pid>'; never read, removed on start


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(f) on a new binary file that then becomes path, so that path is either the old
    file or the whole new one, even if the process is killed or the machine loses power mid-write:
    temp file in the same folder, flush + fsync, os.replace (atomic on POSIX), then fsync the folder
    so the rename is durable."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_TAG}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)
