import atexit
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a training step takes milliseconds on a CPU.
TINY = ["--device=cpu", "--compile=False", "--dataset=shakespeare_char", "--n_layer=2",
        "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=5", "--lr_decay_iters=100", "--learning_rate=1e-3",
        "--peak_flops=1e11"]  # a fixed MFU reference: skips measuring the CPU at every start
# One thread per test process: tiny models gain nothing from more, and two processes each
# spinning two OpenMP threads on a 2-core machine slow each other down tenfold.
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# Scripts run in children of a fork server that has imported torch once (tests/forkserver.py says
# why and how): a real process per script, without two seconds of imports each. A fresh interpreter
# instead wherever a fork could differ from one: a command prefix (strace, setpriv), torchrun, Popen
# options such as preexec_fn, a variable that torch or Python read when they start, or TEST_EXEC=1.
READ_AT_START = re.compile(r"(OMP|MKL|KMP|GOMP|TORCH|PYTHON|PYTORCH|CUDA|LD|MALLOC)_")


@functools.cache
def server():
    """This test worker's fork server, started on first use."""
    started = forkserver.Server(ENV)
    atexit.register(started.close)
    return started


def popen(script, args, env=None, launcher=None, cwd=ROOT, **options):
    """A script (a path in the project, or absolute) as a child process, with Popen's interface.
    launcher: the command that runs it (the default: this Python)."""
    script, full_env = os.path.join(ROOT, script), dict(ENV, **(env or {}))
    if (launcher or set(options) - {"stdout", "stderr", "text"}
            or os.environ.get("TEST_EXEC") == "1"
            or any(READ_AT_START.match(k) for k in env or {})):
        return subprocess.Popen([*(launcher or [sys.executable]), script, *args], cwd=cwd,
                                env=full_env, **options)
    return server().popen(script, args, cwd, full_env, **options)


def run(script, *args, env=None, timeout=300, check=True, prefix=(), cwd=ROOT, **popen_options):
    """Run one of the project's scripts as a user would, in a process of its own (prefix: a command
    that runs it, such as setpriv; popen_options: e.g. a preexec_fn that sets a resource limit)."""
    proc = popen(script, args, env, [*prefix, sys.executable] if prefix else None, cwd,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_options)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited "
                             f"{proc.returncode}\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


STARTED = []


def start(*args, torchrun=None, env=None, **popen_options):
    """train.py as a background job, stdout piped (stderr with it unless told otherwise). torchrun:
    a list of torchrun flags, to launch it under torchrun (--standalone unless the flags say
    --nnodes)."""
    launcher = None
    if torchrun is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run",
                    *([] if any(f.startswith("--nnodes") for f in torchrun) else ["--standalone"]),
                    *torchrun]
    proc = popen("train.py", args, env, launcher,
                 **{"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True,
                    **popen_options})
    STARTED.append(proc)
    return proc


def ranks(n, *args, prefix=None, **popen_options):
    """train.py as the n ranks of one job, given what torchrun gives its workers (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) but without torchrun, which ends the other ranks once one exits: each rank's
    own exit code and lines are seen. prefix: {rank: a command that runs that rank (strace)}.
    Returns the processes, rank 0 first (stdout and stderr piped)."""
    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        env = dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GROUP_RANK="0")
        launcher = [*prefix[r], sys.executable] if r in (prefix or {}) else None
        procs.append(popen("train.py", args, env, launcher, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, **popen_options))
        STARTED.append(procs[-1])
    return procs


def outcomes(procs, timeout=120):
    """[(exit code, stdout, stderr)] of each rank; a rank that waits forever fails the test."""
    done = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, done)]


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
    """A failed test must not leave an endless training job behind (it would hold the suite), nor
    its children: torchrun's workers lead sessions of their own and outlive a killed agent."""
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
    """Read a job's stdout until a line matches (re.search); returns the match. seen collects the
    lines."""
    seen = [] if seen is None else seen
    for line in proc.stdout:
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    rest = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"the job ended before {pattern!r}:\n" + "".join(seen) + rest)


def listing(out):
    """A run folder's checkpoint files: less the .lock that train.py holds while it runs (it names
    its pid) and the metrics and console lines it appends to (metrics.py)."""
    return [n for n in os.listdir(out) if n not in (".lock", "metrics.jsonl", "console.log")]


def contents(out):
    """{name: bytes} of a run folder: to show that nothing was touched."""
    return {n: (out / n).read_bytes() for n in sorted(listing(out))}


def files_under(folder, mtimes=False):
    """{relative path: bytes} (with mtimes: (bytes, mtime in ns)) of every file under folder: to
    show that nothing was touched."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                data = fh.read()
            found[os.path.relpath(path, folder)] = ((data, os.stat(path).st_mtime_ns)
                                                    if mtimes else data)
    return found


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
    for package in ("keep", "evals"):
        shutil.copytree(os.path.join(ROOT, package), os.path.join(dst, package),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return str(dst)


@pytest.fixture(scope="session")
def shakespeare_char():
    """The char-level bins, prepared once (the text ships with the project)."""
    folder = os.path.join(ROOT, "data", "shakespeare_char")
    if not all(os.path.exists(os.path.join(folder, f))
               for f in ("train.bin", "val.bin", "meta.pkl")):
        run("data/shakespeare_char/prepare.py")
    return folder


@pytest.fixture(scope="session")
def trained(shakespeare_char, tmp_path_factory):
    """A finished tiny char-level run: checkpoints at 5 and 10, and ckpt.pt (one per test worker:
    tests copy it before they change anything)."""
    out = tmp_path_factory.mktemp("trained")
    run("train.py", *TINY, f"--out_dir={out}", "--max_iters=10", "--eval_interval=5",
        "--checkpoint_interval=5")
    return str(out)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size in bytes): a tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(size):
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(mnt)
        return mnt
    yield mount
    for mnt in mounted:  # lazily: a process of a failed test may still hold a file there
        subprocess.run(["umount", "-l", str(mnt)])
