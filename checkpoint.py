"""
Everything about checkpoint files: atomic save, safe load, finding the newest good one,
retention, RNG capture/restore, compatibility checks, and a small inspect CLI:

    python checkpoint.py out-shakespeare-char      # list the checkpoints in a folder
    python checkpoint.py out-shakespeare-char/ckpt.pt   # metadata and model_args of one file

A checkpoint is one torch.save'd dict of tensors and plain Python values, so torch.load with
weights_only=True reads it and a file can never run code when loaded. It keeps nanoGPT's keys
(model, optimizer, model_args, iter_num, best_val_loss, config) so files move both ways, and adds
scaler, rng (one entry per rank), format_version and metadata.

Under FSDP the periodic checkpoints are folders (ckpt-00001000/) written by every rank at once with
torch.distributed.checkpoint (DCP): each rank's shard of the weights and AdamW state in its own
__R_0.distcp file, DCP's .metadata, and state.pt, the same dict as a file less model and optimizer,
plus the size and CRC-32 of every other file in the folder (DCP keeps no checksum of its own). A
folder is written under a temporary name and renamed when every rank has finished (distributed.py);
load() verifies it and, when the tensors are wanted whole, reads them with DCP into the same dict a
file gives, so sample.py, export.py and a resume without FSDP take either. Consolidate one:

    python checkpoint.py consolidate out/ckpt-00001000 ckpt.pt
"""
import fcntl
import glob
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
import zlib

import numpy as np
import torch

from atomicfile import TMP_TAG, atomic_write, fsync_dir
from metrics import say

FORMAT_VERSION = 1
BEST = "ckpt.pt"                  # nanoGPT's file: best val loss so far (or every eval), read by sample.py
PERIODIC = "ckpt-{:08d}.pt"       # every checkpoint_interval iterations, on signals, at the end (branch 0)
BRANCHED = "ckpt-{:08d}-b{}.pt"   # the same for branch b > 0 (a run resumed by hand from an older file)
KEPT_BEST = "ckpt-best-b{}-{:08d}.pt"  # another branch's ckpt.pt, kept when a branch writes its own
NAMES = re.compile(r"ckpt(\.pt|-best-b\d+-\d{8}\.pt|-\d{8}(-b\d+)?(\.pt)?)$")  # periodic ones: files or folders
STATE = "state.pt"  # a checkpoint folder's plain part; the rest of the folder is DCP's
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias")  # config keys that fix the model's shape
# never taken from a stored config: where and how this process starts, and its own time budget
NOT_RESTORED = ("out_dir", "init_from", "resume_from", "eval_only", "time_limit")
# nanoGPT stores what its machine had here (its dtype default depends on the GPU), not a user's choice
MACHINE = ("device", "dtype", "backend", "compile")


def periodic_name(it, branch=0, folder=False):
    name = PERIODIC.format(it) if branch == 0 else BRANCHED.format(it, branch)
    return name[:-len(".pt")] if folder else name


def new_run_id():
    return secrets.token_hex(4)


class CheckpointError(Exception):
    """A file that cannot be used as a checkpoint; the message says why in one line."""


# ---------------------------------------------------------------------------------------------
# writing

