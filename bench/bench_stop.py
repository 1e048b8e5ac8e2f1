"""
How fast a run stops and comes back (docs/preemption.md). Every argument is
passed to train.py, which runs in a fresh temp out_dir each round:

    # the CPU recipe
    python bench/bench_stop.py config/train_shakespeare_char_cpu.py
    # GPT-2 124M's shape on a CPU
    BENCH_ROUNDS=2 BENCH_EVAL_AT=3 python bench/bench_stop.py --dataset=shakespeare --n_layer=12 \
        --n_head=12 --n_embd=768 --block_size=1024 --batch_size=1 --gradient_accumulation_steps=1 \
        --device=cpu --compile=False --eval_iters=10
    BENCH_RESTART=1 python bench/bench_stop.py config/train_shakespeare_char_cpu.py \
        --gradient_accumulation_steps=2

BENCH_ROUNDS (3): rounds of each measurement; BENCH_EVAL_AT (20): the iteration whose eval the
second measurement interrupts.

Signal to exit: SIGTERM at a random moment of training, and SIGTERM just as an eval begins (the
eval is abandoned); seconds from the signal until the process has exited, its checkpoint on disk.
Restart (BENCH_RESTART=1): torchrun --max-restarts with 2 gloo ranks, kill -9 of one worker, then
seconds until the restarted group logs its first training iteration.
"""
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# the project root: train.py runs there
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# the eval that the second measurement interrupts
EVAL_AT = int(os.environ.get("BENCH_EVAL_AT", "20"))


def start(cmd, out, *extra):
    args = [*cmd, *sys.argv[1:], f"--out_dir={out}", "--log_interval=1", "--max_iters=1000000",
            *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def children(pid):
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                           text=True).stdout.split()]


def wait_for(proc, pattern):
    for line in proc.stdout:
        if re.search(pattern, line):
            return line
    raise SystemExit(f"error: the run ended before {pattern!r} (exit {proc.wait()})")


def stop_seconds(during_eval):
    out = tempfile.mkdtemp(prefix="bench-stop-", dir=ROOT)
    try:
        extra = ([f"--eval_interval={EVAL_AT}", "--checkpoint_interval=0"]
                 if during_eval else ["--eval_interval=1000000"])
        proc = start([sys.executable, "train.py"], out, *extra)
        if during_eval:
            # the loop goes on to the eval of iteration EVAL_AT
            wait_for(proc, rf"^iter {EVAL_AT - 1}:")
        else:
            wait_for(proc, r"^iter 5:")
            time.sleep(random.uniform(0, 2))
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate()[0]
        took = time.perf_counter() - t0
        if proc.returncode != 0 or "checkpoint saved at iteration" not in rest:
            raise SystemExit("error: the run did not save and exit 0 (exit "
                             f"{proc.returncode}):\n{rest}")
        return took
    finally:
        shutil.rmtree(out)


def restart_seconds():
    out = tempfile.mkdtemp(prefix="bench-restart-", dir=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={ROUNDS}", "train.py"]
    proc = start(cmd, out, "--checkpoint_interval=5", "--eval_interval=1000000")
    times = []
    try:
        for _ in range(ROUNDS):
            wait_for(proc, r"^iter \d+:")
            time.sleep(random.uniform(1, 3))
            t0 = time.perf_counter()
            os.kill(random.choice(children(proc.pid)), signal.SIGKILL)
            wait_for(proc, r"^resuming from")
            wait_for(proc, r"^iter \d+:")
            times.append(time.perf_counter() - t0)
    finally:
        for pid in [*children(proc.pid), proc.pid]:  # torchrun's workers lead sessions of their own
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(out)
    return times


def report(name, ts):
    print(f"{name}: median {statistics.median(ts):.2f} s, max {max(ts):.2f} s over {len(ts)} "
          f"({', '.join(f'{t:.2f}' for t in ts)})", flush=True)


random.seed(0)
if os.environ.get("BENCH_RESTART"):
    report("kill -9 of a worker -> training again", restart_seconds())
else:
    report("SIGTERM while training -> exited, saved", [stop_seconds(False) for _ in range(ROUNDS)])
    report("SIGTERM as an eval begins -> exited, saved",
           [stop_seconds(True) for _ in range(ROUNDS)])
