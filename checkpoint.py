"""
Checkpoint files and folders: atomic save, safe load, content checks, finding the newest good one,
and a small inspect CLI (retention is the Checkpointer's, RNG capture and the resume rules resume.py's):

    python checkpoint.py out-shakespeare-char      # list the checkpoints in a folder (exit 1 if one is bad)
    python checkpoint.py out-shakespeare-char/ckpt.pt   # one file's metadata: its header only (mmap)
    python checkpoint.py verify out-shakespeare-char/ckpt.pt   # the same, every CRC checked
    python checkpoint.py s3://bucket/run           # a remote_dir's checkpoints, complete or not (remote.py)
    python checkpoint.py verify s3://bucket/run    # the same, every object read back and CRC-checked

A checkpoint is one torch.save'd dict of tensors and plain Python values, so torch.load with
weights_only=True reads it and a file can never run code when loaded. It keeps nanoGPT's keys
(model, optimizer, model_args, iter_num, best_val_loss, config) so files move both ways, and adds
scaler, rng (one entry per rank), format_version, metadata, and what generation needs besides the
weights: tokenizer (tokenizer.py's record) and data_fingerprint (dataset.TokenData.fingerprint).
load_weights reads only what sample.py and export.py use: the weights, memory-mapped.

Under FSDP the periodic checkpoints are folders (ckpt-00001000/) written by every rank at once with
torch.distributed.checkpoint (DCP): each rank's shard of the weights and AdamW state in its own
__R_0.distcp file, DCP's .metadata, and state.pt, the same dict as a file less model and optimizer,
plus the size and CRC-32 of every other file in the folder (DCP keeps no checksum of its own). A
folder is written under a temporary name and renamed when every rank has finished (distributed.py);
load() verifies it and, when the tensors are wanted whole, reads them with DCP into the same dict a
file gives, so sample.py, export.py and a resume without FSDP take either. Consolidate one:

    python checkpoint.py consolidate out/ckpt-00001000 ckpt.pt
"""
import errno
import functools
import os
import pickle
import random
import re
import secrets
import shutil
import stat
import sys
import time
import warnings
import zipfile
import zlib

import numpy as np
import torch

import tokenizer
from atomicfile import atomic_write, fsync_dir, replace_folder
from configurator import RunError, cut_line, first_line
from metrics import say
from model import GPT, GPTConfig

FORMAT_VERSION = 1
BEST = "ckpt.pt"                  # nanoGPT's file: best val loss so far (or every eval), read by sample.py
PERIODIC = "ckpt-{:08d}.pt"       # every checkpoint_interval iterations, on signals, at the end (branch 0)
BRANCHED = "ckpt-{:08d}-b{}.pt"   # the same for branch b > 0 (a run resumed by hand from an older file)
KEPT_BEST = "ckpt-best-b{}-{:08d}.pt"  # another branch's ckpt.pt, kept when a branch writes its own
NAMES = re.compile(r"ckpt(\.pt|-best-b\d+-\d{8}\.pt|-\d{8}(-b\d+)?(\.pt)?)$")  # periodic ones: files or folders
STATE = "state.pt"  # a checkpoint folder's plain part; the rest of the folder is DCP's
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def periodic_name(it, branch=0, folder=False):
    name = PERIODIC.format(it) if branch == 0 else BRANCHED.format(it, branch)
    return name[:-len(".pt")] if folder else name


def new_run_id():
    return secrets.token_hex(4)


class CheckpointError(RunError):
    """A file that cannot be used as a checkpoint; the message says why in one line."""


# ---------------------------------------------------------------------------------------------
# writing

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


def verified(path):
    """True if load() takes it: every record of the file, or every file of the folder, matches its
    CRC-32 (one full read), and its contents pass check_contents (a file's tensors are mapped, not
    read a second time)."""
    try:
        if _kind(path) == "folder":
            verify_folder(path)
        else:
            _check_crcs(path)
            check_contents(_torch_load(path, mmap=True), path)
        return True
    except CheckpointError:
        return False


