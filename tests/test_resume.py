"""Exact resume, proved with real processes: a run stopped anywhere (max_iters, SIGTERM, SIGINT,
kill -9 mid-write) and resumed ends bitwise equal to the run that was never interrupted."""
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from keep.files import PERIODIC
from keep.store import candidates
from keep import store
from conftest import TINY, run, start, wait_for

# dropout on, so the restored torch RNG matters; evals and checkpoints at odd places
ARGS = [*TINY, "--dropout=0.1", "--eval_interval=5", "--checkpoint_interval=4", "--keep_last=50"]
N = 12


def losses(stdout):
    """{iteration: printed loss}: the numbers a user compares."""
    return {int(i): loss for i, loss in re.findall(r"^iter (\d+): loss ([\d.]+)", stdout, re.M)}


def final_state(out, it=N):
    return store.load(os.path.join(out, PERIODIC.format(it)))


def assert_same_state(a, b):
    assert a["iter_num"] == b["iter_num"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (i, sa), (j, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert i == j and all(torch.equal(sa[n], sb[n]) for n in sa), i
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


@pytest.fixture(scope="module")
def reference(shakespeare_char, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    p = run("train.py", *ARGS, f"--out_dir={out}", f"--max_iters={N}")
    return out, losses(p.stdout)


def test_stop_and_resume_is_bitwise_exact(reference, tmp_path):
    """Stopped at 1 (the first step), 4 (right after a checkpoint), 5 (at an eval) and 6 (right
    after an eval), resumed each time with no config at all but a longer max_iters: dataset, batch,
    schedule, shape, dropout and device come from the checkpoint's stored config, and the losses and
    the end state are those of the uninterrupted run."""
    ref_out, ref_losses = reference
    p = run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=1")
    seen = losses(p.stdout)
    assert sorted(seen) == [0]
    for k, stop in [(1, 4), (4, 5), (5, 6), (6, N)]:
        p = run("train.py", f"--out_dir={tmp_path}", f"--max_iters={stop}", "--init_from=resume")
        assert f"changed on resume: max_iters {k} -> {stop}\n" in p.stdout
        assert "tokens per iteration 128" in p.stdout and f"at iteration {k}" in p.stdout
        more = losses(p.stdout)
        assert sorted(more) == list(range(k, stop))  # none twice, none skipped
        seen.update(more)
    assert seen == ref_losses
    assert_same_state(final_state(tmp_path), final_state(ref_out))


def test_async_save_gives_the_same_files(reference, tmp_path):
    ref_out, _ = reference
    run("train.py", *ARGS, f"--out_dir={tmp_path}", f"--max_iters={N}", "--async_save=True")
    for it in (4, 8, 12):
        assert_same_state(final_state(tmp_path, it), final_state(ref_out, it))


# long enough that the signal always lands before the end; periodic files only at stops and the end
LONG = [*ARGS, "--max_iters=300", "--checkpoint_interval=0", "--eval_interval=50"]


@pytest.fixture(scope="module")
def long_reference(shakespeare_char, tmp_path_factory):
    out = tmp_path_factory.mktemp("long_reference")
    run("train.py", *LONG, f"--out_dir={out}")
    return final_state(out, 300)


def test_signal_saves_and_resume_is_exact(long_reference, tmp_path):
    """SIGTERM, SIGINT (exit 130), SIGHUP and SIGUSR1 in turn, each to the very same command: each
    saves where it landed and exits, each start resumes from that save, and the end state is the
    uninterrupted run's."""
    out = tmp_path / "run"
    last = 6
    for sig, code in [(signal.SIGTERM, 0), (signal.SIGINT, 130), (signal.SIGHUP, 0),
                      (signal.SIGUSR1, 0)]:
        proc = start(*LONG, f"--out_dir={out}", stderr=subprocess.PIPE)
        lines = []
        wait_for(proc, rf"^iter {last + 6}:", lines)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        stdout = "".join(lines) + stdout
        assert proc.returncode == code, stderr
        assert f"{sig.name} received" in stdout and "Traceback" not in stderr
        k = int(re.search(r"checkpoint saved at iteration (\d+)", stdout).group(1))
        assert last + 7 <= k < 300 and os.path.exists(out / PERIODIC.format(k))
        if sig != signal.SIGTERM:
            assert f"resuming from {out / PERIODIC.format(last)}" in stdout
        last = k
    p = run("train.py", *LONG, f"--out_dir={out}")  # the very same command again
    assert ("continuing it" in p.stdout
            and f"resuming from {out / PERIODIC.format(last)}" in p.stdout)
    assert_same_state(final_state(out, 300), long_reference)


def test_kill_9_fuzz(shakespeare_char, tmp_path):
    """SIGKILL at random moments (a checkpoint after every iteration, so many land mid-write),
    then the same command again each time: every restart works and the end equals the
    uninterrupted run."""
    M = 60  # long enough that 6 kills land before the end
    ref = tmp_path / "ref"
    run("train.py", *ARGS, f"--out_dir={ref}", f"--max_iters={M}")
    out = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        proc = start(*ARGS, f"--out_dir={out}", f"--max_iters={M}", "--checkpoint_interval=1",
                     "--keep_last=2", stderr=subprocess.PIPE)
        if kills < 6:
            wait_for(proc, r"^(iter \d+:|step \d+:)")
            time.sleep(rng.uniform(0.0, 0.1))
            proc.kill()
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            for path in candidates(out):
                store.load(path)  # every file under a checkpoint's name loads
            continue
        assert proc.returncode == 0, stderr  # not killed: the run got to max_iters
        break
    assert kills == 6
    assert_same_state(final_state(out, M), final_state(ref, M))


def torchrun(nproc, out, *extra):
    proc = start(*ARGS, "--dropout=0.0", "--gradient_accumulation_steps=2", f"--out_dir={out}",
                 *extra, torchrun=[f"--nproc_per_node={nproc}"])
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, stdout


def test_ddp_resume_exact_and_across_world_sizes(shakespeare_char, tmp_path):
    """2 ranks (gloo, real torchrun): stop and resume is bitwise exact; moving the run to 1 rank
    continues on the same data, equal up to float summation order."""
    torchrun(2, tmp_path / "ddp", f"--max_iters={N}")
    torchrun(2, tmp_path / "ddp_resumed", "--max_iters=4")
    torchrun(2, tmp_path / "ddp_resumed", f"--max_iters={N}", "--init_from=resume")
    ddp, resumed = final_state(tmp_path / "ddp"), final_state(tmp_path / "ddp_resumed")
    assert ddp["metadata"]["world_size"] == 2 and len(ddp["rng"]) == 2
    assert_same_state(resumed, ddp)

    p = run("train.py", *ARGS, "--dropout=0.0", "--gradient_accumulation_steps=2",
            f"--out_dir={tmp_path / 'ddp_resumed'}", f"--max_iters={N + 4}", "--init_from=resume")
    assert "written by 2 rank(s), this run has 1" in p.stdout
    single = tmp_path / "single"
    run("train.py", *ARGS, "--dropout=0.0", "--gradient_accumulation_steps=2",
        f"--out_dir={single}", f"--max_iters={N + 4}")
    moved, one = final_state(tmp_path / "ddp_resumed", N + 4), final_state(single, N + 4)
    for k in one["model"]:
        torch.testing.assert_close(moved["model"][k], one["model"][k], rtol=1e-4, atol=1e-5)
