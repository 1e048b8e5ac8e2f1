"""
Checkpoint folders (FSDP): every rank writes its own shard of the weights and AdamW state at once
with torch.distributed.checkpoint (DCP), each in its own __R_0.distcp file, beside DCP's .metadata
and state.pt: the same dict as a checkpoint file less model and optimizer, plus the size and CRC-32
of every other file in the folder (DCP keeps no checksum of its own). A folder is written under a
temporary name and renamed in once every rank has finished (ShardedSaver, commit_folder); it is
verified in full before it is read (verify_folder), and .metadata is unpickled with only DCP's
plain record classes admitted. Resharding is DCP's: a folder loads at any world size.

FSDP2's state-dict helpers and DCP are imported in the functions that use them: importing them
adds to every start of every script (see python -X importtime), and only FSDP runs need them.
"""
import os
import pickle
import shutil
import warnings

import torch
import torch.distributed as dist

from console import cut_line, first_line
from distributed import from_rank0, local
from keep.atomic import TMP_TAG, fsync_dir, replace_folder
from keep.contents import check_contents
from keep.files import (STATE, CheckpointError, atomic_save, check_crcs, crc32, kind_of, os_error,
                        stat_path, torch_load)
from keep.worker import Worker


def commit_folder(tmp, path, state, files):
    """Make the finished temp folder `tmp` the checkpoint folder `path`: state.pt (the plain part,
    with every file's size and CRC) written in it, fsynced, then the folder renamed in
    (replace_folder: a folder already under that name, the same iteration redone after a fall-back,
    is replaced whole). Until the rename the folder has a temp name, which nothing reads and the
    next start removes: a folder under a checkpoint's name is always whole. Raises CheckpointError,
    leaving no folder under `path`'s name that was not there before."""
    try:
        atomic_save(dict(state, files=files), os.path.join(tmp, STATE))
        fsync_dir(tmp)
        replace_folder(tmp, path)
    except Exception as e:
        # OSError, and torch.save's RuntimeError on a short write (a full disk, a file-size limit)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {path}: {os_error(e)}") from None


# DCP pickles its .metadata and unpickles it with pickle.load: anything else a planted file names
# would run, so the file is first read here with only these classes admitted (all plain records).
_DCP_CLASSES = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_CLASSES and not dtype:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return super().find_class(module, name)


def dcp_metadata(folder):
    """DCP's metadata of a folder, read safely; every entry must be a tensor (DCP would unpickle any
    other entry with torch.load(weights_only=False))."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    path = os.path.join(folder, ".metadata")
    if kind_of(path) != "file":
        raise CheckpointError(f"{folder}: not a checkpoint folder (.metadata is a folder)")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{folder}: refused, its .metadata needs arbitrary pickle, which can "
                              f"run code ({cut_line(str(e))})") from None
    except Exception as e:
        raise CheckpointError(f"{folder}: unreadable .metadata ({first_line(e)})") from None
    entries = getattr(md, "state_dict_metadata", None)
    if (not isinstance(entries, dict)
            or not all(isinstance(m, TensorStorageMetadata) for m in entries.values())):
        raise CheckpointError(f"{folder}: refused, its .metadata holds entries that are not "
                              "tensors")
    return md


def folder_state(folder):
    """state.pt of a checkpoint folder: plain data, loaded with weights_only=True, with the folder's
    own bookkeeping (files, aliases, optimizer_groups) in the form verify_folder and read_shards
    use."""
    state_path = os.path.join(folder, STATE)
    if not os.path.lexists(state_path):
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {STATE}: not written by "
                              "train.py, or copied in part)")
    state = torch_load(state_path)
    files, aliases, groups = (state.get("files"), state.get("aliases", {}),
                              state.get("optimizer_groups"))
    listed = isinstance(files, dict) and all(
        # in the folder, no path
        isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..")
        and isinstance(v, (list, tuple)) and len(v) == 2 and all(type(x) is int for x in v)
        for n, v in files.items())
    named = isinstance(aliases, dict) \
        and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()) \
        and isinstance(groups, list) \
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    if not listed:
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE} does not list the "
                              "folder's files with their sizes and CRCs)")
    if not named:
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE}'s 'aliases' or "
                              "'optimizer_groups' do not name parameters)")
    return state


def folder_files(folder):
    """{file name: [size, CRC-32]} of a checkpoint folder's files, as its state.pt lists them."""
    return folder_state(folder)["files"]


