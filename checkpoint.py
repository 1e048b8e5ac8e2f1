"""
Everything about checkpoint files: atomic save, safe load, finding the newest good one,
retention, RNG capture/restore, compatibility checks, and a small inspect CLI:

    python checkpoint.py out-shakespeare-char      # list the checkpoints in a folder
    python checkpoint.py out-shakespeare-char/ckpt.pt   # metadata and model_args of one file

A checkpoint is one torch.save'd dict of tensors and plain Python values, so torch.load with
weights_only=True reads it and a file can never run code when loaded. It keeps nanoGPT's keys
(model, optimizer, model_args, iter_num, best_val_loss, config) so files move both ways, and adds
scaler, rng (one entry per rank), format_version and metadata.
"""
import glob
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch

FORMAT_VERSION = 1
BEST = "ckpt.pt"            # nanoGPT's file: best val loss so far (or every eval), read by sample.py
PERIODIC = "ckpt-{:08d}.pt"  # every checkpoint_interval iterations, on SIGTERM/SIGINT, at the end
TMP_TAG = ".tmp-"            # temporary files are '.<name>.tmp-<pid>'; never read, removed on start
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


class CheckpointError(Exception):
    """A file that cannot be used as a checkpoint; the message says why in one line."""


# ---------------------------------------------------------------------------------------------
# writing

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """Write obj to path so that path is either the old file or the whole new one, even if the
    process is killed or the machine loses power mid-write: temp file in the same folder,
    flush + fsync, os.replace (atomic on POSIX), then fsync the folder so the rename is durable."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_TAG}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


def remove_stray_temps(out_dir):
    """Temp files left by a process killed mid-write: they were never a checkpoint."""
    for path in glob.glob(os.path.join(out_dir, f".*{TMP_TAG}*")):
        os.remove(path)


def to_cpu(obj):
    """A nested state with every tensor on the CPU (CPU tensors are not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save(ckpt, path):
    """Atomically write a checkpoint dict whose tensors are on the CPU."""
    atomic_save(ckpt, path)


class AsyncSaver:
    """Writes checkpoints from a forked child process. fork() hands the child a copy-on-write
    snapshot of the whole process in well under a second, so training stalls for the fork (plus,
    for GPU tensors, their copy to host memory in to_cpu) rather than for writing, or even
    copying, gigabytes. At most one write is in flight: save() and wait() first wait for the
    previous one, and the training script calls wait() before it exits. POSIX only (fork)."""

    def __init__(self):
        self.pid, self.path = None, None

    def save(self, ckpt, path, then=None):
        self.wait()
        pid = os.fork()
        if pid == 0:  # the child: write, then leave without running any of the parent's exit code
            code = 1
            try:
                # Ctrl-C or SIGTERM reach the whole process group; the parent waits for this write
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                save(ckpt, path)
                if then:
                    then()
                code = 0
            except BaseException as e:
                print(f"error: background checkpoint write to {path} failed: {e}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        self.pid, self.path = pid, path

    def wait(self):
        if self.pid is None:
            return
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if status != 0:
            raise CheckpointError(f"background write of {self.path} failed (wait status {status})")


def apply_retention(out_dir, keep_last):
    """Keep the newest keep_last periodic files. Called only after a new one is on disk, so the
    newest good checkpoint is never the one deleted."""
    if keep_last <= 0:
        return
    for path in periodic_files(out_dir)[keep_last:]:
        os.remove(path)


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


def load(path, map_location="cpu"):
    """Load and verify one checkpoint. Raises CheckpointError with a one-line reason for a missing,
    truncated, corrupt, foreign or unsafe file; an unsafe pickle is refused before any of it runs."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        # torch.save writes a zip with a CRC-32 per record but torch.load never checks them, so a
        # flipped byte inside a tensor would load silently; zipfile checks every record.
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt (CRC mismatch in {bad})")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; its one useful line names the global that was refused
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "not plain data")
        raise CheckpointError(f"{path}: refused, loading it would need arbitrary pickle, which can run code "
                              f"({why.split('. ')[0][:160]})") from None
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, bad magic, unreadable: all mean "not a usable file"
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a GPT checkpoint (no 'model' and 'model_args' keys)")
    ckpt["model"] = strip_prefixes(ckpt["model"])
    if isinstance(ckpt.get("best_val_loss"), torch.Tensor):  # nanoGPT stores a 0-d tensor
        ckpt["best_val_loss"] = ckpt["best_val_loss"].item()
    return ckpt


def periodic_files(out_dir):
    """Periodic checkpoints, newest first."""
    files = glob.glob(os.path.join(out_dir, "ckpt-*.pt"))
    return sorted(files, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def candidates(out_dir):
    """Every checkpoint in out_dir, newest first. Newest means last written (mtime), not highest
    iteration: after resume_from=<an older file> the run's own new files win over the ones from
    the abandoned branch. ckpt.pt counts too, so a nanoGPT out_dir resumes."""
    files = periodic_files(out_dir)
    best = os.path.join(out_dir, BEST)
    if os.path.isfile(best):
        files.append(best)
    return sorted(files, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def load_latest(out_dir, map_location="cpu", log=print):
    """The newest checkpoint in out_dir that loads; each bad newer one is reported in one line."""
    files = candidates(out_dir)
    if not files:
        raise CheckpointError(f"no checkpoint in {out_dir!r} (looked for {BEST} and ckpt-*.pt)")
    for i, path in enumerate(files):
        try:
            return path, load(path, map_location)
        except CheckpointError as e:
            nxt = f"falling back to {os.path.basename(files[i + 1])}" if i + 1 < len(files) else "no older one left"
            log(f"warning: skipping {e}; {nxt}")
    raise CheckpointError(f"none of the {len(files)} checkpoint(s) in {out_dir!r} loads (see warnings above)")


def check_compatible(ckpt, model_args, chosen, dataset, vocab_size):
    """Refuse to resume into a different model or dataset. Only what the user set explicitly
    (config file or --flag) is compared: everything else is taken from the checkpoint."""
    problems = [f"{k}={model_args[k]!r} but the checkpoint has {ckpt['model_args'][k]!r}"
                for k in MODEL_ARGS if k in chosen and k != "dropout" and k in ckpt["model_args"]
                and model_args[k] != ckpt["model_args"][k]]
    saved_dataset = ckpt.get("config", {}).get("dataset")
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
            print(f"warning: checkpoint has CUDA RNG for {len(rng['cuda'])} devices, this machine has "
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
    """One line: iteration, val loss, size, time written, and whether it loads."""
    size = os.path.getsize(path) / 2**20
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    try:
        ckpt = load(path)
    except CheckpointError as e:
        return f"{os.path.basename(path):<18} {'-':>8} {'-':>9} {size:9.1f} MB  {when}  BAD: {e}"
    val = ckpt.get("metadata", {}).get("val_loss", ckpt.get("best_val_loss"))
    val = f"{val:.4f}" if isinstance(val, (int, float)) else "-"
    return f"{os.path.basename(path):<18} {ckpt.get('iter_num', '-'):>8} {val:>9} {size:9.1f} MB  {when}  ok"


def main(argv):
    if len(argv) != 1:
        sys.exit("usage: python checkpoint.py OUT_DIR | FILE.pt")
    target = argv[0]
    if os.path.isdir(target):
        files = candidates(target)
        if not files:
            sys.exit(f"error: no checkpoint in {target!r}")
        print(f"{'file':<18} {'iter':>8} {'val loss':>9} {'size':>12}  {'written':<19}  status (newest first)")
        for path in files:
            print(describe(path))
        return
    try:
        ckpt = load(target)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"file:          {target}")
    print(f"format:        {ckpt.get('format_version', 'nanoGPT (no format_version)')}")
    print(f"iter_num:      {ckpt.get('iter_num')}")
    print(f"best_val_loss: {ckpt.get('best_val_loss')}")
    print(f"model_args:    {ckpt['model_args']}")
    for k, v in ckpt.get("metadata", {}).items():
        print(f"{k + ':':<15}{v}")
    print(f"exact resume:  {'yes' if 'rng' in ckpt else 'no (no RNG state: resume is approximate)'}")


if __name__ == "__main__":
    main(sys.argv[1:])
