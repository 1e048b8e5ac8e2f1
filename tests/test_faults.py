"""Faults recover by themselves (docs/preemption.md): a dead stdout never stops
a run, every stop signal saves, a second Ctrl-C during a save exits at once, an eval in progress is
abandoned for a quick save, time_limit stops in time (by the run's own clock), checkpoint_minutes
bounds what a kill -9 loses, torchrun restarts crashed workers, and failed writes (real EFBIG, real
ENOSPC, a real unwritable folder) leave older files intact without taking the run down. Real
processes only."""
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keep.files import PERIODIC
from keep.store import candidates
from keep import store
from keep.atomic import TMP_TAG
from conftest import (ENV, ROOT, STARTED, TINY, children, contents, copy_run, listing, outcomes,
                      ranks, run, start, wait_for)
from metrics import read_rows
from test_resume import assert_same_state

ARGS = [*TINY, "--eval_interval=1000", "--checkpoint_interval=1000", "--keep_last=50"]


def traced(*args, log=os.devnull):
    """A command prefix that runs it under strace with these filters and fault injections (-f: its
    threads and children too). --seccomp-bpf stops the process only at the traced calls, so that it
    runs hardly slower, but strace 6.1 then ignores inject=...:signal=, so not for those."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    fast = [] if any("signal=" in a for a in args) else ["--seccomp-bpf"]
    return ["strace", "-f", "-qq", *fast, "-o", str(log), *args]


def start_traced(prefix, *args):
    """start() for train.py run under a prefix (traced): stdout piped, stderr with it. Signals go to
    the training process, children(proc.pid), not to strace."""
    proc = subprocess.Popen([*prefix, sys.executable, os.path.join(ROOT, "train.py"), *args],
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def process_start(pid):
    """When a process started, on this machine's clock (Linux /proc): what time_limit counts
    from."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130),
                                       (signal.SIGHUP, 0), (signal.SIGUSR1, 0)])
def test_signal_with_a_dead_pipe_still_saves(shakespeare_char, tmp_path, sig, code):
    """`train.py | tee log` and Ctrl-C: tee dies first; a closed terminal (HUP) takes its pipe too;
    Slurm warns with USR1. Printing must not take the run down, and every one of them saves."""
    proc = start(*ARGS, f"--out_dir={tmp_path}", "--max_iters=100000", stderr=subprocess.PIPE)
    wait_for(proc, r"^iter 3:")
    proc.stdout.close()  # the reader is gone: every later write to stdout is EPIPE
    time.sleep(0.5)  # some log lines hit the dead pipe before the signal
    proc.send_signal(sig)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == code, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    newest = candidates(tmp_path)[0]
    assert store.load(newest)["iter_num"] > 4


def test_sigterm_during_a_long_eval_saves_within_seconds(shakespeare_char, tmp_path):
    """eval_iters=3000 takes tens of seconds here; a SIGTERM as it begins gives a checkpoint in a
    few."""
    proc = start(*ARGS, f"--out_dir={tmp_path}", "--max_iters=100", "--eval_interval=5",
                 "--eval_iters=3000")
    seen = []
    wait_for(proc, r"^iter 4:", seen)  # iteration 5's eval starts now
    time.sleep(0.3)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    elapsed = time.time() - t0
    assert elapsed < 10, f"{elapsed:.1f}s from SIGTERM to exit"  # the bound this test holds
    assert "SIGTERM received at iteration 5: saving a checkpoint" in rest and "step 5:" not in rest
    ckpt = store.load(tmp_path / PERIODIC.format(5))
    assert ckpt["metadata"]["val_loss"] is None  # the abandoned eval's partial result is not used


def test_time_limit_stops_in_time_and_resumes_exactly(shakespeare_char, tmp_path):
    limit = 12.0  # startup (importing torch) counts too, and a loaded machine starts slowly
    proc = start(*ARGS, f"--out_dir={tmp_path}", "--max_iters=1000000", f"--time_limit={limit:g}")
    began = process_start(proc.pid)  # the moment the run's time_limit counts from
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, stdout
    # against the run's own clock, not the test's: the last row it logged (its 'end' event) is
    # within time_limit of its own start, however slowly a loaded machine ran it
    ended = max(r["time"] for r in read_rows(tmp_path / "metrics.jsonl"))
    assert ended - began < limit, (f"the run logged its end {ended - began:.2f}s after it started: "
                                   f"past time_limit={limit}")
    k = int(re.search(r"^time_limit nearly reached at iteration (\d+)", stdout, re.M).group(1))
    # (how far it got depends on the load)
    assert f"checkpoint saved at iteration {k}" in stdout and k > 0
    # the same command again (time_limit is this process's budget, not restored) carries on exactly
    run("train.py", *ARGS, f"--out_dir={tmp_path}", f"--max_iters={k + 3}")
    ref = tmp_path / "ref"
    run("train.py", *ARGS, f"--out_dir={ref}", f"--max_iters={k + 3}")
    assert_same_state(store.load(tmp_path / PERIODIC.format(k + 3)),
                      store.load(ref / PERIODIC.format(k + 3)))