def python_rng(entry):
    """The state random.setstate takes, from a checkpoint's rng[rank]["python"]: [version, the 625
    words as an int64 tensor (one pickled object rather than 625: a save pickles faster), gauss];
    older files hold the words as a list."""
    version, state, gauss = entry
    return version, tuple(state.tolist() if isinstance(state, torch.Tensor) else state), gauss


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
    every file's size and CRC) written in it, fsynced, then the folder renamed in (replace_folder: a
    folder already under that name, the same iteration redone after a fall-back, is replaced whole).
    Until the rename the folder has a temp name, which nothing reads and the next start removes: a
    folder under a checkpoint's name is always whole. Raises CheckpointError, leaving no folder
    under `path`'s name that was not there before."""
    try:
        atomic_save(dict(state, files=files), os.path.join(tmp, STATE))
        fsync_dir(tmp)
        replace_folder(tmp, path)
    except Exception as e:  # OSError, and torch.save's RuntimeError on a short write (a full disk, a file-size limit)
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
    path = os.path.join(folder, ".metadata")
    if _kind(path) != "file":
        raise CheckpointError(f"{folder}: not a checkpoint folder (.metadata is a folder)")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{folder}: refused, its .metadata needs arbitrary pickle, which can run code "
                              f"({cut_line(str(e))})") from None
    except Exception as e:
        raise CheckpointError(f"{folder}: unreadable .metadata ({first_line(e)})") from None
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(isinstance(m, TensorStorageMetadata) for m in entries.values()):
        raise CheckpointError(f"{folder}: refused, its .metadata holds entries that are not tensors")
    return md


def _folder_state(folder):
    """state.pt of a checkpoint folder: plain data, loaded with weights_only=True, with the folder's
    own bookkeeping (files, aliases, optimizer_groups) in the form verify_folder and read_shards use."""
    state_path = os.path.join(folder, STATE)
    if not os.path.lexists(state_path):
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {STATE}: not written by train.py, or "
                              f"copied in part)")
    state = _torch_load(state_path)
    files, aliases, groups = state.get("files"), state.get("aliases", {}), state.get("optimizer_groups")
    listed = isinstance(files, dict) and all(
        isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..")  # in the folder, no path
        and isinstance(v, (list, tuple)) and len(v) == 2 and all(type(x) is int for x in v) for n, v in files.items())
    named = isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()) \
        and isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    if not listed:
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE} does not list the folder's files "
                              f"with their sizes and CRCs)")
    if not named:
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE}'s 'aliases' or 'optimizer_groups' "
                              f"do not name parameters)")
    return state


def folder_files(folder):
    """{file name: [size, CRC-32]} of a checkpoint folder's files, as its state.pt lists them."""
    return _folder_state(folder)["files"]


