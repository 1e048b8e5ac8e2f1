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

import checkpoint
from conftest import TINY, run, start, wait_for

# dropout on, so the restored torch RNG matters; evals and checkpoints at odd places
ARGS = [*TINY, "--dropout=0.1", "--eval_interval=5", "--checkpoint_interval=4", "--keep_last=50"]
N = 12


def losses(stdout):
    """{iteration: printed loss}: the numbers a user compares."""
    return {int(i): loss for i, loss in re.findall(r"^iter (\d+): loss ([\d.]+)", stdout, re.M)}


def final_state(out, it=N):
    return checkpoint.load(os.path.join(out, checkpoint.PERIODIC.format(it)))


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


# 1: first step; 4: right after a checkpoint; 5: at an eval; 6: right after an eval
@pytest.mark.parametrize("k", [1, 4, 5, 6])
def test_stop_and_resume_is_bitwise_exact(reference, tmp_path, k):
    ref_out, ref_losses = reference
    p1 = run("train.py", *ARGS, f"--out_dir={tmp_path}", f"--max_iters={k}")
    # no config at all but a longer max_iters: dataset, batch, schedule, shape, dropout, device all
    # come from the checkpoint's stored config
    p2 = run("train.py", f"--out_dir={tmp_path}", f"--max_iters={N}", "--init_from=resume")
    assert f"changed on resume: max_iters {k} -> {N}\n" in p2.stdout
    assert "tokens per iteration 128" in p2.stdout
    assert f"at iteration {k}" in p2.stdout
    first, second = losses(p1.stdout), losses(p2.stdout)
    assert sorted(first) == list(range(k)) and sorted(second) == list(range(k, N))  # none twice, none skipped
    assert {**first, **second} == ref_losses
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


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130), (signal.SIGHUP, 0), (signal.SIGUSR1, 0)])
def test_signal_saves_and_resume_is_exact(long_reference, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(*LONG, f"--out_dir={out}", stderr=subprocess.PIPE)
    wait_for(proc, r"^iter 6:")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"{sig.name} received" in stdout and "Traceback" not in stderr
    k = int(re.search(r"checkpoint saved at iteration (\d+)", stdout).group(1))
    assert 7 <= k < 300 and os.path.exists(out / checkpoint.PERIODIC.format(k))
    p = run("train.py", *LONG, f"--out_dir={out}")  # the very same command again
    assert "continuing it" in p.stdout and f"resuming from {out / checkpoint.PERIODIC.format(k)}" in p.stdout
    assert_same_state(final_state(out, 300), long_reference)


def test_kill_9_fuzz(shakespeare_char, tmp_path):
    """SIGKILL at random moments (a checkpoint after every iteration, so many land mid-write),
    then the same command again each time: every restart works and the end equals the
    uninterrupted run."""
    M = 80  # long enough that 8 kills land before the end
    ref = tmp_path / "ref"
    run("train.py", *ARGS, f"--out_dir={ref}", f"--max_iters={M}")
    out = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        proc = start(*ARGS, f"--out_dir={out}", f"--max_iters={M}", "--checkpoint_interval=1", "--keep_last=2", stderr=subprocess.PIPE)
        if kills < 8:
            wait_for(proc, r"^(iter \d+:|step \d+:)")
            time.sleep(rng.uniform(0.0, 0.1))
            proc.kill()
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            for path in checkpoint.candidates(out):
                checkpoint.load(path)  # every file under a checkpoint's name loads
            continue
        assert proc.returncode == 0, stderr  # not killed: the run got to max_iters
        break
    assert kills == 8
    assert_same_state(final_state(out, M), final_state(ref, M))


def torchrun(nproc, out, *extra):
    proc = start(*ARGS, "--dropout=0.0", "--gradient_accumulation_steps=2", f"--out_dir={out}", *extra,
                 torchrun=[f"--nproc_per_node={nproc}"])
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

    p = run("train.py", *ARGS, "--dropout=0.0", "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'ddp_resumed'}",
            f"--max_iters={N + 4}", "--init_from=resume")
    assert "written by 2 rank(s), this run has 1" in p.stdout
    single = tmp_path / "single"
    run("train.py", *ARGS, "--dropout=0.0", "--gradient_accumulation_steps=2", f"--out_dir={single}", f"--max_iters={N + 4}")
    moved, one = final_state(tmp_path / "ddp_resumed", N + 4), final_state(single, N + 4)
    for k in one["model"]:
        torch.testing.assert_close(moved["model"][k], one["model"][k], rtol=1e-4, atol=1e-5)
