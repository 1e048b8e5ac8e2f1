"""
The checkpoints of an out_dir: loading one (load, or load_weights for what generation reads), the
header that ranks it, the newest good one by content (never by file times: copies, restores and
downloads change them), and the one retention rule (keep_last, keep_every) that the local and the
remote tier share. A folder (FSDP) is read the same way as a file (folders.py).
"""
import os

import torch

from console import first_line, say
from keep.atomic import fsync_dir, remove_whole
from keep.contents import MASK, check_contents
from keep.files import (BEST, KEPT_BEST, NAMES, STORAGE, CheckpointError, check_crcs, kind_of,
                        torch_load,
                        weight_records, os_error, save, strip_prefixes)
from keep.folders import check_folder, dcp_metadata, folder_state, read_shards, verify_folder


def verified(path):
    """True if load() takes it: every record of the file, or every file of the folder, matches its
    CRC-32 (one full read), and its contents pass check_contents (a file's tensors are mapped, not
    read a second time)."""
    try:
        if kind_of(path) == "folder":
            verify_folder(path)
        else:
            check_crcs(path)
            check_contents(torch_load(path, mmap=True), path)
        return True
    except CheckpointError:
        return False


def load(path, map_location="cpu", tensors=True):
    """Load and verify one checkpoint. Raises CheckpointError with a one-line reason for a missing,
    truncated, corrupt, foreign or unsafe file; an unsafe pickle is refused before any of it runs.
    A folder is verified in full (every file's CRC); with tensors=False only its plain part is
    returned (FSDP then reads each rank's share of the shards itself, folders.load_sharded);
    with tensors=True the very dict a single file holds. Both are judged by check_contents."""
    if kind_of(path) == "folder":
        ckpt = verify_folder(path)
        if tensors:  # the weights first, as a file has them (consolidate writes this dict)
            model, optimizer = read_shards(path, ckpt)
            ckpt = dict(model=model, optimizer=optimizer,
                        **{k: v for k, v in ckpt.items()
                           if k not in ("files", "aliases", "optimizer_groups")})
        return ckpt
    check_crcs(path)
    ckpt = torch_load(path, map_location)
    check_contents(ckpt, path)
    return _plain_weights(ckpt, path)


def _plain_weights(ckpt, path):
    """A judged file's dict as every reader wants it: real tensors (not meta), plain names (no
    prefixes, no causal-mask buffers), best_val_loss a float (nanoGPT stores a 0-d tensor)."""
    if any(t.is_meta for t in ckpt["model"].values()):
        raise CheckpointError(f"{path}: not a GPT checkpoint (its model holds meta tensors: shapes "
                              "without weights)")
    ckpt["model"] = {k: t for k, t in strip_prefixes(ckpt["model"]).items()
                     if not MASK.fullmatch(k)}
    if isinstance(ckpt["best_val_loss"], torch.Tensor):
        ckpt["best_val_loss"] = ckpt["best_val_loss"].item()
    return ckpt


WEIGHTS = ("model", "model_args", "iter_num", "best_val_loss", "config", "tokenizer",
           "format_version", "metadata")


def load_weights(path):
    """What generation and export read: the weights and the plain values in WEIGHTS, never the
    optimizer, scaler or RNG. A file's weights are memory-mapped, so they take memory only as they
    are used, and only the records that hold them (and the pickle) are CRC-checked; a folder is
    verified in full (its DCP files hold weights and optimizer together) and only its weights are
    read. Judged by check_contents as load() is; raises CheckpointError."""
    if kind_of(path) == "folder":
        ckpt = verify_folder(path)
        ckpt["model"] = read_shards(path, ckpt, optimizer=False)[0]
    else:
        # the pickle and the small records, first
        check_crcs(path, lambda name: not STORAGE.search(name))
        ckpt = torch_load(path, mmap=True)
        check_contents(ckpt, path)
        try:
            names = weight_records(path, ckpt)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
        check_crcs(path, names)
        ckpt = _plain_weights(ckpt, path)
    return {k: ckpt[k] for k in WEIGHTS if k in ckpt}