def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def check_writable(out_dir):
    """Write, fsync and remove a small temp file; raises OSError if out_dir cannot take one."""
    probe = os.path.join(out_dir, f".write-check{TMP_TAG}{os.getpid()}")
    with open(probe, "wb") as f:
        f.write(b"0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    os.remove(probe)


def lock(out_dir):
    """Hold an exclusive lock on out_dir/.lock for the life of this process, so a second training
    process in the same folder (another run, the same job started twice) is refused before it
    writes anything. The OS drops the lock when the process ends, however it ends."""
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(f"out_dir {out_dir!r} is in use by another training process ({holder}); wait for it "
                              f"to end, or pick another --out_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def remove_stray_temps(out_dir):
    """Temp files and folders left by a process killed mid-write: they were never a checkpoint."""
    for path in glob.glob(os.path.join(out_dir, f".*{TMP_TAG}*")):
        remove(path)


def remove(path):
    """Delete a checkpoint file or folder."""
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def to_cpu(obj):
    """A nested state with every tensor on the CPU (CPU tensors are not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def os_error(e):
    """The OS error behind a failed write (torch wraps it in a RuntimeError or two), as one line."""
    c = e
    while c is not None and not isinstance(c, OSError):
        c = c.__cause__ or c.__context__
    if c is not None and c.errno:
        return f"[Errno {c.errno}] {c.strerror}"
    if "unexpected pos" in str(e):  # torch's zip writer got fewer bytes written than it gave
        return f"a short write: the disk, a quota or a file-size limit is full ({str(e).splitlines()[0][:100]})"
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


class AsyncSaver:
    """Writes checkpoints from a forked child process. fork() hands the child a copy-on-write
    snapshot of the whole process in well under a second, so training stalls for the fork (plus,
    for GPU tensors, their copy to host memory in to_cpu) rather than for writing, or even
    copying, gigabytes. At most one write is in flight: save() and wait() first wait for the
    previous one, and the training script calls wait() before it exits. POSIX only (fork)."""

    def __init__(self):
        self.pid = None

    def save(self, ckpt, path, then=None):
        self.wait()
        pid = os.fork()
        if pid == 0:  # the child: write, then leave without running any of the parent's exit code
            code = 1
            try:
                # signals reach the whole process group; the parent stops, and waits for this write
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(s, signal.SIG_IGN)
                save(ckpt, path)
                if then:
                    then()
                code = 0
            except CheckpointError as e:
                say(f"warning: {e}; {KEPT_INTACT}", err=True)
            except BaseException as e:
                say(f"warning: background checkpoint write to {path} failed: {type(e).__name__}: {e}; {KEPT_INTACT}", err=True)
            finally:
                os._exit(code)
        self.pid = pid

    def wait(self):
        """Wait for the write in flight, if any; False if it failed (the child has said why)."""
        if self.pid is None:
            return True
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return status == 0


def verified(path):
    """True if every record of the file, or every file of the folder, matches its CRC-32: one full read."""
    try:
        if os.path.isdir(path):
            verify_folder(path)
            return True
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, CheckpointError):
        return False


# ---------------------------------------------------------------------------------------------
# checkpoint folders (FSDP): the plain part in state.pt, the tensors in DCP's files

def crc32(path):
    """(size, CRC-32) of a file, read in 16 MB pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return [size, crc]


def commit_folder(tmp, path, state, files):
    """Make the finished temp folder `tmp` the checkpoint folder `path`: state.pt (the plain part, with
    every file's size and CRC) written in it, fsynced, then the folder renamed. Until the rename the
    folder has a temp name, which nothing reads and the next start removes: a folder under a
    checkpoint's name is always whole. Raises CheckpointError, leaving no folder under `path`'s name
    that was not there before."""
    try:
        atomic_save(dict(state, files=files), os.path.join(tmp, STATE))
        fsync_dir(tmp)
        old = None
        if os.path.exists(path):  # the same iteration again (after a fall-back): replace it whole
            old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_TAG}old-{os.getpid()}")
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        if old:
            remove(old)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {path}: {os_error(e)}") from None


# DCP pickles its .metadata and unpickles it with pickle.load: anything else a planted file names
# would run, so the file is first read here with only these classes admitted (all plain records).
_DCP_CLASSES = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
    "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_CLASSES and not dtype:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return super().find_class(module, name)


def _dcp_metadata(folder):
    """DCP's metadata of a folder, read safely; every entry must be a tensor (DCP would unpickle any
    other entry with torch.load(weights_only=False))."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        with open(os.path.join(folder, ".metadata"), "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{folder}: refused, its .metadata needs arbitrary pickle, which can run code "
                              f"({str(e)[:120]})") from None
    except Exception as e:
        raise CheckpointError(f"{folder}: unreadable .metadata ({type(e).__name__}: {str(e)[:120]})") from None
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(isinstance(m, TensorStorageMetadata) for m in entries.values()):
        raise CheckpointError(f"{folder}: refused, its .metadata holds entries that are not tensors")
    return md


def _folder_state(folder):
    """state.pt of a checkpoint folder: plain data, loaded with weights_only=True."""
    state_path = os.path.join(folder, STATE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {STATE}: not written by train.py, or "
                              f"copied in part)")
    if not zipfile.is_zipfile(state_path):
        raise CheckpointError(f"{state_path}: unreadable (truncated, or not a checkpoint)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{state_path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or \
            not all(k in state for k in ("model_args", "optimizer_groups")):
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE} lacks 'files', 'model_args' or "
                              f"'optimizer_groups')")
    return state


def verify_folder(folder):
    """The folder's plain state, after checking state.pt's CRCs and every listed file's size and
    CRC-32, and that DCP's .metadata is safe to read. Raises CheckpointError naming the bad file."""
    state = _folder_state(folder)
    with zipfile.ZipFile(os.path.join(folder, STATE)) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise CheckpointError(f"{folder}: corrupt ({STATE}: CRC mismatch in {bad})")
    for name, (size, crc) in sorted(state["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: incomplete ({name} is missing)")
        got = crc32(path)
        if got[0] != size:
            raise CheckpointError(f"{folder}: corrupt ({name} has {got[0]:,} bytes, {size:,} were written)")
        if got[1] != crc:
            raise CheckpointError(f"{folder}: corrupt (CRC mismatch in {name})")
    _dcp_metadata(folder)
    return state


def optimizer_by_id(state, groups):
    """AdamW's state keyed by parameter name (DCP, FSDP) -> torch's own optimizer.state_dict() format,
    keyed by the parameter's position in the param groups, as a single-file checkpoint has it."""
    ids = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    return {"state": {ids[name]: s for name, s in state.items()},
            "param_groups": [dict(g, params=[ids[n] for n in g["params"]]) for g in groups]}


def optimizer_by_name(optimizer_state, names):
    """The inverse: torch's format -> {"state": {name: ...}, "param_groups": [... names]}, with `names`
    the parameter names in the order of the param groups."""
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in optimizer_state["param_groups"]]}