def check_folder(folder, state, md):
    """check_contents for a folder, its tensors judged by the names, shapes and dtypes DCP's
    metadata gives them (as meta tensors: nothing is read or allocated)."""
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype, device="meta")
            for k, m in md.state_dict_metadata.items()}
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {}
    for k, v in flat.items():
        if k.startswith("optim.") and "." in k[len("optim."):]:
            name, stat_ = k[len("optim."):].rsplit(".", 1)
            optim.setdefault(name, {})[stat_] = v
    for alias, name in state.get("aliases", {}).items():  # a tied weight is stored once
        if name not in model:
            raise CheckpointError(f"{folder}: not a GPT checkpoint folder ({STATE} ties {alias} to "
                                  f"{name}, which .metadata lacks)")
        model[alias] = model[name]
    try:
        optimizer = optimizer_by_id(optim, state["optimizer_groups"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: not a GPT checkpoint folder (.metadata holds optimizer "
                              f"state for {e}, which no param group in {STATE} has)") from None
    check_contents(dict(state, model=model, optimizer=optimizer), folder)


def verify_folder(folder):
    """The folder's plain state, after checking state.pt's CRCs and every listed file's size and
    CRC-32, that DCP's .metadata is safe to read, and the contents (check_contents). Raises
    CheckpointError naming the bad file."""
    state = folder_state(folder)
    check_crcs(os.path.join(folder, STATE))
    for name, (size, crc) in sorted(state["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            raise CheckpointError(f"{folder}: incomplete ({name} is missing)")
        kind, why = stat_path(path)
        if kind != "file":
            raise CheckpointError(f"{folder}: corrupt ({name}: {why or 'a folder'})")
        try:
            got = crc32(path)
        except OSError as e:
            raise CheckpointError(f"{folder}: unreadable ({name}: [Errno {e.errno}] "
                                  f"{e.strerror})") from None
        if got[0] != size:
            raise CheckpointError(f"{folder}: corrupt ({name} has {got[0]:,} bytes, {size:,} were "
                                  "written)")
        if got[1] != crc:
            raise CheckpointError(f"{folder}: corrupt (CRC mismatch in {name})")
    check_folder(folder, state, dcp_metadata(folder))
    return state


def optimizer_by_id(state, groups):
    """AdamW's state keyed by parameter name (DCP, FSDP) -> torch's own optimizer.state_dict()
    format, keyed by the parameter's position in the param groups, as a single-file checkpoint has
    it."""
    ids = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    return {"state": {ids[name]: s for name, s in state.items()},
            "param_groups": [dict(g, params=[ids[n] for n in g["params"]]) for g in groups]}


def optimizer_by_name(optimizer_state, names):
    """The inverse: torch's format -> {"state": {name: ...}, "param_groups": [... names]}, with
    `names` the parameter names in the order of the param groups."""
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                             for g in optimizer_state["param_groups"]]}


def read_shards(folder, state, optimizer=True):
    """The tensors of a verified checkpoint folder, whole, in this process alone (no process group):
    (model state dict, optimizer state dict in torch's format, or None without optimizer)."""
    import torch.distributed.checkpoint as dcp
    md = dcp_metadata(folder)
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in md.state_dict_metadata.items()
            if optimizer or k.startswith("model.")}
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: it is meant so
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, checkpoint_id=folder, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]})") from None
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


# -----------------------------------------------------------------------------------------------
# writing and reading them under FSDP

def param_names(model, optimizer):
    """Parameter names in the order of the optimizer's param groups (a tied weight: its first
    name)."""
    names = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model, optimizer):
    """The whole model and optimizer state dicts, gathered to rank 0's CPU in torch's single-file
    format (every rank takes part; the others get ({}, None)): ckpt.pt stays one file that sample.py
    reads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if dist.get_rank() != 0:
        return {}, None
    return model_sd, optimizer_by_id(optim_sd["state"], optim_sd["param_groups"])


def load_full(model, optimizer, optimizer_state):
    """A single file's optimizer state (every rank holds it whole) into a sharded optimizer. The
    file's weights went into the model before it was sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    named = optimizer_by_name(optimizer_state, param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, named,
                             options=StateDictOptions(full_state_dict=True))


