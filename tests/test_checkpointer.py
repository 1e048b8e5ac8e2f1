"""Saving as a user meets it at the command line: how often checkpoint_minutes saves under
torchrun, a second trainer refused before it reads anything, what `saved` lines and metrics.jsonl
announce when the disk fills under async_save, retention after a failed re-write, a kill or an error
in the middle of replacing or deleting a folder, another branch's ckpt.pt that cannot be moved away,
and `checkpoint.py OUT_DIR` while a run deletes files under it. These tests look only at flags,
files, console lines, metrics.jsonl events and exit codes; the faults are real (strace, an
RLIMIT_FSIZE, a small tmpfs)."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from keep.files import CheckpointError
from keep import store
from conftest import ENV, ROOT, TINY, children, copy_run, run, start, wait_for
from metrics import read_rows
from test_faults import small_tmpfs, start_traced, traced  # noqa: F401 (small_tmpfs is a fixture)

ARGS = [*TINY, "--eval_interval=1000", "--checkpoint_interval=1000", "--keep_last=50"]
PERIOD = 0.02 * 60  # --checkpoint_minutes=0.02, in seconds


def names(out):
    """What is under a checkpoint's name in a run folder (files and folders); temp names start with
    '.'."""
    return sorted(n for n in os.listdir(out) if n.startswith("ckpt"))


def loads(path):
    try:
        store.load(str(path))
        return True
    except CheckpointError:
        return False


def assert_whole(out):
    """Every file and folder under a checkpoint's name verifies (CRCs) and loads."""
    bad = [n for n in names(out) if not loads(out / n)]
    assert not bad, f"under a checkpoint's name but not whole: {bad} (in {names(out)})"


def checkpoint_events(out):
    return [r for r in read_rows(out / "metrics.jsonl") if r.get("event") == "checkpoint"]


def run_starts(out):
    """The iteration each start of the run began at, from its 'start' events in metrics.jsonl."""
    return [r["iter"] for r in read_rows(out / "metrics.jsonl") if r.get("event") == "start"]


