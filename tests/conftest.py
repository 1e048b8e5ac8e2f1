import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a training step takes milliseconds on a CPU.
TINY = ["--device=cpu", "--compile=False", "--dataset=shakespeare_char", "--n_layer=2", "--n_head=2",
        "--n_embd=32", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=1",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=5", "--lr_decay_iters=100", "--learning_rate=1e-3",
        "--peak_flops=1e11"]  # a fixed MFU reference: skips measuring the CPU at every start
# One thread per test process: tiny models gain nothing from more, and two processes each
# spinning two OpenMP threads on a 2-core machine slow each other down tenfold.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run(script, *args, env=None, timeout=300, check=True, prefix=(), **popen):
    """Run one of the project's scripts as a user would, in a fresh process (prefix: a command that
    runs it, such as setpriv; popen: e.g. a preexec_fn that sets a resource limit)."""
    full_env = dict(ENV, **(env or {}))
    proc = subprocess.run([*prefix, sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


STARTED = []


def start(*args, torchrun=None, env=None, **popen):
    """train.py as a background job, stdout piped (stderr with it unless told otherwise). torchrun:
    a list of torchrun flags, to launch it under torchrun (--standalone unless the flags say --nnodes)."""
    launcher = [sys.executable]
    if torchrun is not None:
        launcher += ["-m", "torch.distributed.run", *([] if any(f.startswith("--nnodes") for f in torchrun)
                                                      else ["--standalone"]), *torchrun]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    proc = subprocess.Popen([*launcher, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=dict(ENV, **(env or {})),
                            text=True, **popen)
    STARTED.append(proc)
    return proc


def children(pid):
    """A process's children (torchrun's workers, an async save), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError):
                pass
    return kids


@pytest.fixture(autouse=True)
def no_orphans():
    """A failed test must not leave an endless training job behind (it would hold the suite), nor its
    children: torchrun's workers lead sessions of their own and outlive a killed agent."""
    yield
    while STARTED:
        proc = STARTED.pop()
        for pid in [*children(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def wait_for(proc, pattern, seen=None):
    """Read a job's stdout until a line matches (re.search); returns the match. seen collects the lines."""
    seen = [] if seen is None else seen
    for line in proc.stdout:
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    rest = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"the job ended before {pattern!r}:\n" + "".join(seen) + rest)


def listing(out):
    """A run folder's checkpoint files: less the .lock that train.py holds while it runs (it names its
    pid) and the metrics it appends to (metrics.py)."""
    return [n for n in os.listdir(out) if n not in (".lock", "metrics.jsonl")]


def contents(out):
    """{name: bytes} of a run folder: to show that nothing was touched."""
    return {n: (out / n).read_bytes() for n in sorted(listing(out))}


def copy_run(src, dst):
    """A run folder copied as cp -r, scp or a download do: every file gets a new mtime, in no
    particular order (the oldest iteration looks newest), so nothing may rely on file times."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for i, name in enumerate(sorted(listing(dst), reverse=True)):
        os.utime(dst / name, (time.time() + 100 - i,) * 2)
    return dst


def project_without_data(dst):
    """The project's scripts and modules copied to dst with no data/ folder: a machine that has the
    code and a run's out_dir but not the dataset it was trained on."""
    os.makedirs(dst)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copyfile(os.path.join(ROOT, name), os.path.join(dst, name))
    return str(dst)


@pytest.fixture(scope="session")
def shakespeare_char():
    """The char-level bins, prepared once (the text ships with the project)."""
    folder = os.path.join(ROOT, "data", "shakespeare_char")
    if not all(os.path.exists(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.pkl")):
        run("data/shakespeare_char/prepare.py")
    return folder


@pytest.fixture(scope="session")
def trained(shakespeare_char, tmp_path_factory):
    """A finished tiny char-level run: checkpoints at 5 and 10, and ckpt.pt (one per test worker: tests
    copy it before they change anything)."""
    out = tmp_path_factory.mktemp("trained")
    run("train.py", *TINY, f"--out_dir={out}", "--max_iters=10", "--eval_interval=5", "--checkpoint_interval=5")
    return str(out)