def read_shards(folder, state):
    """The tensors of a verified checkpoint folder, whole, in this process alone (no process group):
    (model state dict, optimizer state dict in torch's format)."""
    import torch.distributed.checkpoint as dcp
    md = _dcp_metadata(folder)
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: it is meant so
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, checkpoint_id=folder, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    for alias, name in state.get("aliases", {}).items():  # a tied weight is stored once
        model[alias] = model[name]
    optim = {}
    for k, v in flat.items():
        if k.startswith("optim."):
            name, stat = k[len("optim."):].rsplit(".", 1)
            optim.setdefault(name, {})[stat] = v
    return model, optimizer_by_id(optim, state["optimizer_groups"])


def apply_retention(out_dir, keep_last, keep_every, run_id, branch, written=()):
    """Delete this run's and this branch's periodic files beyond the newest keep_last good ones.
    Called only after a new file is on disk. Never deleted: ckpt.pt, other runs' and branches'
    files, files kept by keep_every, files that do not load. A file counts toward keep_last only
    if this process wrote it (`written`) or its CRCs check out, so a damaged or junk file never
    pushes a good one out."""
    heads, _ = scan(out_dir)
    mine = [h for h in heads if h["kind"] == "periodic" and h["branch"] == branch and h["run_id"] in (run_id, None)
            and not (keep_every > 0 and h["iter_num"] % keep_every == 0)]
    good = 0
    for h in mine:  # newest first
        if good >= keep_last:
            try:
                remove(h["path"])
            except OSError as e:
                say(f"warning: could not delete old checkpoint {h['path']}: {os_error(e)}", err=True)
        elif h["path"] in written or verified(h["path"]):
            good += 1