def flip_a_byte(path):
    """Bit rot in the middle of a file: its header still reads, its CRC fails."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def no_traceback(*outputs):
    return not any("Traceback" in o for o in outputs)


def only_warnings(stderr):
    """stderr holds nothing but one-line warnings."""
    return all(ln.startswith("warning: ") for ln in stderr.splitlines())


@pytest.fixture(scope="module")
def folders(shakespeare_char, tmp_path_factory):
    """A finished FSDP run in one process: the folders ckpt-00000004/ and ckpt-00000008/, and
    ckpt.pt."""
    out = tmp_path_factory.mktemp("folders")
    run("train.py", *ARGS, f"--out_dir={out}", "--parallelism=fsdp", "--max_iters=8",
        "--checkpoint_interval=4")
    assert names(out) == ["ckpt-00000004", "ckpt-00000008", "ckpt.pt"]
    return out


def test_checkpoint_minutes_under_torchrun_saves_once_a_period(shakespeare_char, tmp_path):
    """2 gloo ranks, a timed save due every 1.2 s: as many saves as periods in the run's own
    training time (plus the final one), not one at every iteration once the first period has
    passed."""
    job = start(*ARGS, "--gradient_accumulation_steps=2", f"--out_dir={tmp_path}",
                "--max_iters=250", "--checkpoint_interval=0", "--checkpoint_minutes=0.02",
                "--keep_last=2", torchrun=["--nproc_per_node=2"])
    stdout = job.communicate(timeout=300)[0]
    assert job.returncode == 0, stdout
    times = [r["time"] for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    seconds = times[-1] - times[0]  # the run's own clock, from its first update to its last
    saves = [r["iter"] for r in checkpoint_events(tmp_path)
             if os.path.basename(r["path"]) != "ckpt.pt"]
    assert seconds > PERIOD, f"trained {seconds:.1f}s only: no timed save was due"
    assert 2 <= len(saves) <= seconds / PERIOD + 2, (f"{len(saves)} saves in {seconds:.1f}s of "
                                                     f"training: {saves}")


def test_second_trainer_is_refused_before_it_opens_a_checkpoint(shakespeare_char, tmp_path):
    """docs/checkpoints.md: a second training process into a folder in use stops at once. It must
    not read (let alone load) the running job's checkpoints or metrics first: strace lists every
    file it opens."""
    out = tmp_path / "run"
    first = start(*ARGS, f"--out_dir={out}", "--max_iters=100000", "--checkpoint_interval=5",
                  "--keep_last=2")
    wait_for(first, r"^saved \S+ckpt-\d+\.pt$")
    log = tmp_path / "opened.log"
    p = run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=100000", "--checkpoint_interval=5",
            check=False, prefix=traced("-e", "trace=open,openat,openat2", log=log))
    assert p.returncode == 1 and no_traceback(p.stdout, p.stderr), p.stderr
    assert re.fullmatch(r"error: .*is in use by another training process.*",
                        p.stderr.strip()), p.stderr
    opened = set(re.findall(re.escape(str(out)) + r'/([^"/]+)', log.read_text()))
    theirs = sorted(n for n in opened if n.startswith(("ckpt", ".ckpt")) or n == "metrics.jsonl")
    assert not theirs, f"the refused process opened {theirs} before it found the folder in use"
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 0


def test_async_save_announces_only_files_on_disk(shakespeare_char, small_tmpfs):
    """A 1.2 MB tmpfs holds three checkpoints; background writes after that fail with ENOSPC. Each
    fsync is held 0.3 s (strace), so a write takes longer than the iterations between saves. At the
    moment each `saved PATH` line is read, PATH is on disk, whole, and of its iteration: nothing is
    announced before it is durable, nor for a failed write; metrics.jsonl's events say the same."""
    out = small_tmpfs / "run"
    proc = start_traced(traced("-e", "trace=fsync", "-e", "inject=fsync:delay_enter=300ms"), *ARGS,
                        f"--out_dir={out}", "--max_iters=30", "--checkpoint_interval=5",
                        "--eval_interval=10", "--async_save=True")
    seen, step, announced = [], 0, 0
    for line in proc.stdout:  # read as the run prints it
        seen.append(line)
        if m := re.match(r"^step (\d+):", line):
            step = int(m.group(1))
        if m := re.match(r"^saved (\S+)", line):
            announced += 1
            path = m.group(1)
            assert loads(path), f"announced {line.strip()!r}, but it is not on disk whole yet"
            it = store.load(path)["iter_num"]
            assert it == (step if os.path.basename(path) == "ckpt.pt"
                          else int(path[-len("00000000.pt"):-3])), line
    proc.wait(timeout=60)
    said = "".join(seen)
    assert proc.returncode in (0, 1) and no_traceback(said), said
    # saves were announced, and the disk did fill up
    assert announced and "No space left on device" in said, said
    newest = {r["path"]: r["iter"] for r in checkpoint_events(out)}  # the last event for each path
    for path, it in newest.items():
        assert loads(path) and store.load(path)["iter_num"] == it, \
            f"a checkpoint event for {path} at iteration {it}, which never reached the disk"


def test_a_failed_rewrite_never_counts_as_a_good_file(trained, tmp_path):
    """The newest file (10) rots, so the run falls back to 5 and reaches 10 again; that re-write
    fails (EFBIG: RLIMIT_FSIZE). The rotten 10 must not count as one of keep_last=2 good files when
    the next save succeeds: two good files remain (the older good 5 is not deleted for it)."""
    out = copy_run(Path(trained), tmp_path / "run")
    os.remove(out / "ckpt.pt")  # else the fall-back would be ckpt.pt, of iteration 10 too
    flip_a_byte(out / "ckpt-00000010.pt")

    def small_files():  # the soft limit only, so that the test can lift it (prlimit)
        # a checkpoint is ~370 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    proc = start(f"--out_dir={out}", "--max_iters=100000", "--keep_last=2",
                 "--checkpoint_interval=10", "--eval_interval=1000", preexec_fn=small_files)
    seen = []
    wait_for(proc, r"^iter 9:", seen)  # past the fall-back's warning about the rotten 10
    # its re-write failed
    wait_for(proc, r"^warning: .*" + re.escape(str(out / "ckpt-00000010.pt")), seen)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    proc.send_signal(signal.SIGTERM)  # the final save succeeds, and retention runs after it
    seen.append(proc.communicate(timeout=60)[0])
    assert proc.returncode == 0 and no_traceback(*seen), "".join(seen)
    good = [n for n in names(out) if loads(out / n)]
    assert len(good) >= 2, f"keep_last=2, but only {good} load (on disk: {names(out)})"