def _check_folder(folder, state, md):
    """check_contents for a folder, its tensors judged by the names, shapes and dtypes DCP's metadata
    gives them (as meta tensors: nothing is read or allocated)."""
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype, device="meta") for k, m in md.state_dict_metadata.items()}
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {}
    for k, v in flat.items():
        if k.startswith("optim.") and "." in k[len("optim."):]:
            name, stat_ = k[len("optim."):].rsplit(".", 1)
            optim.setdefault(name, {})[stat_] = v
    for alias, name in state.get("aliases", {}).items():  # a tied weight is stored once
        if name not in model:
            raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE} ties {alias} to {name}, which "
                                  f".metadata lacks)")
        model[alias] = model[name]
    try:
        optimizer = optimizer_by_id(optim, state["optimizer_groups"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder (.metadata holds optimizer state for {e}, "
                              f"which no param group in {STATE} has)") from None
    check_contents(dict(state, model=model, optimizer=optimizer), folder)


def verify_folder(folder):
    """The folder's plain state, after checking state.pt's CRCs and every listed file's size and
    CRC-32, that DCP's .metadata is safe to read, and the contents (check_contents). Raises
    CheckpointError naming the bad file."""
    state = _folder_state(folder)
    _check_crcs(os.path.join(folder, STATE))
    for name, (size, crc) in sorted(state["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            raise CheckpointError(f"{folder}: incomplete ({name} is missing)")
        kind, why = _stat(path)
        if kind != "file":
            raise CheckpointError(f"{folder}: corrupt ({name}: {why or 'a folder'})")
        try:
            got = crc32(path)
        except OSError as e:
            raise CheckpointError(f"{folder}: unreadable ({name}: [Errno {e.errno}] {e.strerror})") from None
        if got[0] != size:
            raise CheckpointError(f"{folder}: corrupt ({name} has {got[0]:,} bytes, {size:,} were written)")
        if got[1] != crc:
            raise CheckpointError(f"{folder}: corrupt (CRC mismatch in {name})")
    _check_folder(folder, state, _dcp_metadata(folder))
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


def read_shards(folder, state, optimizer=True):
    """The tensors of a verified checkpoint folder, whole, in this process alone (no process group):
    (model state dict, optimizer state dict in torch's format, or None without optimizer)."""
    import torch.distributed.checkpoint as dcp
    md = _dcp_metadata(folder)
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if optimizer or k.startswith("model.")}
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: it is meant so
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, checkpoint_id=folder, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    for alias, name in state.get("aliases", {}).items():  # a tied weight is stored once
        model[alias] = model[name]
    if not optimizer:
        return model, None
    optim = {}
    for k, v in flat.items():
        if k.startswith("optim."):
            name, stat = k[len("optim."):].rsplit(".", 1)
            optim.setdefault(name, {})[stat] = v
    return model, optimizer_by_id(optim, state["optimizer_groups"])


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


def _stat(path):
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


def _kind(path):
    """'file' or 'folder' (see _stat); anything else raises CheckpointError."""
    kind, why = _stat(path)
    if kind is None:
        raise CheckpointError(f"{path}: {why}")
    return kind


STORAGE = re.compile(r"/data/\d+$")  # a tensor storage's record in torch.save's zip archive


def _check_crcs(path, names=None):
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
    except Exception as e:  # BadZipFile, and EOFError or UnicodeDecodeError from a damaged local header
        raise CheckpointError(f"{path}: unreadable (a damaged zip archive: {first_line(e)})") from None
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


def _weight_records(path, ckpt):
    """The zip records that hold the model's weights, or None (all of them) when that cannot be told.
    torch.save names storages data/0, data/1, ... as the pickler first meets them, so when `model` is
    the dict's first key (ours and nanoGPT's) its storages are the first ones."""
    if next(iter(ckpt)) != "model":
        return None
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in ckpt["model"].values()}
    with zipfile.ZipFile(path) as zf:
        prefix = zf.namelist()[0].split("/")[0]
    return [f"{prefix}/data/{i}" for i in range(len(storages))]


# What a checkpoint holds, judged by check_contents: a file with valid CRCs may still come from another
# program, another version or a hand edit, and each script would otherwise fail on it with a traceback.
REQUIRED = ("model", "optimizer", "model_args", "iter_num", "best_val_loss")  # nanoGPT's keys (and config)
MASK = re.compile(r"transformer\.h\.\d+\.attn\.bias")  # nanoGPT's causal-mask buffer (torch < 2.0): not a weight
BLOCK = "transformer.h.0."
SCALER = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _count(v):
    return type(v) is int and v >= 0  # (True is an int to Python, never a count here)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _name(v):
    return v is None or isinstance(v, str)


def _show(v):
    """A value as a message shows it: a short repr as it is, anything else by its type."""
    text = repr(v)
    return text if len(text) <= 40 and not isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


# metadata that train.py, resume and this file's CLI read, and what each must be
META = dict(run_id=_name, init_from=_name, dataset=_name, branch=_count, world_size=_count, train_seconds=_number,
            tokens_seen=lambda v: v is None or _count(v), val_loss=lambda v: v is None or _number(v),
            last_eval=lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and _count(v[0])
                                              and _number(v[1])),
            resumes=lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v))


