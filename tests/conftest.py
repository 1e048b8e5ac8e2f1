import os
import subprocess
import sys

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


def run(script, *args, env=None, timeout=300, check=True):
    """Run one of the project's scripts as a user would, in a fresh process."""
    full_env = dict(ENV, **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def listing(out):
    """A run folder's files, less the .lock that train.py holds while it runs (it names its pid)."""
    return [n for n in os.listdir(out) if n != ".lock"]


@pytest.fixture(scope="session")
def shakespeare_char():
    """The char-level bins, prepared once (the text ships with the project)."""
    folder = os.path.join(ROOT, "data", "shakespeare_char")
    if not all(os.path.exists(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.pkl")):
        run("data/shakespeare_char/prepare.py")
    return folder