def test_kill_between_the_renames_of_a_folder_replace(folders, tmp_path):
    """The same iteration written again over a whole folder: folder 8 lacks a shard when the run
    starts (a copy still arriving), so the run falls back to 4; the shard is back by the time it
    writes 8 again. strace holds every rename of ckpt-00000008 for 2 s; the test kills the run as
    soon as the replace has begun (the name is empty, or holds a new folder). The whole 8 must
    survive: every folder under a checkpoint's name verifies, and the same command continues from
    8."""
    out = copy_run(folders, tmp_path / "run")
    os.remove(out / "ckpt.pt")  # else the fall-back would be ckpt.pt, of iteration 8 too
    target = out / "ckpt-00000008"
    os.rename(target / "__0_0.distcp", tmp_path / "shard")
    before = os.stat(target).st_ino
    same = [f"--out_dir={out}", "--max_iters=12"]
    proc = start_traced(traced("-P", str(target), "-e", "trace=rename,renameat,renameat2",
                               "-e", "inject=rename,renameat,renameat2:delay_exit=2s"), *same)
    seen = []
    wait_for(proc, r"^warning: .*ckpt-00000008", seen)  # it skips 8 and goes back to 4
    # 8 is whole again, long before the run reaches it
    os.rename(tmp_path / "shard", target / "__0_0.distcp")
    killed = False
    while proc.poll() is None and not killed:
        try:
            killed = os.stat(target).st_ino != before
        except FileNotFoundError:
            killed = True
        if killed:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)
    seen.append(proc.communicate(timeout=60)[0])
    # the kill landed, mid-replace: the run never announced the new 8, and the old one is aside
    assert killed and proc.returncode != 0 and "saved" not in "".join(seen), "".join(seen)
    assert [n for n in os.listdir(out) if ".old-" in n], os.listdir(out)
    assert_whole(out)
    p = run("train.py", *same)
    assert not re.search(r"^warning:", p.stdout + p.stderr, re.M), p.stdout + p.stderr
    assert run_starts(out)[-1] == 8, "the whole folder of iteration 8 was lost in the kill"
    assert_whole(out)


def test_kill_in_the_middle_of_a_folder_delete(folders, tmp_path):
    """keep_last=1 deletes older folders after each save; kill -9 at the second file deleted
    (strace, at the second unlinkat). No partial folder is left under a checkpoint's name, and the
    same command continues without a warning about one (at this start or any later one)."""
    out = copy_run(folders, tmp_path / "run")
    same = [f"--out_dir={out}", "--max_iters=16", "--keep_last=1"]
    p = run("train.py", *same, check=False,
            prefix=traced("-e", "trace=unlinkat", "-e", "inject=unlinkat:signal=KILL:when=2"))
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert os.path.isdir(out / "ckpt-00000012"), ("the kill was to land in retention, after the "
                                                  "save of 12")
    assert_whole(out)
    p = run("train.py", *same)
    assert not re.search(r"^warning:", p.stdout + p.stderr, re.M), p.stdout + p.stderr
    assert_whole(out)


def test_a_folder_delete_that_fails_midway_is_a_warning(folders, tmp_path):
    """Retention's delete of an old folder fails at its second file (EIO on the second unlinkat):
    the run goes on and exits 0, stderr holds warnings only, and no partial folder is left under a
    checkpoint's name."""
    out = copy_run(folders, tmp_path / "run")
    p = run("train.py", f"--out_dir={out}", "--max_iters=12", "--keep_last=1", check=False,
            prefix=traced("-e", "trace=unlinkat", "-e", "inject=unlinkat:error=EIO:when=2"))
    assert (p.returncode == 0 and no_traceback(p.stdout, p.stderr)
            and only_warnings(p.stderr)), p.stderr
    assert re.search(r"^saved \S+ckpt-00000012$", p.stdout, re.M)
    assert_whole(out)