def test_checkpoint_minutes_bounds_the_work_a_crash_loses(shakespeare_char, tmp_path):
    """checkpoint_minutes=0.02 (a save due every 1.2 s), kill -9 one and a half periods after the
    third timed save was announced (so the next one should be on disk): the newest checkpoint on
    disk is at most one period, plus a save, of the run's own time behind the last update it
    logged."""
    period = 0.02 * 60
    proc = start(*ARGS, f"--out_dir={tmp_path}", "--max_iters=1000000", "--checkpoint_interval=0",
                 "--checkpoint_minutes=0.02")
    for _ in range(3):
        wait_for(proc, r"^saved \S+ckpt-\d+\.pt$")
    time.sleep(1.5 * period)
    proc.kill()
    proc.communicate(timeout=60)
    done = {r["iter"]: r["time"] for r in read_rows(tmp_path / "metrics.jsonl")
            if r["kind"] == "train"}
    times = sorted(done.values())  # the run's own clock: when it finished each update
    gap = max(b - a for a, b in zip(times, times[1:]))  # the longest iteration, a save included
    newest = max(int(m.group(1)) for n in listing(tmp_path)
                 if (m := re.fullmatch(r"ckpt-(\d{8})\.pt", n)))
    store.load(tmp_path / PERIODIC.format(newest))
    # the work logged after the last update the checkpoint holds
    lost = times[-1] - done[newest - 1]
    assert lost <= period + 2 * gap, (f"the newest checkpoint (iteration {newest}) is {lost:.2f}s "
                                      "of training behind")


def test_second_ctrl_c_during_the_save_exits_at_once(shakespeare_char, tmp_path):
    """Ctrl-C, then Ctrl-C again while the checkpoint is being written (strace holds every fsync 3
    s, so the second one really arrives during the save, not merged with the first): exit 130 at
    once with one line, no traceback, and nothing partial under a checkpoint's name."""
    proc = start_traced(traced("-e", "trace=fsync", "-e", "inject=fsync:delay_enter=3s"), *ARGS,
                        f"--out_dir={tmp_path}", "--max_iters=100000")
    seen = []
    wait_for(proc, r"^iter 3:", seen)
    [trainer] = children(proc.pid)  # (proc is strace)
    os.kill(trainer, signal.SIGINT)
    wait_for(proc, r"^SIGINT received at iteration \d+: saving a checkpoint", seen)
    while (proc.poll() is None
            and not [n for n in os.listdir(tmp_path) if n.startswith(".") and n != ".lock"]):
        time.sleep(0.01)  # until the save's temp file is there
    os.kill(trainer, signal.SIGINT)
    seen.append(proc.communicate(timeout=60)[0])
    out = "".join(seen)
    assert proc.returncode == 130, out
    assert "second SIGINT" in out and "Traceback" not in out, out
    for name in listing(tmp_path):
        if name.startswith("ckpt"):
            store.load(tmp_path / name)  # whatever is under a checkpoint's name is whole


@pytest.mark.parametrize("flag, says", [
    ("--time_limit=soon", "error: time_limit='soon' is not a duration"),
    ("--checkpoint_minutes=-5", "error: checkpoint_minutes=-5.0 must be at least 0")])