def keep_others_best(out_dir, run_id, branch, resumed_from=None, log=say):
    """Before this run first writes ckpt.pt: if the ckpt.pt there belongs to another branch (or run),
    keep it under KEPT_BEST rather than replace it, and say so. Called once per process."""
    best = os.path.join(out_dir, BEST)
    if not os.path.exists(best):
        return
    try:
        h = read_header(best)
    except CheckpointError:
        return  # a damaged ckpt.pt holds nothing to keep
    ours = h["branch"] == branch and h["run_id"] in (run_id, None)
    if ours or (resumed_from and os.path.realpath(resumed_from) == os.path.realpath(best)):
        return
    kept = os.path.join(out_dir, KEPT_BEST.format(h["branch"], h["iter_num"]))
    if not os.path.exists(kept):
        os.rename(best, kept)  # this run writes ckpt.pt right after; until then sample.py falls back
        fsync_dir(out_dir)
    val = f", val loss {h['val_loss']:.4f}" if isinstance(h["val_loss"], float) else ""
    log(f"note: {BEST} held branch {h['branch']}'s best (iteration {h['iter_num']}{val}); kept as "
        f"{os.path.basename(kept)}, this branch writes its own {BEST}")


# ---------------------------------------------------------------------------------------------
# reading

def strip_prefixes(state_dict):
    """torch.compile adds '_orig_mod.', DDP adds 'module.'; files store plain parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _torch_load(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True), every failure turned into a one-line CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {'a folder, not a checkpoint file' if os.path.isdir(path) else 'no such file or folder'}")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path}: unreadable (not a torch.save archive: truncated, or not a checkpoint)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; what matters in it is the global it refused to import
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {found.group(1)}" if found else f"{str(e).strip().splitlines()[-1][:120]}"
        raise CheckpointError(f"{path}: refused, loading it would need arbitrary pickle, which can run code "
                              f"({what}, not plain data)") from None
    except Exception as e:  # truncated zip, bad magic, unreadable: all mean "not a usable file"
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a GPT checkpoint (no 'model' and 'model_args' keys)")
    return ckpt


def load(path, map_location="cpu", tensors=True):
    """Load and verify one checkpoint. Raises CheckpointError with a one-line reason for a missing,
    truncated, corrupt, foreign or unsafe file; an unsafe pickle is refused before any of it runs.
    A folder is verified in full (every file's CRC); with tensors=False only its plain part is
    returned (FSDP then reads each rank's share of the shards itself, distributed.load_sharded);
    with tensors=True the very dict a single file holds."""
    if os.path.isdir(path):
        ckpt = verify_folder(path)
        if tensors:
            ckpt["model"], ckpt["optimizer"] = read_shards(path, ckpt)
            for k in ("files", "aliases", "optimizer_groups"):  # the folder's own bookkeeping
                ckpt.pop(k, None)
        return ckpt
    # torch.save writes a zip with a CRC-32 per record but torch.load never checks them, so a
    # flipped byte inside a tensor would load silently; zipfile checks every record.
    if os.path.isfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt (CRC mismatch in {bad})")
    ckpt = _torch_load(path, map_location)
    ckpt["model"] = strip_prefixes(ckpt["model"])
    if isinstance(ckpt.get("best_val_loss"), torch.Tensor):  # nanoGPT stores a 0-d tensor
        ckpt["best_val_loss"] = ckpt["best_val_loss"].item()
    return ckpt


def read_header(path):
    """What ranks a file, read without its tensors (mmap: ~10 ms for a 400 MB file): iteration,
    run id, branch, kind, val loss. Only load() checks the CRCs."""
    ckpt = _folder_state(path) if os.path.isdir(path) else _torch_load(path, mmap=True)
    meta = ckpt.get("metadata") or {}
    name = os.path.basename(path)
    kind = "best" if name == BEST else "kept" if name.startswith("ckpt-best-") else "periodic"
    return dict(path=path, iter_num=int(ckpt.get("iter_num", 0)), run_id=meta.get("run_id"),
                branch=int(meta.get("branch", 0)), kind=kind, val_loss=meta.get("val_loss"))


def rank(h):
    """Newest first: the highest branch (branches are numbered as they are made), then the highest
    iteration; at a tie a periodic file, which is written after ckpt.pt at the same iteration."""
    return h["branch"], h["iter_num"], {"periodic": 2, "best": 1, "kept": 0}[h["kind"]]


def scan(out_dir):
    """The checkpoint files in out_dir: (headers newest first by content, [(path, reason)] for files
    with a checkpoint's name that cannot be read). File times are never used: copies, restores
    and downloads change them."""
    if not os.path.isdir(out_dir):
        return [], []
    heads, bad = [], []
    for name in sorted(os.listdir(out_dir)):
        if NAMES.match(name):
            path = os.path.join(out_dir, name)
            try:
                heads.append(read_header(path))
            except CheckpointError as e:
                bad.append((path, str(e)))
    return sorted(heads, key=rank, reverse=True), bad


def candidates(out_dir):
    """Every file with a checkpoint's name in out_dir: readable ones newest first, then the rest."""
    heads, bad = scan(out_dir)
    return [h["path"] for h in heads] + [path for path, _ in bad]


def load_latest(out_dir, map_location="cpu", log=say, tensors=True):
    """The newest checkpoint in out_dir that loads; each bad one is reported in one line."""
    heads, bad = scan(out_dir)
    for path, why in bad:
        log(f"warning: skipping {why}; left in place, not counted as a checkpoint")
    if not heads and not bad:
        raise CheckpointError(f"no checkpoint in {out_dir!r} (looked for {BEST}, ckpt-*.pt and ckpt-*/ folders)")
    for i, h in enumerate(heads):
        try:
            return h["path"], load(h["path"], map_location, tensors)
        except CheckpointError as e:
            nxt = f"falling back to {os.path.basename(heads[i + 1]['path'])}" if i + 1 < len(heads) else "no older one left"
            log(f"warning: skipping {e}; {nxt}")
    raise CheckpointError(f"none of the {len(heads) + len(bad)} checkpoint(s) in {out_dir!r} loads (see warnings above)")


# ---------------------------------------------------------------------------------------------
# resume rules (README, "Checkpoints")

def same_origin(a, b):
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b))


def find_start(out_dir, init_from, resume_from="", log=say, tensors=True):
    """(path, ckpt) that this start continues, or (None, None) to start fresh. resume_from: that
    file. Otherwise the newest good checkpoint in out_dir, whatever init_from says, so the same
    command run twice continues the run; init_from='resume' with none there is an error."""
    if resume_from:
        ckpt = load(resume_from, tensors=tensors)
        theirs = (ckpt.get("metadata") or {}).get("run_id")
        others = {h["run_id"] for h in scan(out_dir)[0]} - {None, theirs}
        if others:  # two runs in one folder could no longer be told apart by "newest"
            raise CheckpointError(f"out_dir {out_dir!r} holds another run (run id {sorted(others)[0]}) than "
                                  f"{resume_from} (run id {theirs}); resume it into a new --out_dir")
        return resume_from, ckpt
    if init_from == "resume":
        return load_latest(out_dir, log=log, tensors=tensors)
    if not candidates(out_dir):
        return None, None
    try:
        path, ckpt = load_latest(out_dir, log=log, tensors=tensors)
    except CheckpointError:
        raise CheckpointError(f"out_dir {out_dir!r} holds checkpoint files but none of them loads (see warnings "
                              f"above); move them away or pick another --out_dir") from None
    origin = (ckpt.get("metadata") or {}).get("init_from") or (ckpt.get("config") or {}).get("init_from")
    if origin not in (None, "resume") and not same_origin(origin, init_from):
        raise CheckpointError(f"out_dir {out_dir!r} holds a run that began from {origin!r} (iteration "
                              f"{ckpt['iter_num']}, {os.path.basename(path)}), not from {init_from!r}: continue "
                              f"it with --init_from=resume, or pick another --out_dir")
    log(f"{out_dir} holds this run at iteration {ckpt['iter_num']} ({os.path.basename(path)}): continuing it "
        f"(to start over, pick another --out_dir)")
    return path, ckpt


def branch_for(out_dir, ckpt, picked):
    """The branch a resumed run writes: the checkpoint's own, unless the file was picked by hand
    (resume_from) and out_dir holds later work; then a new branch, whose files get their own
    names and outrank the abandoned ones, so nothing is overwritten and a plain resume continues
    the newest branch."""
    b = int((ckpt.get("metadata") or {}).get("branch", 0))
    if not picked:
        return b
    heads, _ = scan(out_dir)
    if any((h["branch"], h["iter_num"]) > (b, ckpt["iter_num"]) for h in heads):
        return 1 + max(h["branch"] for h in heads)
    return b


def restore_config(namespace, ckpt, sources, explicit=True, log=say):
    """The config of a resumed run: train.py defaults < the checkpoint's stored config < config
    files < --flags (`sources` says which keys a file or flag set). The model's shape is always
    the checkpoint's: another value from a config file gets a note when the resume was asked for
    (explicit: init_from='resume'), from a --flag, or on an implicit continuation, an error (then
    it is another run's command). Returns {key: (stored, now)} for each knob that differs."""
    stored, args = ckpt.get("config") or {}, ckpt["model_args"]
    skip = NOT_RESTORED + (() if "format_version" in ckpt else MACHINE)
    for k, v in stored.items():
        if k in namespace and k not in sources and k not in skip and k not in SHAPE:
            default = namespace[k]
            if type(v) is type(default) or default is None or (isinstance(default, float) and type(v) is int):
                namespace[k] = float(v) if isinstance(default, float) and type(v) is int else v
    device = namespace.get("device", "auto")
    if "device" not in sources and ((device.startswith("cuda") and not torch.cuda.is_available()) or
                                    (device == "mps" and not torch.backends.mps.is_available())):
        log(f"note: the run used device={device!r}, which this machine lacks; using device='auto'")
        namespace["device"] = "auto"
    flagged = [f"{k}={namespace[k]!r} but the checkpoint has {args[k]!r}" for k in SHAPE
               if k in args and k in sources and (sources[k].startswith("--") or not explicit) and namespace[k] != args[k]]
    if flagged:
        raise CheckpointError("the model's shape comes from the checkpoint and cannot change on resume: "
                              + "; ".join(flagged) + " (drop those flags, or pick another --out_dir for a new run)")
    filed = [k for k in SHAPE if k in args and k in sources and namespace[k] != args[k]]
    if filed:
        log(f"note: using the checkpoint's model ({', '.join(f'{k}={args[k]!r}' for k in filed)}), not "
            f"{', '.join(f'{k}={namespace[k]!r}' for k in filed)} from {sources[filed[0]]}")
    for k in SHAPE:
        if k in args:
            namespace[k] = args[k]
    if "dropout" not in sources and "dropout" in args:
        namespace["dropout"] = args["dropout"]  # the model's own, also for files whose config lacks it
    return {k: (stored[k], namespace[k]) for k in sources
            if k in stored and k not in skip and k not in SHAPE and stored[k] != namespace[k]}


def check_compatible(ckpt, dataset, vocab_size):
    """Refuse to resume on other data: another dataset, or a vocab the model does not have."""
    problems = []
    saved_dataset = (ckpt.get("config") or {}).get("dataset")
    if saved_dataset is not None and saved_dataset != dataset:
        problems.append(f"dataset={dataset!r} but the checkpoint was trained on {saved_dataset!r}")
    if vocab_size is not None and vocab_size != ckpt["model_args"]["vocab_size"]:
        problems.append(f"the dataset's vocab has {vocab_size} tokens but the checkpoint's model has "
                        f"{ckpt['model_args']['vocab_size']}")
    if problems:
        raise CheckpointError("checkpoint does not match this run: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# RNG state as plain data (so weights_only loading reads it)

def capture_rng():
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng):
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        if len(rng["cuda"]) != torch.cuda.device_count():
            say(f"warning: checkpoint has CUDA RNG for {len(rng['cuda'])} devices, this machine has "
                f"{torch.cuda.device_count()}; CUDA RNG restored where it can be")
        for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# inspect CLI

def describe(path):
    """One line: branch, iteration, val loss measured at that iteration, size, time, whether it loads."""
    size = (sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) if os.path.isdir(path)
            else os.path.getsize(path)) / 2**20
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    name = os.path.basename(path) + ("/" if os.path.isdir(path) else "")
    try:
        ckpt = load(path, tensors=False)  # a folder's CRCs are all checked; its tensors need not be assembled
    except CheckpointError as e:
        return f"{name:<24} {'-':>6} {'-':>8} {'-':>9} {size:9.1f} MB  {when}  BAD: {e}"
    meta = ckpt.get("metadata") or {}
    val = meta.get("val_loss")
    val = f"{val:.4f}" if isinstance(val, float) else "-"
    return f"{name:<24} {meta.get('branch', 0):>6} {ckpt.get('iter_num', '-'):>8} {val:>9} {size:9.1f} MB  {when}  ok"