def _plain_problem(ckpt):
    """What is wrong with the plain values of a checkpoint, or None."""
    if not _count(ckpt["iter_num"]):
        return f"iter_num is {_show(ckpt['iter_num'])}, not a whole number"
    best = ckpt["best_val_loss"]  # nanoGPT stores a 0-d tensor
    if not (_number(best) or isinstance(best, torch.Tensor) and best.numel() == 1 and best.is_floating_point()):
        return f"best_val_loss is {_show(best)}, not a number"
    version = ckpt.get("format_version")
    if version is not None and not _count(version):
        return f"format_version is {_show(version)}, not a number"
    if version is not None and version > FORMAT_VERSION:
        return f"format_version {version}: written by a newer version of this project, which reads {FORMAT_VERSION}"
    config = ckpt.get("config", {})
    if not isinstance(config, dict):
        return f"config is {_show(config)}, not a dict of the run's settings"
    for k in ("dataset", "init_from"):
        if not _name(config.get(k)):
            return f"config {k}={_show(config[k])}, not a name"
    meta = ckpt.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return f"metadata is {_show(meta)}, not a dict"
    for k, ok in META.items():
        if meta and k in meta and not ok(meta[k]):
            return f"metadata {k}={_show(meta[k])} is of the wrong type"
    if ckpt.get("tokenizer") is not None and _args_problem(ckpt["model_args"]) is None:
        why = tokenizer.problem(ckpt["tokenizer"], ckpt["model_args"]["vocab_size"])
        if why:
            return why
    prints = ckpt.get("data_fingerprint")
    if prints is not None and not (isinstance(prints, dict) and all(
            isinstance(v, list) and len(v) == 2 and _count(v[0]) and isinstance(v[1], str) for v in prints.values())):
        return "data_fingerprint is not the bins' sizes and hashes"
    scaler = ckpt.get("scaler")
    if scaler and not (isinstance(scaler, dict) and all(_number(scaler.get(k)) for k in SCALER)):
        return "scaler is not a GradScaler's state"
    rngs = ckpt.get("rng")
    if rngs is not None and not isinstance(rngs, list):
        return f"rng is {_show(rngs)}, not a list of the ranks' RNG states"
    for i, r in enumerate(rngs or []):
        try:  # restored into throw-away generators: the process's own stay untouched
            random.Random().setstate(python_rng(r["python"]))
            name, keys, pos, has_gauss, cached = r["numpy"]
            np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            torch.Generator().set_state(r["torch"])
            if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in r["cuda"]):
                raise TypeError
        except Exception:
            return f"rng of rank {i} is not a state that Python, numpy and torch can restore"
    return None


def _args_problem(args):
    """What keeps GPT(GPTConfig(**model_args)) from being built, or None."""
    if not isinstance(args, dict):
        return f"model_args is {_show(args)}, not a dict"
    missing = [k for k in MODEL_ARGS if k not in args]
    if missing:
        return f"model_args lacks {', '.join(missing)}"
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if not _count(args[k]) or args[k] < 1:
            return f"model_args {k}={_show(args[k])}, not a whole number >= 1"
    if args["n_embd"] % args["n_head"]:
        return f"model_args n_embd={args['n_embd']} is not a multiple of n_head={args['n_head']}"
    if type(args["bias"]) is not bool:
        return f"model_args bias={_show(args['bias'])}, not True or False"
    if not _number(args["dropout"]) or not 0 <= args["dropout"] < 1:
        return f"model_args dropout={_show(args['dropout'])}, not a number in [0, 1)"
    return None


@functools.lru_cache(maxsize=4)
def _one_block(n_head, n_embd, block_size, bias, vocab_size):
    """(name, shape) of a one-block GPT's state dict and of its parameters (in the order AdamW's
    groups take them): built on the meta device, so it costs neither memory nor an init."""
    gpt = GPT.skeleton(GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                                 vocab_size=vocab_size))
    return ([(n, tuple(t.shape)) for n, t in gpt.state_dict().items()],
            [(n, tuple(p.shape)) for n, p in gpt.named_parameters()])


def _blocks(pairs, n_layer):
    """A one-block GPT's (name, shape) pairs -> those of n_layer blocks, in the model's order."""
    block = [(n[len(BLOCK):], s) for n, s in pairs if n.startswith(BLOCK)]
    out = []
    for n, s in pairs:
        if not n.startswith(BLOCK):
            out.append((n, s))
        elif n == BLOCK + block[0][0]:
            out += [(f"transformer.h.{i}.{b}", bs) for i in range(n_layer) for b, bs in block]
    return out