def read_header(path):
    """What ranks a file, read without its tensors (memory-mapped: the tensors are never read):
    iteration, run id, branch, kind, val loss. Its contents are judged (check_contents: shapes, not
    values); only load() checks the CRCs."""
    if kind_of(path) == "folder":
        ckpt = folder_state(path)
        check_folder(path, ckpt, dcp_metadata(path))
    else:
        ckpt = torch_load(path, mmap=True)
        check_contents(ckpt, path)
    meta = ckpt.get("metadata") or {}
    name = os.path.basename(path)
    kind = "best" if name == BEST else "kept" if name.startswith("ckpt-best-") else "periodic"
    return dict(path=path, iter_num=ckpt["iter_num"], run_id=meta.get("run_id"),
                branch=meta.get("branch", 0),
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
            raise CheckpointError(f"out_dir {out_dir!r} cannot be listed ([Errno {e.errno}] "
                                  f"{e.strerror})") from None
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
        raise CheckpointError(f"no checkpoint in {out_dir!r} (looked for {BEST}, ckpt-*.pt and "
                              "ckpt-*/ folders)")
    for i, h in enumerate(heads):
        try:
            return h["path"], load_one(h["path"])
        except CheckpointError as e:
            nxt = (f"falling back to {os.path.basename(heads[i + 1]['path'])}"
                   if i + 1 < len(heads) else "no older one left")
            log(f"warning: skipping {e}; {nxt}")
    raise CheckpointError(f"none of the {len(heads) + len(bad)} checkpoint(s) in {out_dir!r} loads "
                          "(see warnings above)")


def inspect(path, crcs):
    """The plain values of a checkpoint, judged (check_contents), its tensors never read into
    memory: a file's are memory-mapped and left alone. crcs: every CRC checked too, in one streaming
    read (a folder's always are, as load does)."""
    if kind_of(path) == "folder":
        return load(path, tensors=False)
    # the header's records at least
    check_crcs(path, None if crcs else lambda name: not STORAGE.search(name))
    ckpt = torch_load(path, mmap=True)
    check_contents(ckpt, path)
    return ckpt


def consolidate(folder, out):
    """A checkpoint folder -> one checkpoint file, as a single process would have written it."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder (consolidate turns a folder into "
                              "a file)")
    # never over a run's ckpt.pt, nor any other file: nothing is lost by a typo
    if os.path.exists(out):
        raise CheckpointError(f"{out} exists; give a new file name (remove {out} yourself to "
                              "replace it)")
    ckpt = load(folder)
    save(ckpt, out)
    return ckpt


def retained(checkpoints, keep_last, keep_every, good=lambda c: True):
    """Which of one run's and branch's periodic checkpoints (dicts with "iter_num", newest first)
    retention deletes: those past the newest keep_last that `good` takes, except those kept forever
    by keep_every. A checkpoint that is not good never pushes a good one out."""
    kept, drop = 0, []
    for c in checkpoints:
        if keep_every and c["iter_num"] % keep_every == 0:
            continue
        if kept >= keep_last:
            drop.append(c)
        elif good(c):
            kept += 1
    return drop


def keep_others_best(out_dir, run_id, branch, resumed_from=None, log=say):
    """Before this run first writes ckpt.pt: if the ckpt.pt there belongs to another branch (or
    run), keep it under KEPT_BEST rather than replace it, and say so. Called before this process
    first writes ckpt.pt (and again at the next best if keeping it failed)."""
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
        try:
            # this run writes ckpt.pt right after; until then sample.py falls back
            os.rename(best, kept)
            fsync_dir(out_dir)
        except OSError as e:
            raise CheckpointError(f"could not keep branch {h['branch']}'s {BEST} as "
                                  f"{os.path.basename(kept)} ({os_error(e)}), so this branch's "
                                  f"{BEST} is not written") from None
    val = f", val loss {h['val_loss']:.4f}" if isinstance(h["val_loss"], float) else ""
    log(f"note: {BEST} held branch {h['branch']}'s best (iteration {h['iter_num']}{val}); kept as "
        f"{os.path.basename(kept)}, this branch writes its own {BEST}")


def own_periodic(out_dir, run_id, branch):
    """{path: {"path", "iter_num", "good": None (not checked yet)}} of out_dir's periodic
    checkpoints of this run and branch (nanoGPT-era files, which have no run id, count as its
    own)."""
    return {h["path"]: {"path": h["path"], "iter_num": h["iter_num"], "good": None}
            for h in scan(out_dir)[0]
            if h["kind"] == "periodic" and h["branch"] == branch and h["run_id"] in (run_id, None)}


def retain(known, keep_last, keep_every):
    """Delete the periodic checkpoints of `known` (own_periodic's, kept up to date by the saver)
    beyond the newest keep_last good ones (retained). Never deleted: ckpt.pt, other runs' and
    branches' files, those kept by keep_every, files that do not verify (a damaged or junk file
    never pushes a good one out). Deleting is whole or nothing (atomic.remove_whole)."""
    def good(k):
        if k["good"] is None:
            k["good"] = verified(k["path"])
        return k["good"]

    newest_first = sorted(known.values(), key=lambda k: k["iter_num"], reverse=True)
    for k in retained(newest_first, keep_last, keep_every, good=good):
        if k.get("stuck"):
            continue
        try:
            remove_whole(k["path"])
            del known[k["path"]]
        except FileNotFoundError:
            del known[k["path"]]
        except OSError as e:  # said once; the file stays and is not tried again by this process
            say(f"warning: could not delete old checkpoint {k['path']}: {os_error(e)}", err=True)
            k["stuck"] = True