def test_an_undeletable_old_file_is_a_warning(trained, tmp_path):
    """An old checkpoint that cannot be deleted nor moved (every unlink and rename of it fails with
    EACCES): one warning per attempt, the run goes on, and exits 0."""
    out = copy_run(Path(trained), tmp_path / "run")
    old = out / "ckpt-00000005.pt"
    p = run("train.py", f"--out_dir={out}", "--max_iters=15", "--keep_last=1", check=False,
            prefix=traced("-P", str(old), "-e", "trace=unlink,unlinkat,rename,renameat,renameat2",
                          "-e", "inject=unlink,unlinkat,rename,renameat,renameat2:error=EACCES"))
    assert (p.returncode == 0 and no_traceback(p.stdout, p.stderr)
            and only_warnings(p.stderr)), p.stderr
    assert any(str(old) in ln for ln in p.stderr.splitlines())
    assert re.search(r"^saved \S+ckpt-00000015\.pt$", p.stdout, re.M)
    assert_whole(out)


def test_another_branchs_best_that_cannot_be_moved_is_a_warning(trained, tmp_path):
    """docs/checkpoints.md, branches: resume_from an older file starts branch 1, which keeps branch
    0's ckpt.pt under another name before it writes its own. That rename fails (EIO): one warning,
    the run goes on and exits 0, and branch 0's best file is still on disk, under either name."""
    out = copy_run(Path(trained), tmp_path / "run")
    theirs = (out / "ckpt.pt").read_bytes()
    p = run("train.py", f"--out_dir={out}", f"--resume_from={out / 'ckpt-00000005.pt'}",
            "--max_iters=10", check=False,
            prefix=traced("-P", str(out / "ckpt.pt"), "-e", "trace=rename,renameat,renameat2",
                          "-e", "inject=rename,renameat,renameat2:error=EIO"))
    assert p.returncode == 0 and no_traceback(p.stdout, p.stderr), p.stdout[-2000:] + p.stderr
    assert p.stderr and only_warnings(p.stderr), p.stderr
    assert re.search(r"^saved \S+ckpt-00000010-b1\.pt$", p.stdout, re.M)  # branch 1 trained on
    assert any((out / n).read_bytes() == theirs for n in names(out)), "branch 0's ckpt.pt was lost"


# Runs checkpoint.py as `python checkpoint.py TARGET` does (as __main__), once per target, in one
# interpreter so that torch is imported once rather than 20 times; prints each run's exit status and
# output as JSON. An exception other than SystemExit is what a user would see as a traceback.
LISTER = r"""
import contextlib, io, json, runpy, sys, traceback
script, *targets = sys.argv[1:]
results = []
for target in targets:
    sys.argv = [script, target]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = "traceback"
    results.append(dict(target=target, code=code, out=out.getvalue(), err=err.getvalue()))
print(json.dumps(results))
"""