def _tensors_problem(model, optimizer, args):
    """What keeps `model` from being exactly GPT(model_args)'s tensors, or `optimizer` from being its
    AdamW's state, or None."""
    if not isinstance(model, dict) or \
            not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in model.items()):
        return "model is not a dict of named tensors"
    model = {k: t for k, t in strip_prefixes(model).items() if not MASK.fullmatch(k)}
    state_dict, params = _one_block(*(args[k] for k in ("n_head", "n_embd", "block_size", "bias", "vocab_size")))
    n_layer = args["n_layer"]
    want = len(state_dict) + (n_layer - 1) * sum(n.startswith(BLOCK) for n, _ in state_dict)
    if n_layer > len(model):  # no file of that model could have so few tensors: not worth listing them
        return f"model holds {len(model)} tensors, GPT(model_args) has {want}"
    shapes = dict(_blocks(state_dict, n_layer))
    missing, extra = [n for n in shapes if n not in model], [n for n in model if n not in shapes]
    if missing:
        return f"model lacks {missing[0]}" + (f" and {len(missing) - 1} more of GPT(model_args)'s {want} tensors"
                                              if len(missing) > 1 else "")
    if extra:
        return f"model holds {extra[0]}, which GPT(model_args) has no place for" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for n, shape in shapes.items():
        t = model[n]
        if tuple(t.shape) != shape:
            return f"model's {n} has shape {tuple(t.shape)}, GPT(model_args)'s {shape}"
        if not t.is_floating_point() or t.layout != torch.strided:
            return f"model's {n} holds {t.dtype} ({t.layout}), not floating-point weights"
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) or not isinstance(groups, list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return "optimizer is not an optimizer's state_dict, with state and param_groups"
    order = _blocks(params, n_layer)  # GPT.configure_optimizers' groups, as nanoGPT's: matrices, then the rest
    ours = [[p for p in order if len(p[1]) >= 2], [p for p in order if len(p[1]) < 2]]
    if [len(g["params"]) for g in groups] != [len(g) for g in ours]:
        return (f"optimizer's param groups hold {[len(g['params']) for g in groups]} parameters, GPT(model_args)'s "
                f"AdamW {[len(g) for g in ours]}")
    ids = [i for g in groups for i in g["params"]]
    if not all(type(i) is int for i in ids) or len(set(ids)) != len(ids):
        return "optimizer's param groups do not number each parameter once"
    for g in groups:
        betas = g.get("betas", (0.9, 0.95))
        if not all(_number(g[k]) for k in ("lr", "weight_decay", "eps") if k in g) or not (
                isinstance(betas, (list, tuple)) and len(betas) == 2 and all(map(_number, betas))):
            return "optimizer's param groups hold hyperparameters that are not numbers"
    param = dict(zip(ids, (p for g in ours for p in g)))
    for i, st in optimizer["state"].items():
        if i not in param or not isinstance(st, dict):
            return f"optimizer holds state for parameter {_show(i)}, which its param groups lack"
        name, shape = param[i]
        for k in ("exp_avg", "exp_avg_sq"):
            t = st.get(k)
            if not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.is_floating_point()):
                what = f"has shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"is {_show(t)}"
                return f"optimizer's {k} of {name} {what}, not a float tensor of shape {shape}"
        step = st.get("step")
        if not (_number(step) or isinstance(step, torch.Tensor) and step.numel() == 1):
            return f"optimizer's step of {name} is {_show(step)}, not a number"
    return None


def check_contents(ckpt, path):
    """Judge what a loaded checkpoint holds, not only its bytes: nanoGPT's keys and their types,
    model_args that make a GPT, `model` exactly that GPT's tensors in their shapes (nanoGPT's
    causal-mask buffers aside), `optimizer` its AdamW's state, and the scaler, RNG, config and
    metadata that a resume restores. The expected names and shapes come from a GPT on the meta
    device, never built for real. Raises CheckpointError naming path and the first thing wrong."""
    missing = [k for k in REQUIRED if k not in ckpt] if isinstance(ckpt, dict) else None
    if missing is None:
        why = f"it holds {_show(ckpt)}, not a dict"
    elif missing:
        why = f"no {' and no '.join(map(repr, missing))} key"
    else:  # (each part assumes the ones before it found nothing)
        why = _plain_problem(ckpt) or _args_problem(ckpt["model_args"]) or \
            _tensors_problem(ckpt["model"], ckpt["optimizer"], ckpt["model_args"])
    if why:
        raise CheckpointError(f"{path}: not a GPT checkpoint ({why})")