def test_bad_time_knobs_are_one_line(shakespeare_char, tmp_path, flag, says):
    p = run("train.py", *ARGS, f"--out_dir={tmp_path}", flag, check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith(says) and "\n" not in p.stderr.strip()
    assert not os.path.exists(tmp_path / ".lock")  # refused before anything was made


def test_unwritable_out_dir_is_found_before_training(shakespeare_char, tmp_path):
    """A folder of another user's, and root without its override of file permissions (setpriv
    drops CAP_DAC_OVERRIDE), as a user without root meets it."""
    out = tmp_path / "theirs"
    out.mkdir(mode=0o755)
    try:
        os.chown(out, 65534, 65534)
    except PermissionError:
        pytest.skip("cannot give a folder to another user here (not root)")
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if drop and subprocess.run([*drop, "true"]).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    p = run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=5", prefix=drop, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"error: out_dir {str(out)!r} is not writable ([Errno 13] "
                                "Permission denied); fix its permissions, or pick another "
                                "--out_dir")
    assert "iter 0" not in p.stdout and os.listdir(out) == []


def test_failed_writes_efbig(shakespeare_char, tmp_path):
    """RLIMIT_FSIZE below a checkpoint's size: every write fails with EFBIG (Python ignores
    SIGXFSZ)."""
    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=4")  # a good checkpoint first
    before = contents(tmp_path)
    limit = 100_000  # a checkpoint is ~400 kB

    def small_files():  # the soft limit only, so that the test can raise it again (prlimit)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    # the same command continues the run: its saves fail, it trains on, and saves once room is back
    proc = start(*ARGS, f"--out_dir={tmp_path}", "--max_iters=100000", "--checkpoint_interval=20",
                 preexec_fn=small_files)
    seen = []
    m = wait_for(proc, r"^warning: could not write (\S+): \[Errno 27\] File too large; older "
                       r"checkpoints are intact; training goes on and the next checkpoint tries "
                       r"again$", seen)
    assert m.group(1) == str(tmp_path / PERIODIC.format(20))
    wait_for(proc, r"^iter 25:", seen)  # still training
    assert contents(tmp_path) == before  # older files intact, no temp file left
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    m = wait_for(proc, r"^saved (\S+ckpt-\d+\.pt)$", seen)  # the next save succeeds
    store.load(m.group(1))
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=60) == 0 and not any("Traceback" in ln for ln in seen)

    # the final save fails: one error line, exit 1, the older files still there
    before = contents(tmp_path)
    p = run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=100",
            "--checkpoint_interval=0", preexec_fn=small_files, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    # earlier: ckpt.pt at the last eval, if it improved
    *earlier, last = p.stderr.strip().splitlines()
    assert last == (f"error: could not write {tmp_path / PERIODIC.format(100)}: [Errno 27] File "
                    "too large; older checkpoints are intact, and the same command resumes from "
                    "the newest")
    assert all(ln.startswith("warning: could not write") for ln in earlier)
    assert contents(tmp_path) == before


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs(1200 * 1024)


def test_disk_full_with_async_save(shakespeare_char, small_tmpfs):
    """A 1.2 MB tmpfs holds two checkpoints: then ENOSPC, in the background writer too."""
    out = small_tmpfs / "run"
    p = run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=30", "--checkpoint_interval=5",
            "--async_save=True", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: could not write")]
    assert warnings and all("[Errno 28] No space left on device; older checkpoints are intact" in ln
                            for ln in warnings)
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"error: could not write {out / PERIODIC.format(30)}: [Errno 28] No space left on device")
    assert "iter 29:" in p.stdout  # it trained to the end
    names = listing(out)
    assert not any(TMP_TAG in n for n in names)  # no temp file left
    for name in names:
        store.load(out / name)  # whatever is there is whole


def test_torchrun_restarts_killed_workers_and_stays_exact(shakespeare_char, tmp_path):
    """2 gloo ranks under torchrun --max-restarts: kill -9 one worker at random moments, several
    rounds; each time the group restarts, resumes the newest good checkpoint, and the end equals an
    uninterrupted 2-rank run bitwise."""
    M = 300
    ddp = [*ARGS, "--gradient_accumulation_steps=2", "--checkpoint_interval=5", f"--max_iters={M}"]
    ref = tmp_path / "ref"
    ref_job = start(*ddp, f"--out_dir={ref}", torchrun=["--nproc_per_node=2"])
    ref_job.communicate(timeout=300)
    assert ref_job.returncode == 0
    out = tmp_path / "run"
    # exactly one restart per kill: a restart that reused the dead group's addresses
    # (distributed.py) would use up the budget and fail the job
    proc = start(*ddp, f"--out_dir={out}", torchrun=["--nproc_per_node=2", "--max-restarts=3"])
    rng = random.Random(7)
    seen = []
    for round_ in range(3):
        wait_for(proc, r"^iter (\d+):", seen)  # this round's group is training
        time.sleep(rng.uniform(0.2, 0.8))
        victim = rng.choice(sorted(children(proc.pid)))
        os.kill(victim, signal.SIGKILL)
        wait_for(proc, r"resuming from|holds this run", seen)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, "".join(seen) + rest
    assert ("".join(seen).count("continuing it") == 3
            and "connectFullMesh failed" not in "".join(seen) + rest)
    assert_same_state(store.load(out / PERIODIC.format(M)), store.load(ref / PERIODIC.format(M)))


