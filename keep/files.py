"""
The checkpoint file: its names, writing one whole or not at all, and reading one safely. A
checkpoint is one torch.save'd dict of tensors and plain Python values, so torch.load with
weights_only=True reads it and a file can never run code when loaded; every record's CRC-32 (torch
writes them, torch never checks them) is checked here. crc_of is the project's one CRC reader
(folders, the remote copy). What a checkpoint holds is judged by contents.py; finding and loading
the right one is store.py's.
"""
import errno
import os
import pickle
import re
import secrets
import stat
import zipfile
import zlib

import torch

from console import RunError, cut_line, first_line
from keep.atomic import atomic_write


FORMAT_VERSION = 1
# nanoGPT's file: best val loss so far (or every eval), read by sample.py
BEST = "ckpt.pt"
# every checkpoint_interval iterations, on signals, at the end (branch 0)
PERIODIC = "ckpt-{:08d}.pt"
# the same for branch b > 0 (a run resumed by hand from an older file)
BRANCHED = "ckpt-{:08d}-b{}.pt"
KEPT_BEST = "ckpt-best-b{}-{:08d}.pt"  # another branch's ckpt.pt, kept when a branch writes its own
# periodic ones: files or folders
NAMES = re.compile(r"ckpt(\.pt|-best-b\d+-\d{8}\.pt|-\d{8}(-b\d+)?(\.pt)?)$")
STATE = "state.pt"  # a checkpoint folder's plain part; the rest of the folder is DCP's
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def periodic_name(it, branch=0, folder=False):
    name = PERIODIC.format(it) if branch == 0 else BRANCHED.format(it, branch)
    return name[:-len(".pt")] if folder else name


def new_run_id():
    return secrets.token_hex(4)


class CheckpointError(RunError):
    """A file that cannot be used as a checkpoint; the message says why in one line."""


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def os_error(e):
    """The OS error behind a failed write (torch wraps it in a RuntimeError or two), as one line."""
    c = e
    while c is not None and not isinstance(c, OSError):
        c = c.__cause__ or c.__context__
    if c is not None and c.errno:
        return f"[Errno {c.errno}] {c.strerror}"
    if "unexpected pos" in str(e):  # torch's zip writer got fewer bytes written than it gave
        return ("a short write: the disk, a quota or a file-size limit is full "
                f"({str(e).splitlines()[0][:100]})")
    return f"{type(e).__name__}: {e}"


KEPT_INTACT = "older checkpoints are intact; training goes on and the next checkpoint tries again"


def save(ckpt, path):
    """Atomically write a checkpoint dict whose tensors are on the CPU. A failed write (disk full,
    quota, EFBIG, a vanished folder) raises CheckpointError naming the file and the OS error; it
    leaves no temp file, and the file it was to replace intact."""
    try:
        atomic_save(ckpt, path)
    except Exception as e:
        raise CheckpointError(f"could not write {path}: {os_error(e)}") from None


CHUNK = 8 << 20


def crc_of(fd):
    """(size, CRC-32) of an open file, read with pread (the descriptor's offset is left alone)."""
    crc, size = 0, 0
    while chunk := os.pread(fd, CHUNK, size):
        crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def crc32(path):
    """[size, CRC-32] of a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(crc_of(fd))
    finally:
        os.close(fd)


def strip_prefixes(state_dict):
    """torch.compile adds '_orig_mod.', DDP adds 'module.'; files store plain parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def stat_path(path):
    """('file' | 'folder', None) for what path names, following symlinks, found by stat() before
    anything opens it; else (None, why not): gone, a dangling symlink, a symlink loop, or not a
    regular file (a FIFO, whose open() blocks; a device such as /dev/zero, which never ends)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            return None, "a dangling symlink (its target does not exist)"
        if e.errno == errno.ENOENT:
            return None, "no such file or folder"
        if e.errno == errno.ELOOP:
            return None, "a symlink loop"
        return None, f"unreadable ([Errno {e.errno}] {e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "folder", None
    if stat.S_ISREG(st.st_mode):
        return "file", None
    what = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else
            "a block device" if stat.S_ISBLK(st.st_mode) else "a character device")
    link = f", through a symlink to {os.path.realpath(path)}" if os.path.islink(path) else ""
    return None, f"not a regular file ({what}{link})"


def kind_of(path):
    """'file' or 'folder' (see stat_path); anything else raises CheckpointError."""
    kind, why = stat_path(path)
    if kind is None:
        raise CheckpointError(f"{path}: {why}")
    return kind


STORAGE = re.compile(r"/data/\d+$")  # a tensor storage's record in torch.save's zip archive


def check_crcs(path, names=None):
    """Every record of the zip archive (or those in names: a list, or a test of a name) against its
    CRC-32: torch.save writes them, torch.load never checks them, so a flipped byte inside a tensor
    would load silently. One read of those records, in pieces. A record that cannot be read counts
    as a mismatch, as in zipfile's testzip."""
    try:
        with zipfile.ZipFile(path) as zf:
            if names is None:
                bad = zf.testzip()
            else:
                bad = next((n for n in (filter(names, zf.namelist()) if callable(names) else names)
                            if not _record_ok(zf, n)), None)
    except Exception as e:
        # BadZipFile, and EOFError or UnicodeDecodeError from a damaged local header
        raise CheckpointError(f"{path}: unreadable (a damaged zip archive: "
                              f"{first_line(e)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt (CRC mismatch in {bad})")


def _record_ok(zf, name):
    try:
        with zf.open(name) as f:  # zipfile checks the CRC at the end of the record
            while f.read(1 << 20):
                pass
        return True
    except zipfile.BadZipFile:
        return False


def weight_records(path, ckpt):
    """The zip records that hold the model's weights, or None (all of them) when that cannot be
    told. torch.save names storages data/0, data/1, ... as the pickler first meets them, so when
    `model` is the dict's first key (ours and nanoGPT's) its storages are the first ones."""
    if next(iter(ckpt)) != "model":
        return None
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                for t in ckpt["model"].values()}
    with zipfile.ZipFile(path) as zf:
        prefix = zf.namelist()[0].split("/")[0]
    return [f"{prefix}/data/{i}" for i in range(len(storages))]


def show(v):
    """A value as a message shows it: a short repr as it is, anything else by its type."""
    text = repr(v)
    return text if len(text) <= 40 and not isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def torch_load(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) of a regular file, every failure turned into a one-line
    CheckpointError."""
    if kind_of(path) == "folder":
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path}: unreadable (not a torch.save archive: truncated, or not a "
                              "checkpoint)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; what matters in it is the global it refused to import
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {found.group(1)}" if found else cut_line(str(e).strip().splitlines()[-1])
        raise CheckpointError(f"{path}: refused, loading it would need arbitrary pickle, which can "
                              f"run code ({what}, not plain data)") from None
    except Exception as e:  # truncated zip, bad magic, unreadable: all mean "not a usable file"
        raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a GPT checkpoint (it holds {show(ckpt)}, not a dict)")
    return ckpt


def is_folder_checkpoint(path):
    """A folder that is (or was meant to be) one checkpoint, rather than a run's out_dir."""
    return NAMES.match(os.path.basename(os.path.normpath(path))) is not None or \
        any(os.path.lexists(os.path.join(path, n)) for n in (STATE, ".metadata"))