def _flat(model, optimizer):
    """The sharded tensors as DCP stores them: {'model.NAME': weight, 'optim.NAME.exp_avg': ...},
    all tensors (DCP would pickle anything else), with a tied weight once; plus the aliases and the
    optimizer's param groups (names and hyperparameters), which go in state.pt."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat, seen, aliases = {}, {}, {}
    for name, t in model_sd.items():
        where = (local(t).data_ptr(), tuple(t.shape))  # a tied weight: two names, one storage
        if where in seen:
            aliases[name] = seen[where]
        else:
            seen[where] = name
            flat[f"model.{name}"] = t
    for name, stats in optim_sd["state"].items():
        for stat, t in stats.items():
            flat[f"optim.{name}.{stat}"] = t
    return flat, aliases, model_sd, optim_sd


def load_sharded(folder, model, optimizer):
    """Each rank reads its share of a checkpoint folder, whatever world size wrote it (DCP
    reshards). The flat dict's tensors are the state dicts' own, so DCP's in-place load fills
    both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.api import CheckpointException
    flat, _, model_sd, optim_sd = _flat(model, optimizer)
    try:  # DCP gathers every rank's failure and raises it on all of them: one line each, the same
        dcp.load(flat, checkpoint_id=folder)
    except (Exception, CheckpointException) as e:  # (DCP's is a BaseException)
        raise CheckpointError(f"could not read {folder} ({_why(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


class ShardedSaver:
    """Checkpoint folders under FSDP: every rank writes its own shard at once (DCP), then the folder
    is committed (commit_folder) when all of them have finished. With background=True the
    tensors are first copied to host memory (DCP's staging: the only stall) and a thread writes them
    while training goes on; the Checkpointer asks busy() once per iteration, OR-ed over ranks, and
    calls finish() when no rank is writing any more. At most one save is in flight.

    DCP's process-based writer is not used: it starts its process with multiprocessing's 'spawn',
    which runs the main script again, and train.py is a script, as nanoGPT's is."""

    def __init__(self, device):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        # the writer's collectives stay off the training group
        self.group = dist.new_group(backend="gloo")
        # background saves copy the shard into host buffers kept from one save to the next (pinned
        # on a GPU, for fast copies): the memory of one more copy of this rank's share of the state
        options = StagingOptions(use_pinned_memory=device.startswith("cuda"),
                                 use_shared_memory=False, use_async_staging=False,
                                 use_non_blocking_copy=False)
        self.new_stager = lambda: DefaultStager(options)
        self.stager = self.new_stager()
        self.writer = Worker("checkpoint-shards")
        self.pending = None
        self.tag = [os.getpid()]
        dist.broadcast_object_list(self.tag, src=0, group=self.group)  # one temp name for all ranks

    def save(self, plain, path, model, optimizer, background=False):
        """Every rank calls this, with nothing in flight. In the foreground it returns once the
        folder is committed; in the background once the shard is staged, and finish() commits it. A
        failure on any rank (the state, the staging copy, the write, the commit) raises
        CheckpointError on every rank: the ranks agree before each step that waits for all of
        them."""
        import torch.distributed.checkpoint as dcp
        tmp = os.path.join(os.path.dirname(path),
                           f".{os.path.basename(path)}{TMP_TAG}{self.tag[0]}")
        why = None
        try:
            flat, aliases, _, optim_sd = _flat(model, optimizer)
            plain = dict(plain, aliases=aliases, optimizer_groups=optim_sd["param_groups"])
            # host copies (the only stall), which training cannot change under the write
            if background:
                flat = self.stager.stage(flat)
        except Exception as e:
            # out of host memory on this rank alone: the others must not wait in DCP for it
            why = _why(e)
            if background:  # the buffers the failed copy took go back to training
                self.stager.close()
                self.stager = self.new_stager()
        self._agree(why, tmp, path)
        write = lambda: dcp.save(flat, checkpoint_id=tmp, process_group=self.group)  # noqa: E731
        if background:
            self.pending = (self.writer.submit(self._written, write, tmp)[0], tmp, path, plain)
        else:
            self._commit(self._written(write, tmp), tmp, path, plain)

    def busy(self):
        return self.pending is not None and not self.pending[0].done()

    def finish(self):
        """Commit the save in flight, waiting for its writes if need be. Every rank calls it at
        once; raises CheckpointError on every rank if the write failed on any rank."""
        if self.pending is not None:
            task, *rest = self.pending
            self.pending = None
            self._commit(task.outcome(), *rest)

    @staticmethod
    def _written(write, tmp):
        """Run the DCP write; then the size and CRC-32 of the files this rank wrote (its shard; rank
        0 also DCP's .metadata), or one line saying why the write failed."""
        from torch.distributed.checkpoint.api import CheckpointException
        try:
            write()
            rank = dist.get_rank()
            mine = [n for n in os.listdir(tmp) if n.startswith(f"__{rank}_")
                    or (rank == 0 and n == ".metadata")]
            return {n: crc32(os.path.join(tmp, n)) for n in mine}
        except (Exception, CheckpointException) as e:  # (DCP's is a BaseException)
            return _why(e)

    def _agree(self, mine, tmp, path):
        """Every rank's outcome (a str says why it failed) gathered: if any rank failed, every rank
        raises CheckpointError with the first one's line (rank 0 removes the temp folder)."""
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=self.group)
        failed = [e for e in every if isinstance(e, str)]
        if failed:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write {path} ({failed[0].splitlines()[0][:200]})")
        return every

    def _commit(self, files, tmp, path, plain):
        """files: this rank's {name: [size, crc]}, or why its write failed. Rank 0 commits the
        folder, and every rank learns how that went."""
        every = self._agree(files, tmp, path)
        why = None
        if dist.get_rank() == 0:
            try:
                commit_folder(tmp, path, plain, {n: c for f in every for n, c in f.items()})
            except CheckpointError as e:
                why = str(e)
        why = from_rank0(why, self.group)
        if why:
            raise CheckpointError(why)


def _why(e):
    """A failed folder write as one line: the rank and its OS error (DCP gathers every rank's)."""
    from torch.distributed.checkpoint.api import CheckpointException
    if isinstance(e, CheckpointException) and e.failures:
        r = min(e.failures)
        return f"rank {r}: {os_error(e.failures[r][0])}"
    return f"rank {dist.get_rank()}: {os_error(e)}"