def is_folder_checkpoint(path):
    """A folder that is (or was meant to be) one checkpoint, rather than a run's out_dir."""
    return NAMES.match(os.path.basename(os.path.normpath(path))) is not None or \
        any(os.path.exists(os.path.join(path, n)) for n in (STATE, ".metadata"))


def consolidate(folder, out):
    """A checkpoint folder -> one checkpoint file, as a single process would have written it."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder (consolidate turns a folder into a file)")
    if os.path.exists(out):  # never over a run's ckpt.pt, nor any other file: nothing is lost by a typo
        raise CheckpointError(f"{out} exists; give a new file name (remove {out} yourself to replace it)")
    ckpt = load(folder)
    save(ckpt, out)
    return ckpt


USAGE = "usage: python checkpoint.py OUT_DIR | CHECKPOINT | consolidate FOLDER OUT.pt"


def main(argv):
    if argv[:1] == ["consolidate"]:
        if len(argv) != 3:
            print(f"error: {USAGE}", file=sys.stderr)
            sys.exit(2)
        try:
            ckpt = consolidate(argv[1], argv[2])
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        print(f"wrote {argv[2]} (iteration {ckpt['iter_num']}, {os.path.getsize(argv[2]) / 2**20:.1f} MB): "
              f"sample.py, export.py --ckpt and train.py --resume_from read it")
        return
    if len(argv) != 1:
        print(f"error: {USAGE}", file=sys.stderr)
        sys.exit(2)
    target = argv[0]
    if os.path.isdir(target) and not is_folder_checkpoint(target):
        files = candidates(target)
        if not files:
            sys.exit(f"error: no checkpoint in {target!r}")
        print(f"{'file (newest first)':<24} {'branch':>6} {'iter':>8} {'val loss':>9} {'size':>12}  {'written':<19}  status")
        for path in files:
            print(describe(path))
        return
    try:
        ckpt = load(target, tensors=False)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    meta = dict(ckpt.get("metadata") or {})
    it = ckpt.get("iter_num")
    print(f"file:          {target}")
    print(f"format:        {ckpt.get('format_version', 'nanoGPT (no format_version)')}")
    print(f"iter_num:      {it}")
    print(f"best_val_loss: {ckpt.get('best_val_loss')}")
    print(f"model_args:    {ckpt['model_args']}")
    val, last = meta.pop("val_loss", None), meta.pop("last_eval", None)
    if isinstance(val, float):
        print(f"val_loss:      {val:.4f} (measured at iteration {it})")
    else:
        print(f"val_loss:      not measured at iteration {it}"
              + (f" (last eval: iteration {last[0]}, {last[1]:.4f})" if last else ""))
    resumes = meta.pop("resumes", [])
    for k, v in meta.items():
        print(f"{k + ':':<15}{v}")
    print(f"exact resume:  {'yes' if 'rng' in ckpt else 'no (no RNG state: resume is approximate)'}")
    if "files" in ckpt:
        print(f"sharded:       {len(ckpt['files'])} files, each CRC-checked (DCP; consolidate makes one file)")
    print(f"lineage:       began from {meta.get('init_from', '?')}, resumed {len(resumes)} time(s)")
    for r in resumes:
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in r.get("changed", {}).items()) or "nothing changed"
        print(f"  {r['time']}  iteration {r['iter']} from {r['from']} (branch {r['branch']}): {changed}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BrokenPipeError:  # `python checkpoint.py out | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