def test_torchrun_passes_slurms_usr1_to_every_rank(shakespeare_char, tmp_path):
    """README's sbatch script: SIGUSR1 to torchrun (--signals-to-handle) reaches every worker; they
    stop after the same iteration and save, and the same command continues from that file."""
    def job():  # the sbatch script's torchrun line
        return start(*ARGS, "--gradient_accumulation_steps=2", f"--out_dir={tmp_path}",
                     "--max_iters=400",
                     torchrun=["--nproc_per_node=2",
                               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGUSR1",
                               "--shutdown-timeout=60"])

    proc = job()
    wait_for(proc, r"^iter 3:")
    proc.send_signal(signal.SIGUSR1)
    rest = proc.communicate(timeout=120)[0]
    k = int(re.search(r"^checkpoint saved at iteration (\d+)", rest, re.M).group(1))
    assert "SIGUSR1 received" in rest and 4 <= k < 400
    assert store.load(tmp_path / PERIODIC.format(k))["metadata"]["world_size"] == 2
    again = job()
    stdout = again.communicate(timeout=300)[0]
    assert (again.returncode == 0
            and f"resuming from {tmp_path / PERIODIC.format(k)}" in stdout), stdout


def test_two_nodes_restart_with_the_store_fix(shakespeare_char, tmp_path):
    """README's several-node command, as two torchrun agents (one rank each) on this machine: with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 a worker killed on the second node costs one restart and
    the run finishes; without it, each node is warned."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def node(out, env, rdzv_id):
        return start(*ARGS, "--gradient_accumulation_steps=2", "--checkpoint_interval=5",
                     f"--out_dir={out}", "--max_iters=300", env=env,
                     torchrun=["--nnodes=2", "--nproc_per_node=1", "--max-restarts=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               f"--rdzv-id={rdzv_id}"])

    fixed = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    first, second = node(tmp_path / "run", fixed, "fixed"), node(tmp_path / "run", fixed, "fixed")
    seen = []
    wait_for(first, r"^saved .*ckpt-\d+\.pt", seen)  # training, with a checkpoint to go back to
    os.kill(children(second.pid)[0], signal.SIGKILL)
    wait_for(first, r"resuming from", seen)
    outputs = [first.communicate(timeout=300)[0], second.communicate(timeout=300)[0]]
    assert first.returncode == 0 and second.returncode == 0, outputs
    both = "".join(seen) + "".join(outputs)
    assert "connectFullMesh failed" not in both and "warning: with --max-restarts" not in both

    first, second = node(tmp_path / "plain", {}, "plain"), node(tmp_path / "plain", {}, "plain")
    outputs = [first.communicate(timeout=300)[0], second.communicate(timeout=300)[0]]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert ("warning: with --max-restarts on several nodes, set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in "".join(outputs))


def test_ranks_resume_from_the_file_rank_0_picked(trained, tmp_path):
    """2 ranks continue a run whose newest file (10) rank 1 alone cannot read (EIO at every open of
    it: strace on rank 1 only). Rank 0 picks the checkpoint; rank 1 reads that very file, never an
    older one of its own choice, which would train the ranks from different iterations: both ranks
    stop with exit 1, the job with one error line (rank 1's, naming the file), no traceback, no rank
    left waiting."""
    out = copy_run(Path(trained), tmp_path / "run")
    os.remove(out / "ckpt.pt")  # (of iteration 10 too)
    newest = out / PERIODIC.format(10)
    job = ranks(2, *ARGS, "--gradient_accumulation_steps=2", f"--out_dir={out}", "--max_iters=15",
                prefix={1: traced("-P", str(newest), "-e", "trace=openat", "-e",
                                  "inject=openat:error=EIO")})
    results = outcomes(job, timeout=90)
    said = "".join(o + e for _, o, e in results)
    assert [rc for rc, _, _ in results] == [1, 1], said
    errors = [ln for ln in said.splitlines() if "error:" in ln]
    assert (len(errors) == 1 and errors[0].startswith("rank 1: error: ")
            and str(newest) in errors[0]), said
    assert "Traceback" not in said and "iter 10:" not in said, said
