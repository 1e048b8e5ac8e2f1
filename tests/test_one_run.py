"""One folder holds one run, and a command that only reads never writes to it (docs/checkpoints.md):
another run's checkpoint dropped into out_dir, --eval_only, an out_dir deleted under a live run, a
full disk."""
import os
import re
import shutil
import signal

from keep.store import read_header
from conftest import TINY, copy_run, files_under, run, start, wait_for


def snapshot(folder):
    return files_under(folder, mtimes=True)


def test_eval_only_changes_nothing_in_out_dir(trained, tmp_path):
    """--eval_only of an older checkpoint scores it and leaves out_dir as it was, byte for byte:
    no lock taken, no metrics rows (before: the rows after it were marked superseded, so the curve
    ended there for good), no checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    p = run("train.py", *TINY, f"--out_dir={out}", f"--resume_from={out / 'ckpt-00000005.pt'}",
            "--eval_only")
    assert "step 5: train loss" in p.stdout
    p = run("train.py", *TINY, f"--out_dir={out}", "--eval_only")
    assert "step 10: train loss" in p.stdout
    assert snapshot(out) == before


def test_a_full_disk_says_so_and_a_run_whose_saves_keep_failing_stops(shakespeare_char, tmp_path,
                                                                      tmpfs):
    """A full disk at start is called full, not a permission problem. During a run, on a disk that
    fills up: each failed save is one warning, and after saver.FAILURES of them in a row the
    run stops with one error line naming the newest checkpoint (exit 1), instead of training for
    hours with nothing saved; the same command on a disk with room continues from that
    checkpoint."""
    from keep import saver
    disk = tmpfs(1_200_000)  # three of TINY's checkpoints (0.37 MB each), and then no more
    out = disk / "out"
    p = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=100", "--checkpoint_interval=1",
            "--keep_last=50", "--eval_interval=1000", check=False)
    warned = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: ")]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert (p.returncode == 1 and len(warned) == saver.FAILURES
            and len(errors) == 1), p.stdout + p.stderr
    assert ("checkpoints in a row could not be written" in errors[0]
            and "No space left on device" in errors[0])
    newest = sorted(n for n in os.listdir(out) if n.startswith("ckpt-"))[-1]
    assert newest in errors[0] and "iter 99:" not in p.stdout
    moved = tmp_path / "roomy"
    shutil.copytree(out, moved)
    p = run("train.py", *TINY, f"--out_dir={moved}", "--max_iters=100", "--checkpoint_interval=50",
            "--keep_last=50", "--eval_interval=1000")
    assert f"resuming from {moved / newest}" in p.stdout

    filled = tmpfs(64 * 1024)
    try:  # every byte taken
        (filled / "filler").write_bytes(os.urandom(64 * 1024))
    except OSError:
        pass
    p = run("train.py", *TINY, f"--out_dir={filled / 'out'}", "--max_iters=5", check=False)
    assert (p.returncode == 1 and p.stderr.startswith("error: ")
            and "disk is full" in p.stderr), p.stderr
    assert "permissions" not in p.stderr


def test_a_live_run_whose_out_dir_is_deleted_saves_beside_it_and_stops(shakespeare_char, tmp_path):
    """rm -rf of a live run's out_dir (or the folder moved away and another made in its place): the
    run notices at its next iteration, writes its state into OUT-rescued-RUNID beside it and stops
    with one error line saying so (exit 1); the rescued folder continues the run. Before: it trained
    on into a deleted folder, a second trainer could start in a re-made one, and the first one's
    warnings said older checkpoints were intact."""
    for how in ("rm -rf", "replaced"):
        out = tmp_path / how.replace(" ", "")
        proc, seen = start(*TINY, f"--out_dir={out}", "--max_iters=100000",
                           "--checkpoint_interval=20", "--eval_interval=1000"), []
        wait_for(proc, r"saved .*ckpt-00000020\.pt", seen)
        run_id = read_header(str(out / "ckpt-00000020.pt"))["run_id"]
        if how == "rm -rf":
            shutil.rmtree(out)
        else:
            os.rename(out, tmp_path / "moved")
            out.mkdir()
        try:
            output = "".join(seen) + proc.communicate(timeout=60)[0]
        finally:
            proc.send_signal(signal.SIGKILL)
        rescued = f"{out}-rescued-{run_id}"
        errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
        assert (proc.returncode == 1 and len(errors) == 1
                and "was deleted or replaced" in errors[0]), output
        assert f"continue it with --out_dir={rescued}" in errors[0] and "Traceback" not in output
        it = int(errors[0].split("at iteration ")[1].split()[0])
        assert os.path.exists(os.path.join(rescued, f"ckpt-{it:08d}.pt"))
        p = run("train.py", *TINY, f"--out_dir={rescued}", f"--max_iters={it + 2}",
                "--eval_interval=1000")
        assert f"at iteration {it}" in p.stdout and "resuming from" in p.stdout


def test_another_runs_checkpoint_dropped_into_out_dir_is_refused(trained, shakespeare_char,
                                                                 tmp_path):
    """Run B's newer checkpoint copied into run A's out_dir: the same command (and
    --init_from=resume) is one error line naming both runs and the file, and nothing is written.
    Before: B's file was continued as A's, its learning rate applied as a "change on resume", and a
    branch announced."""
    a = copy_run(trained, tmp_path / "a")  # run A: 5, 10, ckpt.pt
    b = tmp_path / "b"
    run("train.py", *TINY, f"--out_dir={b}", "--max_iters=12", "--learning_rate=3e-3",
        "--checkpoint_interval=12")
    shutil.copyfile(b / "ckpt-00000012.pt", a / "ckpt-00000012.pt")
    ra = read_header(str(a / "ckpt-00000010.pt"))["run_id"]
    rb = read_header(str(b / "ckpt-00000012.pt"))["run_id"]
    before = snapshot(a)
    for extra in ([], ["--init_from=resume"]):
        p = run("train.py", *TINY, f"--out_dir={a}", "--max_iters=20", *extra, check=False)
        lines = p.stderr.strip().splitlines()
        assert (p.returncode == 1 and len(lines) == 1
                and lines[0].startswith("error: ")), p.stdout + p.stderr
        assert (ra in lines[0] and rb in lines[0] and "ckpt-00000012.pt" in lines[0]
                and "holds two runs" in lines[0])
    after = snapshot(a)
    assert {k: v[0] for k, v in after.items() if k != ".lock"} == \
        {k: v[0] for k, v in before.items() if k != ".lock"}
    # each file's run shown; the mix is an error
    listing = run("checkpoint.py", str(a), check=False)
    assert (listing.returncode == 1
            and re.search(rf"^ckpt-00000012\.pt +{rb} ", listing.stdout, re.M)), listing.stdout
    assert re.search(rf"^ckpt-00000010\.pt +{ra} ", listing.stdout, re.M)
    assert (listing.stderr.startswith(f"error: {a} holds 2 runs ({ra}: ")
            and "ckpt-00000012.pt" in listing.stderr)