def _torch_load(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) of a regular file, every failure turned into a one-line CheckpointError."""
    if _kind(path) == "folder":
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path}: unreadable (not a torch.save archive: truncated, or not a checkpoint)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; what matters in it is the global it refused to import
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {found.group(1)}" if found else cut_line(str(e).strip().splitlines()[-1])
        raise CheckpointError(f"{path}: refused, loading it would need arbitrary pickle, which can run code "
                              f"({what}, not plain data)") from None
    except Exception as e:  # truncated zip, bad magic, unreadable: all mean "not a usable file"
        raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a GPT checkpoint (it holds {_show(ckpt)}, not a dict)")
    return ckpt


def load(path, map_location="cpu", tensors=True):
    """Load and verify one checkpoint. Raises CheckpointError with a one-line reason for a missing,
    truncated, corrupt, foreign or unsafe file; an unsafe pickle is refused before any of it runs.
    A folder is verified in full (every file's CRC); with tensors=False only its plain part is
    returned (FSDP then reads each rank's share of the shards itself, distributed.load_sharded);
    with tensors=True the very dict a single file holds. Both are judged by check_contents."""
    if _kind(path) == "folder":
        ckpt = verify_folder(path)
        if tensors:  # the weights first, as a file has them (consolidate writes this dict)
            model, optimizer = read_shards(path, ckpt)
            ckpt = dict(model=model, optimizer=optimizer, **{k: v for k, v in ckpt.items()
                                                             if k not in ("files", "aliases", "optimizer_groups")})
        return ckpt
    _check_crcs(path)
    ckpt = _torch_load(path, map_location)
    check_contents(ckpt, path)
    return _plain_weights(ckpt, path)


def _plain_weights(ckpt, path):
    """A judged file's dict as every reader wants it: real tensors (not meta), plain names (no
    prefixes, no causal-mask buffers), best_val_loss a float (nanoGPT stores a 0-d tensor)."""
    if any(t.is_meta for t in ckpt["model"].values()):
        raise CheckpointError(f"{path}: not a GPT checkpoint (its model holds meta tensors: shapes without weights)")
    ckpt["model"] = {k: t for k, t in strip_prefixes(ckpt["model"]).items() if not MASK.fullmatch(k)}
    if isinstance(ckpt["best_val_loss"], torch.Tensor):
        ckpt["best_val_loss"] = ckpt["best_val_loss"].item()
    return ckpt


WEIGHTS = ("model", "model_args", "iter_num", "best_val_loss", "config", "tokenizer", "format_version", "metadata")


def load_weights(path):
    """What generation and export read: the weights and the plain values in WEIGHTS, never the
    optimizer, scaler or RNG. A file's weights are memory-mapped, so they take memory only as they
    are used, and only the records that hold them (and the pickle) are CRC-checked; a folder is
    verified in full (its DCP files hold weights and optimizer together) and only its weights are
    read. Judged by check_contents as load() is; raises CheckpointError."""
    if _kind(path) == "folder":
        ckpt = verify_folder(path)
        ckpt["model"] = read_shards(path, ckpt, optimizer=False)[0]
    else:
        _check_crcs(path, lambda name: not STORAGE.search(name))  # the pickle and the small records, first
        ckpt = _torch_load(path, mmap=True)
        check_contents(ckpt, path)
        try:
            names = _weight_records(path, ckpt)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
        _check_crcs(path, names)
        ckpt = _plain_weights(ckpt, path)
    return {k: ckpt[k] for k in WEIGHTS if k in ckpt}


def read_header(path):
    """What ranks a file, read without its tensors (memory-mapped: the tensors are never read): iteration,
    run id, branch, kind, val loss. Its contents are judged (check_contents: shapes, not values);
    only load() checks the CRCs."""
    if _kind(path) == "folder":
        ckpt = _folder_state(path)
        _check_folder(path, ckpt, _dcp_metadata(path))
    else:
        ckpt = _torch_load(path, mmap=True)
        check_contents(ckpt, path)
    meta = ckpt.get("metadata") or {}
    name = os.path.basename(path)
    kind = "best" if name == BEST else "kept" if name.startswith("ckpt-best-") else "periodic"
    return dict(path=path, iter_num=ckpt["iter_num"], run_id=meta.get("run_id"), branch=meta.get("branch", 0),
                kind=kind, val_loss=meta.get("val_loss"))


def rank(h):
    """Newest first: the highest branch (branches are numbered as they are made), then the highest
    iteration; at a tie a periodic file, which is written after ckpt.pt at the same iteration."""
    return h["branch"], h["iter_num"], {"periodic": 2, "best": 1, "kept": 0}[h["kind"]]


def scan(out_dir, tries=5):
    """The checkpoints in out_dir: (headers newest first by content, [(path, reason)] for each entry
    with a checkpoint's name that cannot be used: unreadable, foreign, a dangling symlink...). File
    times are never used: copies, restores and downloads change them. An entry that vanishes while
    it is read (retention deleting it under a running trainer) is left out, and the folder is
    listed again: by then the newer file that replaced it is there."""
    for _ in range(tries):
        try:
            names = sorted(os.listdir(out_dir))
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        except OSError as e:
            raise CheckpointError(f"out_dir {out_dir!r} cannot be listed ([Errno {e.errno}] {e.strerror})") from None
        heads, bad, vanished = [], [], False
        for name in filter(NAMES.match, names):
            path = os.path.join(out_dir, name)
            try:
                heads.append(read_header(path))
            except CheckpointError as e:
                if os.path.lexists(path):
                    bad.append((path, str(e)))
                else:
                    vanished = True
        if not vanished:
            break
    return sorted(heads, key=rank, reverse=True), bad


def candidates(out_dir):
    """Every file with a checkpoint's name in out_dir: readable ones newest first, then the rest."""
    heads, bad = scan(out_dir)
    return [h["path"] for h in heads] + [path for path, _ in bad]


def load_latest(out_dir, map_location="cpu", log=say, tensors=True, load_one=None):
    """The newest checkpoint in out_dir that loads; each bad one is reported in one line. load_one:
    how to load it (load_weights, for generation), instead of load(path, map_location, tensors)."""
    load_one = load_one or (lambda path: load(path, map_location, tensors))
    heads, bad = scan(out_dir)
    for path, why in bad:
        log(f"warning: skipping {why}; left in place, not counted as a checkpoint")
    if not heads and not bad:
        raise CheckpointError(f"no checkpoint in {out_dir!r} (looked for {BEST}, ckpt-*.pt and ckpt-*/ folders)")
    for i, h in enumerate(heads):
        try:
            return h["path"], load_one(h["path"])
        except CheckpointError as e:
            nxt = f"falling back to {os.path.basename(heads[i + 1]['path'])}" if i + 1 < len(heads) else "no older one left"
            log(f"warning: skipping {e}; {nxt}")
    raise CheckpointError(f"none of the {len(heads) + len(bad)} checkpoint(s) in {out_dir!r} loads (see warnings above)")


# ---------------------------------------------------------------------------------------------
# inspect CLI

def _size(path):
    """Bytes of a file, or of a folder's files; 0 for what cannot be stat'ed (a dangling symlink)."""
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_size
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:  # gone, a loop, or a folder entry deleted while it was summed
        return 0


def describe(path):
    """(one line: run id, branch, iteration, val loss measured at that iteration, size, time, whether
    it loads, or that it is gone (deleted since it was listed: retention, under a running trainer);
    its run id, or None)."""
    try:
        ckpt, status = inspect(path, crcs=True), "ok"
    except CheckpointError as e:
        ckpt, status = {}, f"BAD: {e}"
    try:
        st = os.stat(path) if os.path.exists(path) else os.lstat(path)  # a dangling symlink: the link's own
    except OSError:
        gone = "-"
        return (f"{os.path.basename(path):<24} {gone:>8} {gone:>6} {gone:>8} {gone:>9} {gone:>12}  {gone:<19}  "
                f"gone (deleted since listed)"), None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    name = os.path.basename(path) + ("/" if stat.S_ISDIR(st.st_mode) else "")
    meta = ckpt.get("metadata") or {}
    val = meta.get("val_loss")
    val = f"{val:.4f}" if isinstance(val, float) else "-"
    branch, it = (meta.get("branch", 0), ckpt["iter_num"]) if ckpt else ("-", "-")
    run = meta.get("run_id") if isinstance(meta.get("run_id"), str) else None
    return (f"{name:<24} {run or '-':>8} {branch:>6} {it:>8} {val:>9} {_size(path) / 2**20:9.1f} MB  {when}  "
            f"{status}"), run


def inspect(path, crcs):
    """The plain values of a checkpoint, judged (check_contents), its tensors never read into memory:
    a file's are memory-mapped and left alone. crcs: every CRC checked too, in one streaming read
    (a folder's always are, as load does)."""
    if _kind(path) == "folder":
        return load(path, tensors=False)
    _check_crcs(path, None if crcs else lambda name: not STORAGE.search(name))  # the header's records at least
    ckpt = _torch_load(path, mmap=True)
    check_contents(ckpt, path)
    return ckpt


def is_folder_checkpoint(path):
    """A folder that is (or was meant to be) one checkpoint, rather than a run's out_dir."""
    return NAMES.match(os.path.basename(os.path.normpath(path))) is not None or \
        any(os.path.lexists(os.path.join(path, n)) for n in (STATE, ".metadata"))


def consolidate(folder, out):
    """A checkpoint folder -> one checkpoint file, as a single process would have written it."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder (consolidate turns a folder into a file)")
    if os.path.exists(out):  # never over a run's ckpt.pt, nor any other file: nothing is lost by a typo
        raise CheckpointError(f"{out} exists; give a new file name (remove {out} yourself to replace it)")
    ckpt = load(folder)
    save(ckpt, out)
    return ckpt


USAGE = ("usage: python checkpoint.py OUT_DIR | REMOTE_DIR | CHECKPOINT | verify CHECKPOINT | verify REMOTE_DIR | "
         "consolidate FOLDER OUT.pt")


def main(argv):
    if argv[:1] in (["--help"], ["-h"]):
        print(f"{__doc__.strip()}\n\n{USAGE}")
        return
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
    verify = argv[:1] == ["verify"]
    if len(argv) != 1 + verify:
        print(f"error: {USAGE}", file=sys.stderr)
        sys.exit(2)
    target = argv[-1]
    if "://" in target:  # a remote_dir: its commit objects (verify: every object's CRC read back)
        import remote  # (remote imports this module: imported here, for this command only)
        try:
            lines, ok = remote.describe(target, verify)
        except remote.RemoteError as e:
            sys.exit(f"error: {e}")
        print("\n".join(lines))
        if not ok:
            sys.exit(1)
        return
    if os.path.isdir(target) and not is_folder_checkpoint(target):
        try:
            files = candidates(target)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        if not files:
            sys.exit(f"error: no checkpoint in {target!r}")
        print(f"{'file (newest first)':<24} {'run':>8} {'branch':>6} {'iter':>8} {'val loss':>9} {'size':>12}  "
              f"{'written':<19}  status")
        bad, runs = 0, {}
        for path in files:
            line, run = describe(path)
            bad += "  BAD: " in line
            if run is not None:
                runs.setdefault(run, []).append(os.path.basename(path))
            print(line, flush=True)
        if bad:  # every file listed first; then a script or CI job can tell from the exit code
            sys.exit(f"error: {bad} of the {len(files)} checkpoints in {target} {'is' if bad == 1 else 'are'} bad "
                     f"(see BAD above)")
        if len(runs) > 1:  # one folder holds one run: train.py refuses it too (resume.one_run)
            sys.exit(f"error: {target} holds {len(runs)} runs (" + "; ".join(
                f"{r}: {', '.join(sorted(names))}" for r, names in sorted(runs.items(), key=lambda r: -len(r[1])))
                + "): one folder holds one run; move each other run's files into a folder of their own")
        return
    try:
        ckpt = inspect(target, crcs=verify)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    meta = dict(ckpt.get("metadata") or {})
    it = ckpt["iter_num"]
    print(f"file:          {target}")
    print(f"format:        {ckpt.get('format_version', 'nanoGPT (no format_version)')}")
    print(f"iter_num:      {it}")
    print(f"best_val_loss: {ckpt['best_val_loss']}")
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
    record = ckpt.get("tokenizer")
    print("tokenizer:     " + ("none inside (nanoGPT's, or older): sample.py uses its dataset's meta.pkl" if record is None
                                else f"a char vocab of {len(record['itos'])} symbols" if record["kind"] == "char"
                                else f"BPE {record['name']}"))
    if "files" in ckpt:
        print(f"sharded:       {len(ckpt['files'])} files, each CRC-checked (DCP; consolidate makes one file)")
    elif not verify:
        print(f"checked:       its header only (the weights are not read); "
              f"python checkpoint.py verify {target} checks every byte's CRC")
    else:
        print("checked:       every record's CRC")
    print(f"lineage:       began from {meta.get('init_from', '?')}, resumed {len(resumes)} time(s)")
    for r in resumes:  # (written by train.py; shown as found in a file from elsewhere)
        changed = r.get("changed") if isinstance(r.get("changed"), dict) else {}
        changed = ", ".join(f"{k} {' -> '.join(map(repr, v)) if isinstance(v, (list, tuple)) else repr(v)}"
                            for k, v in changed.items()) or "nothing changed"
        print(f"  {r.get('time', '?')}  iteration {r.get('iter', '?')} from {r.get('from', '?')} "
              f"(branch {r.get('branch', '?')}): {changed}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BrokenPipeError:  # `python checkpoint.py out | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
