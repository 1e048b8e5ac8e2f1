"""
What a checkpoint holds, whether it is sound, and which ones a folder or a remote_dir has:

    # list the checkpoints in a folder (exit 1 if one is bad)
    python checkpoint.py out-shakespeare-char
    # one file's metadata: its header only (mmap)
    python checkpoint.py out-shakespeare-char/ckpt.pt
    # the same, every CRC checked
    python checkpoint.py verify out-shakespeare-char/ckpt.pt
    # a remote_dir's checkpoints, complete or not
    python checkpoint.py s3://bucket/run
    # the same, every object read back and CRC-checked
    python checkpoint.py verify s3://bucket/run
    # an FSDP folder -> one file
    python checkpoint.py consolidate out/ckpt-00001000 ckpt.pt

A checkpoint is one torch.save'd dict of tensors and plain Python values, read with
weights_only=True, so a file can never run code when loaded. It keeps nanoGPT's keys (model,
optimizer, model_args, iter_num, best_val_loss, config) so files move both ways, and adds scaler,
rng (one entry per rank), format_version, metadata, and what generation needs besides the weights:
tokenizer (tokenizer.py's record) and data_fingerprint (dataset.TokenData.fingerprint). Under FSDP
the periodic checkpoints are folders written by every rank at once (keep/folders.py). The format
and its checks live in the keep/ package; this is its command.
"""
import os
import stat
import sys
import time

from keep.files import CheckpointError, is_folder_checkpoint
from keep.objects import RemoteError
from keep.remote import describe as describe_remote
from keep.store import candidates, consolidate, inspect


def _size(path):
    """Bytes of a file, or of a folder's files; 0 for what cannot be stat'ed (a dangling
    symlink)."""
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_size
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:  # gone, a loop, or a folder entry deleted while it was summed
        return 0


def describe(path):
    """(one line: run id, branch, iteration, val loss measured at that iteration, size, time,
    whether it loads, or that it is gone (deleted since it was listed: retention, under a running
    trainer); its run id, or None)."""
    try:
        ckpt, status = inspect(path, crcs=True), "ok"
    except CheckpointError as e:
        ckpt, status = {}, f"BAD: {e}"
    try:
        # a dangling symlink: the link's own
        st = os.stat(path) if os.path.exists(path) else os.lstat(path)
    except OSError:
        gone = "-"
        return (f"{os.path.basename(path):<24} {gone:>8} {gone:>6} {gone:>8} {gone:>9} {gone:>12}  "
                f"{gone:<19}  gone (deleted since listed)"), None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    name = os.path.basename(path) + ("/" if stat.S_ISDIR(st.st_mode) else "")
    meta = ckpt.get("metadata") or {}
    val = meta.get("val_loss")
    val = f"{val:.4f}" if isinstance(val, float) else "-"
    branch, it = (meta.get("branch", 0), ckpt["iter_num"]) if ckpt else ("-", "-")
    run = meta.get("run_id") if isinstance(meta.get("run_id"), str) else None
    return (f"{name:<24} {run or '-':>8} {branch:>6} {it:>8} {val:>9} {_size(path) / 2**20:9.1f} "
            f"MB  {when}  {status}"), run


USAGE = ("usage: python checkpoint.py OUT_DIR | REMOTE_DIR | CHECKPOINT | verify CHECKPOINT | "
         "verify REMOTE_DIR | consolidate FOLDER OUT.pt")


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
        print(f"wrote {argv[2]} (iteration {ckpt['iter_num']}, "
              f"{os.path.getsize(argv[2]) / 2**20:.1f} MB): sample.py, export.py --ckpt and "
              "train.py --resume_from read it")
        return
    verify = argv[:1] == ["verify"]
    if len(argv) != 1 + verify:
        print(f"error: {USAGE}", file=sys.stderr)
        sys.exit(2)
    target = argv[-1]
    if "://" in target:  # a remote_dir: its commit objects (verify: every object's CRC read back)
        try:
            lines, ok = describe_remote(target, verify)
        except RemoteError as e:
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
        print(f"{'file (newest first)':<24} {'run':>8} {'branch':>6} {'iter':>8} {'val loss':>9} "
              f"{'size':>12}  {'written':<19}  status")
        bad, runs = 0, {}
        for path in files:
            line, run = describe(path)
            bad += "  BAD: " in line
            if run is not None:
                runs.setdefault(run, []).append(os.path.basename(path))
            print(line, flush=True)
        if bad:  # every file listed first; then a script or CI job can tell from the exit code
            sys.exit(f"error: {bad} of the {len(files)} checkpoints in {target} "
                     f"{'is' if bad == 1 else 'are'} bad (see BAD above)")
        if len(runs) > 1:  # one folder holds one run: train.py refuses it too (resume.one_run)
            sys.exit(f"error: {target} holds {len(runs)} runs (" + "; ".join(
                f"{r}: {', '.join(sorted(names))}"
                for r, names in sorted(runs.items(), key=lambda r: -len(r[1])))
                + "): one folder holds one run; move each other run's files into a folder of "
                  "their own")
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
    scores = meta.pop("scores", None)
    if isinstance(scores, dict) and scores:  # the newest eval's: losses, bits per byte, tasks' acc
        print(f"scores:        {', '.join(f'{k} {v:.4f}' for k, v in scores.items())}"
              + (f" (eval at iteration {last[0]})" if last else ""))
    resumes = meta.pop("resumes", [])
    for k, v in meta.items():
        print(f"{k + ':':<15}{v}")
    print("exact resume:  "
          f"{'yes' if 'rng' in ckpt else 'no (no RNG state: resume is approximate)'}")
    record = ckpt.get("tokenizer")
    print("tokenizer:     "
          + ("none inside (nanoGPT's, or older): sample.py uses its dataset's meta.pkl"
             if record is None
             else f"a char vocab of {len(record['itos'])} symbols" if record["kind"] == "char"
             else f"BPE {record['name']}"))
    if "files" in ckpt:
        print(f"sharded:       {len(ckpt['files'])} files, each CRC-checked (DCP; consolidate "
              "makes one file)")
    elif not verify:
        print(f"checked:       its header only (the weights are not read); "
              f"python checkpoint.py verify {target} checks every byte's CRC")
    else:
        print("checked:       every record's CRC")
    print(f"lineage:       began from {meta.get('init_from', '?')}, resumed {len(resumes)} time(s)")
    for r in resumes:  # (written by train.py; shown as found in a file from elsewhere)
        changed = r.get("changed") if isinstance(r.get("changed"), dict) else {}
        changed = ", ".join(
            f"{k} {' -> '.join(map(repr, v)) if isinstance(v, (list, tuple)) else repr(v)}"
            for k, v in changed.items()) or "nothing changed"
        print(f"  {r.get('time', '?')}  iteration {r.get('iter', '?')} from {r.get('from', '?')} "
              f"(branch {r.get('branch', '?')}): {changed}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BrokenPipeError:  # `python checkpoint.py out | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