def test_listing_while_a_run_deletes_files_and_bad_links(shakespeare_char, tmp_path):
    """`python checkpoint.py OUT_DIR` 20 times while a run with keep_last=1 saves and deletes a file
    at every iteration: each listing exits 0, none in a traceback. A dangling symlink and a symlink
    loop named ckpt.pt are listed as bad (exit 1)."""
    out = tmp_path / "run"
    job = start(*ARGS, f"--out_dir={out}", "--max_iters=100000", "--checkpoint_interval=1",
                "--keep_last=1")
    wait_for(job, r"^saved \S+ckpt-00000003\.pt$")  # files come and go
    dangling, loop = tmp_path / "dangling", tmp_path / "loop"
    dangling.mkdir()
    (dangling / "ckpt.pt").symlink_to(tmp_path / "nowhere.pt")
    loop.mkdir()
    (loop / "ckpt.pt").symlink_to(loop / "ckpt.pt")
    p = subprocess.run([sys.executable, "-c", LISTER, "checkpoint.py", *[str(out)] * 20,
                        str(dangling), str(loop)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=60)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    broken = [r for r in results[:-2] if r["code"] != 0 or "Traceback" in r["err"]]
    assert not broken, (f"{len(broken)} of {len(results)} listings failed; the "
                        f"first:\n{broken[0]['err']}")
    for r in results[-2:]:  # listed, then exit 1: a bad file was found
        assert re.search(r"^ckpt\.pt\s.*\bbad\b", r["out"], re.M | re.I), r["out"]
        assert r["code"] == 1 and "Traceback" not in r["err"], r


def test_a_folder_that_cannot_be_read_for_remote_dir_is_a_warning(shakespeare_char, tmp_path):
    """remote_dir takes a folder once it is durable here: its state.pt is read again then (the files
    it names). That read failing (EIO, at the second open of state.pt: the first one is the upload's
    own handle) skips the copy with one warning; the save itself was whole, is announced, and
    training goes on."""
    out = tmp_path / "run"
    state = out / "ckpt-00000004" / "state.pt"
    p = run("train.py", *ARGS, f"--out_dir={out}", "--parallelism=fsdp", "--max_iters=6",
            "--checkpoint_interval=4", f"--remote_dir=file://{tmp_path / 'remote'}", check=False,
            prefix=traced("-P", str(state), "-e", "trace=openat", "-e",
                          "inject=openat:error=EIO:when=2"))
    assert p.returncode == 0 and no_traceback(p.stdout, p.stderr), p.stdout[-2000:] + p.stderr
    assert re.search(rf"^saved {re.escape(str(out / 'ckpt-00000004'))}$", p.stdout, re.M), p.stdout
    assert p.stderr.strip().startswith(f"warning: could not open {out / 'ckpt-00000004'} to copy "
                                       "it to remote_dir")
    assert only_warnings(p.stderr) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert_whole(out)


def test_kill_in_the_delete_of_a_replaced_folder(folders, tmp_path):
    """A folder written again over a damaged one of the same iteration steps the old one aside
    ('.NAME.old-PID'), then deletes it through a temporary name; kill -9 at the first file of that
    delete (the first unlinkat of the run). The next start removes the leftover: nothing but .lock
    is left under a hidden name, and every folder under a checkpoint's name is whole."""
    out = copy_run(folders, tmp_path / "run")
    os.remove(out / "ckpt.pt")  # else the fall-back would be ckpt.pt, of iteration 8 too
    # so the run goes back to 4 and writes 8 again
    flip_a_byte(out / "ckpt-00000008" / "__0_0.distcp")
    same = [f"--out_dir={out}", "--max_iters=12"]
    p = run("train.py", *same, check=False,
            prefix=traced("-e", "trace=unlinkat", "-e", "inject=unlinkat:signal=KILL:when=1"))
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert [n for n in os.listdir(out) if ".old-" in n], \
        "the kill was to land in the delete of the old folder"
    run("train.py", *same)
    assert [n for n in os.listdir(out) if n.startswith(".")] == [".lock"]
    assert_whole(out)


def test_a_background_write_in_flight_reaches_the_disk_when_the_main_thread_dies(tmp_path):
    """The Worker that writes checkpoints in the background outlives a main thread that ends with a
    traceback: the write in flight (slowed here by a big state) still ends whole on disk, and the
    process exits; an idle Worker that nobody closed does not hold the exit up."""
    script = tmp_path / "dies.py"
    script.write_text(
        "import sys, time, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from keep.files import save\n"
        "from keep.worker import Worker\n"
        "idle, writer = Worker('idle'), Worker('writer')\n"
        "state = dict(x=torch.zeros(64 << 20), iter_num=7)\n"
        "writer.submit(lambda: (time.sleep(1), save(state, sys.argv[1])))\n"
        "raise ValueError('the main thread dies')\n")
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt.pt")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "the main thread dies" in p.stderr, p.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 7
