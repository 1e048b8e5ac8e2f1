"""A remote_dir holds one run and the run touches only what it wrote (remote.py, docs/remote.md):
malformed URLs, foreign files, another run's copy, two live writers, doctored commits and stored
configs, a signal during the end-of-run wait, CRCs read back from the store."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from keep.store import read_header
from keep import store
from keep import remote as remote_copy
from keep.claims import judge_commit
from keep.uploader import Uploader
from keep.files import crc32
from conftest import TINY, files_under, run, start, wait_for
from s3server import S3Server

ARGS = [*TINY, "--eval_interval=4", "--checkpoint_interval=2", "--keep_last=2"]


def copy_if_there(src, dst):
    """shutil.copy2, leaving out a file deleted since its folder was listed."""
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        pass


def one_error(p, code=1):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), \
        (p.returncode, p.stdout, p.stderr)
    assert "iter " not in p.stdout
    return lines[0]


@pytest.mark.parametrize("url", ["s3:/runs/x", "s3:runs/x", "s3//runs/x", "s3://", "s3:///x",
                                 "ftp://host/x", "zip://a.zip", "reference://x",
                                 "file://relative/x", "some/relative/dir", "s3://bucket/run*",
                                 "file:///tmp/runs/[ab]"])
def test_a_malformed_remote_dir_is_one_line_and_makes_nothing(shakespeare_char, tmp_path, url):
    """Before: `s3:/runs/x` made a folder `s3:` under the current directory and reported the run
    safe in a "remote" copy on the same disk; ftp:// ended in a traceback; a wildcard (which fsspec
    reads as a pattern, so a delete could reach other folders) was taken."""
    work = tmp_path / "cwd"
    work.mkdir()
    p = run("train.py", *TINY, f"--out_dir={tmp_path / 'out'}", f"--remote_dir={url}",
            "--max_iters=2", cwd=str(work), check=False)
    line = one_error(p, code=2)
    assert "remote_dir" in line and url in line
    assert os.listdir(work) == [] and not (tmp_path / "out").exists()


def test_other_files_are_refused_before_a_run_and_never_touched_beside_one(shakespeare_char,
                                                                           tmp_path):
    """A remote_dir holding someone's files and no run is refused with one line; files that come
    into a run's remote_dir later (photos, a commit of a newer format and its data) are listed as
    not ours and are still there, byte for byte, after the run's uploads, retention and cleanup."""
    disk = tmp_path / "backup"
    (disk / "data" / "photos").mkdir(parents=True)
    (disk / "data" / "photos" / "2019.jpg").write_bytes(b"\xff\xd8 a photo")
    (disk / "notes.txt").write_text("mine")
    before = files_under(disk)
    out = tmp_path / "out"
    p = run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=4",
            check=False)
    line = one_error(p)
    assert ("not empty and holds no run" in line and "data/photos/2019.jpg" in line
            or "notes.txt" in line), line
    assert files_under(disk) == before

    remote = f"file://{tmp_path / 'run-copy'}"
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=4")
    copy = tmp_path / "run-copy"
    (copy / "data" / "photos").mkdir()
    (copy / "data" / "photos" / "2019.jpg").write_bytes(b"\xff\xd8 a photo")
    (copy / "ckpt-00000099.pt.commit").write_text(json.dumps(dict(format=2, name="ckpt-00000099.pt",
                                                                  data="data/00000099-0badf00d")))
    (copy / "data" / "00000099-0badf00d").mkdir()
    (copy / "data" / "00000099-0badf00d" / "ckpt-00000099.pt").write_bytes(
        b"a newer format's bytes")
    (copy / "data" / "00000007-12345678").mkdir()  # no commit, no intent: not provably ours
    (copy / "data" / "00000007-12345678" / "x").write_bytes(b"someone's")
    foreign = {k: v for k, v in files_under(copy).items()
               if "photos" in k or "0badf00d" in k or "00000099" in k or "12345678" in k}
    assert len(foreign) == 4
    listing = run("checkpoint.py", remote).stdout
    for key in ("data/photos/2019.jpg", "ckpt-00000099.pt.commit", "data/00000007-12345678/x"):
        assert re.search(rf"^{re.escape(key)} .*not ours: never touched$", listing, re.M), listing
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=10")
    after = files_under(copy)
    assert {k: after.get(k) for k in foreign} == foreign
    assert "ckpt-00000010.pt.commit" in after


def test_another_runs_copy_is_never_written_over(shakespeare_char, tmp_path):
    """Run Y's remote copy at iteration 4; run X's out_dir at iteration 8 (newer) given Y's
    remote_dir: one line naming both run ids; Y's copy unchanged. Before: X's commits replaced
    Y's."""
    remote = tmp_path / "y-remote"
    run("train.py", *ARGS, f"--out_dir={tmp_path / 'y'}", f"--remote_dir=file://{remote}",
        "--max_iters=4")
    run("train.py", *ARGS, f"--out_dir={tmp_path / 'x'}", "--max_iters=8")
    x = read_header(str(tmp_path / "x" / "ckpt-00000008.pt"))["run_id"]
    y = read_header(str(tmp_path / "y" / "ckpt-00000004.pt"))["run_id"]
    before = files_under(remote)
    p = run("train.py", *ARGS, f"--out_dir={tmp_path / 'x'}", f"--remote_dir=file://{remote}",
            "--max_iters=10", check=False)
    line = one_error(p)
    assert x in line and y in line and "one remote_dir holds one run" in line
    assert files_under(remote) == before


def test_two_live_runs_on_one_remote_dir(shakespeare_char, tmp_path):
    """A second live run on a remote_dir is refused with one line naming the first: another run at
    once; the same run (its out_dir copied to a second machine) once it has seen the first refresh
    its lease. A lease that a lost machine left is taken over once it lapses, with one note. Before:
    both wrote, and both said the remote_dir held their newest checkpoint."""
    remote = f"file://{tmp_path / 'remote'}"
    first = start(*ARGS, f"--out_dir={tmp_path / 'a'}", f"--remote_dir={remote}",
                  "--max_iters=100000", "--remote_lease=10", "--eval_interval=1000")
    seen = []
    wait_for(first, r"saved .*ckpt-00000004\.pt", seen)
    lease = json.loads((tmp_path / "remote" / "lease.json").read_text())
    p = run("train.py", *ARGS, f"--out_dir={tmp_path / 'b'}", f"--remote_dir={remote}",
            "--max_iters=6", check=False)
    line = one_error(p)
    assert lease["run_id"] in line  # (in use, or: holds run X, this run is Y)
    # copied while it trains: a file that retention deletes meanwhile is left out (cp -r says so)
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy", ignore=shutil.ignore_patterns(".lock"),
                    copy_function=copy_if_there)
    p = run("train.py", *ARGS, f"--out_dir={tmp_path / 'a-copy'}", f"--remote_dir={remote}",
            "--max_iters=100000", check=False)
    assert "waiting up to" in p.stdout
    line = one_error(p)
    assert f"in use by run {lease['run_id']}" in line
    first.send_signal(signal.SIGTERM)
    rest = first.communicate(timeout=60)[0]
    assert first.returncode == 0
    last = int(re.findall(r"saved .*ckpt-(\d{8})\.pt", rest)[-1])
    assert not (tmp_path / "remote" / "lease.json").exists()  # given up at the end

    # a lost machine's lease: another host, refreshed long ago
    (tmp_path / "remote" / "lease.json").write_text(json.dumps(dict(
        format=1, run_id=lease["run_id"], attempt="feedf00d", host="a-lost-machine", pid=1,
        bound=120)))
    os.utime(tmp_path / "remote" / "lease.json", (time.time() - 600,) * 2)
    p = run("train.py", *ARGS, f"--out_dir={tmp_path / 'a'}", f"--remote_dir={remote}",
            f"--max_iters={last + 2}")
    assert "taking over remote_dir's lease of run" in p.stdout and "host a-lost-machine" in p.stdout
    assert f"holds the newest checkpoint (ckpt-{last + 2:08d}.pt" in p.stdout


def test_stored_config_restores_knobs_only(trained, tmp_path):
    """A checkpoint whose stored config names train.py's own variables (master=False would have
    switched saving off, ckpt_path would have pointed the run elsewhere) resumes with one note and
    writes its checkpoints."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    path = str(out / "ckpt-00000010.pt")
    ckpt = store.load(path)
    ckpt["config"].update(master=False, rank=3, ckpt_path="/nowhere")
    store.save(ckpt, path)
    os.remove(out / "ckpt.pt")
    p = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=14", "--checkpoint_interval=2")
    assert ("'ckpt_path', 'master', 'rank'" in p.stdout
            and "not a knob of train.py; ignored" in p.stdout)
    assert (out / "ckpt-00000014.pt").exists() and (out / "ckpt-00000012.pt").exists()


def test_a_malformed_commit_is_one_line_and_skipped(shakespeare_char, tmp_path):
    """Commit objects whose objects are not pairs, whose branch is a string or whose data points
    outside data/ are each listed as damaged and skipped; train.py, sample.py and checkpoint.py
    still use the complete ones. Before: the whole listing failed (train.py, sample.py and export.py
    refused the remote_dir) or a TypeError traceback came out of restore()."""
    disk = tmp_path / "remote"
    out = tmp_path / "out"
    remote = f"file://{disk}"
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=8",
        "--keep_every=2")
    periodic = sorted(p.name[:-len(".commit")] for p in disk.glob("ckpt-*.pt.commit"))
    # (a newer one waiting replaces an older one not yet copied)
    assert len(periodic) >= 3, periodic
    doctored = periodic[-3:]
    for name, change in zip(doctored, (dict(objects={"x": [1, 2, 3]}), dict(branch="x"),
                                       dict(data="../../etc"))):
        c = json.loads((disk / f"{name}.commit").read_text())
        c.update(change)
        (disk / f"{name}.commit").write_text(json.dumps(c))
    listing = run("checkpoint.py", remote, check=False)
    assert listing.returncode == 1
    for name in doctored:
        assert re.search(rf"^{name} .*INCOMPLETE: its commit object is damaged", listing.stdout,
                         re.M), listing.stdout
    assert re.search(r"^ckpt\.pt .* complete$", listing.stdout, re.M)
    shutil.rmtree(out)
    p = run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=10")
    assert "downloaded ckpt.pt (iteration 8" in p.stdout and p.stderr.count("is not complete") == 3
    s = run("sample.py", f"--out_dir={remote}", "--device=cpu", "--num_samples=1",
            "--max_new_tokens=5", env=dict(XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert s.stdout.strip()


def test_fsdp_shards_of_other_ranks_survive_rank0s_first_cleanup(tmp_path):
    """Under FSDP, rank 1 may upload its shards of a folder before rank 0 starts its first job,
    whose cleanup used to delete every prefix no commit names: rank 1's shards went, and rank 0
    waited OTHERS_WAIT for them. Here rank 1's Uploader finishes first, for real, then rank 0's."""
    folder = tmp_path / "out" / "ckpt-00000004"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"rank zero's shard")
    (folder / "__1_0.distcp").write_bytes(b"rank one's shard")
    files = {n: list(crc32(str(folder / n))) for n in ("__0_0.distcp", "__1_0.distcp")}
    torch.save(dict(files=files, aliases={}, optimizer_groups=[]), folder / "state.pt")
    remote = remote_copy.Remote(f"file://{tmp_path / 'remote'}")
    prefix = remote_copy.new_prefix(4)
    header = dict(iter_num=4, run_id="0123abcd", branch=0, kind="periodic", val_loss=None)
    one = Uploader(remote, str(tmp_path / "out"), run_id="0123abcd", branch=0, keep_last=3,
                   keep_every=0, attempt="aaaa0000", rank=1)
    one.push(str(folder), header, prefix)
    one.finish(30)
    zero = Uploader(remote, str(tmp_path / "out"), run_id="0123abcd", branch=0, keep_last=3,
                                keep_every=0, attempt="aaaa0000", rank=0)
    zero.push(str(folder), header, prefix)
    ok, line = zero.finish(30)
    assert ok, line
    c = remote.checkpoints().good[0]
    assert c["name"] == "ckpt-00000004" and "ckpt-00000004/__1_0.distcp" in c["objects"]
    assert remote.verify(c) is None


def test_verify_reads_every_remote_object_back(shakespeare_char, tmp_path):
    """`checkpoint.py verify REMOTE` reads each complete checkpoint's objects and checks their CRCs:
    a flipped byte (same size) is BAD there and exit 1, while the listing by sizes says complete."""
    disk = tmp_path / "remote"
    run("train.py", *ARGS, f"--out_dir={tmp_path / 'out'}", f"--remote_dir=file://{disk}",
        "--max_iters=4")
    good = run("checkpoint.py", "verify", f"file://{disk}").stdout
    assert re.search(r"^ckpt-00000004\.pt .* complete, every CRC checked$", good, re.M), good
    c = json.loads((disk / "ckpt-00000004.pt.commit").read_text())
    data = disk / c["data"] / "ckpt-00000004.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert re.search(r"^ckpt-00000004\.pt .* complete$",
                     run("checkpoint.py", f"file://{disk}").stdout, re.M)
    p = run("checkpoint.py", "verify", f"file://{disk}", check=False)
    assert p.returncode == 1 and re.search(r"^ckpt-00000004\.pt .* BAD: .*damaged \(CRC-32",
                                           p.stdout, re.M), p.stdout


def test_an_unusable_cache_folder_is_one_line(shakespeare_char, tmp_path):
    disk = tmp_path / "remote"
    run("train.py", *ARGS, f"--out_dir={tmp_path / 'out'}", f"--remote_dir=file://{disk}",
        "--max_iters=4")
    (tmp_path / "cache").write_text("a file, not a folder")
    p = run("sample.py", f"--out_dir=file://{disk}", "--device=cpu", "--num_samples=1",
            "--max_new_tokens=5", env=dict(XDG_CACHE_HOME=str(tmp_path / "cache")), check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: ") and \
        "Traceback" not in p.stderr and "XDG_CACHE_HOME" in p.stderr, p.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_cuts_the_end_of_run_wait_for_the_copy(shakespeare_char, tmp_path, sig, code):
    """The store gone, a run that ends waits up to remote_wait for its copy; a stop signal then ends
    the wait with one line saying what did not reach remote_dir, and the signal's exit code. Before:
    the signal was ignored without a word and the run exited 0 after the whole wait."""
    s3 = S3Server(str(tmp_path / "s3"))
    try:
        remote = f"s3://{s3.bucket('runs')}/run"
        proc, seen = start(*TINY, f"--out_dir={tmp_path / 'out'}", f"--remote_dir={remote}",
                           "--max_iters=30", "--checkpoint_interval=10", "--eval_interval=1000",
                           "--remote_wait=300", env=s3.env()), []
        wait_for(proc, r"saved .*ckpt-00000010\.pt", seen)
        s3.kill()
        wait_for(proc, r"waiting up to 300s \(remote_wait\)", seen)
        t0 = time.time()
        proc.send_signal(sig)
        output = "".join(seen) + proc.communicate(timeout=60)[0]
        assert time.time() - t0 < 20 and proc.returncode == code, output
        assert re.search(r"warning: ckpt-00000030\.pt \(iteration 30\) did not reach remote_dir .* "
                         r"the wait was cut short by a signal", output), output
    finally:
        s3.kill()


def test_a_branch_keeps_the_other_branchs_best_in_the_remote_too(shakespeare_char, tmp_path):
    """A resume by hand from an older file is a new branch; its ckpt.pt keeps branch 0's under
    ckpt-best-b0-N.pt in out_dir, and now in remote_dir too. Before: branch 1's commit replaced
    branch 0's ckpt.pt in the remote and deleted its data."""
    out, disk = tmp_path / "out", tmp_path / "remote"
    command = [*ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--keep_last=10"]
    run("train.py", *command, "--max_iters=8")
    best0 = json.loads((disk / "ckpt.pt.commit").read_text())
    assert best0["branch"] == 0 and best0["iter_num"] == 8
    p = run("train.py", *command, f"--resume_from={out / 'ckpt-00000004.pt'}", "--max_iters=6")
    assert "as branch 1" in p.stdout and "holds the newest checkpoint" in p.stdout
    kept = json.loads((disk / "ckpt-best-b0-00000008.pt.commit").read_text())
    assert kept["data"] == best0["data"] and kept["kind"] == "kept"
    assert json.loads((disk / "ckpt.pt.commit").read_text())["branch"] == 1
    listing = run("checkpoint.py", "verify", f"file://{disk}").stdout
    assert re.search(r"^ckpt-best-b0-00000008\.pt .* complete, every CRC checked$", listing,
                     re.M), listing
    assert re.search(r"^ckpt\.pt +1 +6 .* complete, every CRC checked$", listing, re.M), listing


def test_a_retention_failure_in_the_remote_is_a_warning_not_a_lost_copy(shakespeare_char, tmp_path):
    """Remote retention that cannot delete an old checkpoint's data (an immutable folder: chattr +i)
    is one warning; the checkpoint just copied counts as copied (not uploaded again, and the end
    says the remote holds it); the next start, once the folder can be deleted, removes what is left,
    which an intent written before the delete proves the run's. Before: the copy was retried as a
    failed upload and the end said it did not reach remote_dir."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    disk = tmp_path / "remote"
    command = [*TINY, "--eval_interval=1000", "--checkpoint_interval=2", "--keep_last=1",
               f"--out_dir={tmp_path / 'out'}", f"--remote_dir=file://{disk}", "--remote_wait=20"]
    run("train.py", *command, "--max_iters=2")
    old = disk / json.loads((disk / "ckpt-00000002.pt.commit").read_text())["data"]
    if subprocess.run(["chattr", "+i", str(old)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        p = run("train.py", *command, "--max_iters=4")
    finally:
        subprocess.run(["chattr", "-i", str(old)], check=True)
    assert p.stderr.count("could not apply keep_last in remote_dir") == 1, p.stderr
    assert "could not copy" not in p.stderr and "did not reach" not in p.stderr, p.stderr
    assert "holds the newest checkpoint (ckpt-00000004.pt, iteration 4)" in p.stdout
    assert old.exists() and not (disk / "ckpt-00000002.pt.commit").exists()
    run("train.py", *command, "--max_iters=6")
    assert not old.exists() and not list(disk.glob("data/*.intent"))


def test_metrics_come_down_whole_or_not_at_all(shakespeare_char, tmp_path):
    """A new machine's start downloads metrics.jsonl with the checkpoint; killed as the file is
    written in out_dir, it leaves no partial metrics.jsonl (which the next start would then keep,
    and the curve of the first machine would be lost). Before: it was written straight into
    out_dir."""
    from test_faults import traced
    disk, out = tmp_path / "remote", tmp_path / "out"
    command = [*ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}"]
    run("train.py", *command, "--max_iters=4")
    shutil.rmtree(out)
    out.mkdir()
    p = run("train.py", *command, "--max_iters=6", check=False, prefix=traced(
        "-P", str(out / "metrics.jsonl"), "-e", "trace=write,pwrite64,sendfile,copy_file_range",
        "-e", "inject=write,pwrite64,sendfile,copy_file_range:signal=KILL:when=1"))
    assert p.returncode in (0, 137, -9), p.stdout + p.stderr
    if (out / "metrics.jsonl").exists():
        rows = (out / "metrics.jsonl").read_bytes()
        assert rows.startswith((disk / "metrics.jsonl").read_bytes()[:200]) and rows.endswith(b"\n")


def test_a_process_whose_lease_was_taken_copies_nothing_more(shakespeare_char, tmp_path):
    """A live run whose lease another process took (its machine cut off from the store for longer
    than remote_lease, say) says so once and writes nothing more to remote_dir; its end says its
    newest checkpoint did not reach it."""
    disk = tmp_path / "remote"
    proc, seen = start(*ARGS, f"--out_dir={tmp_path / 'out'}", f"--remote_dir=file://{disk}",
                       "--max_iters=100000", "--remote_lease=2", "--eval_interval=1000",
                       "--checkpoint_interval=20"), []
    wait_for(proc, r"saved .*ckpt-00000040\.pt", seen)
    lease = json.loads((disk / "lease.json").read_text())
    (disk / "lease.json").write_text(
        json.dumps(dict(lease, attempt="another1", host="elsewhere", pid=1)))
    wait_for(proc, r"was taken over by run .* on host elsewhere", seen)
    commits = sorted(p.name for p in disk.glob("*.commit"))
    wait_for(proc, r"saved .*ckpt-\d{8}\.pt", seen)
    wait_for(proc, r"saved .*ckpt-\d{8}\.pt", seen)
    proc.send_signal(signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and output.count("was taken over") == 1, output
    assert re.search(r"did not reach remote_dir .*\(taken over by run", output), output
    assert sorted(p.name for p in disk.glob("*.commit")) == commits
    # not given up: not ours
    assert json.loads((disk / "lease.json").read_text())["attempt"] == "another1"


def test_a_run_killed_before_its_final_copy_completes_it_at_the_next_start(shakespeare_char,
                                                                           tmp_path):
    """The state a kill leaves as the final checkpoint's commit object is about to be written: its
    data and intent in remote_dir, no commit (made here by deleting the commit of a finished run).
    The same command finds the run complete and, before it says so, copies the final checkpoint, and
    cleans the orphaned data. Before: it exited at once and remote_dir never got it (found by the
    fault sweep's remote-file scenario, a kill at that rename)."""
    disk = tmp_path / "remote"
    command = [*ARGS, f"--out_dir={tmp_path / 'out'}", f"--remote_dir=file://{disk}",
               "--max_iters=6"]
    run("train.py", *command)
    final = json.loads((disk / "ckpt-00000006.pt.commit").read_text())
    # as a killed upload leaves it: its intent (an earlier start's), its data
    orphan = final["data"]
    (disk / f"{orphan}.0.intent").write_text(json.dumps(dict(format=1, prefix=orphan,
                                                             run_id=final["run_id"],
                                                             attempt="0ld0ld00", rank=0)))
    os.remove(disk / "ckpt-00000006.pt.commit")
    p = run("train.py", *command)
    assert "the run is complete" in p.stdout
    assert "holds the newest checkpoint (ckpt-00000006.pt, iteration 6)" in p.stdout, \
        p.stdout + p.stderr
    assert re.search(r"^ckpt-00000006\.pt .* complete, every CRC checked$",
                     run("checkpoint.py", "verify", f"file://{disk}").stdout, re.M)
    assert not (disk / orphan).exists() and not list(disk.glob("data/*.intent"))


def test_a_commit_whose_object_names_leave_the_folder_is_damaged_and_never_downloaded(
        shakespeare_char, tmp_path):
    """A commit object naming `ckpt-....//ABSOLUTE/PATH` (or a `.` part) is judged damaged: a new
    machine's start skips it, takes the complete one before it, and the file at that path is never
    touched. Before, the judge took the name; an object store that keeps `//` in keys (S3) lists the
    object, and the download joined the name onto its temp folder, got the absolute path and wrote
    over that file (here, a file:// remote_dir, whose listing folds `//`, shows the judge's
    word)."""
    disk, victim = tmp_path / "remote", tmp_path / "precious.txt"
    run("train.py", *ARGS, f"--out_dir={tmp_path / 'out'}", f"--remote_dir=file://{disk}",
        "--max_iters=6")
    victim.write_text("precious")
    newest = sorted(disk.glob("ckpt-0*.pt.commit"))[-1]  # the one a new machine downloads first
    c = json.loads(newest.read_text())
    planted = disk / c["data"] / "ckpt-00000099" / str(victim).lstrip("/")
    planted.parent.mkdir(parents=True)
    planted.write_text("ATTACKER")
    for rel in (f"ckpt-00000099/{victim}", "ckpt-00000099/./x"):  # a double slash; a `.` part
        doctored = dict(c, objects={rel: [len("ATTACKER"), 0], **c["objects"]})  # downloaded first
        with pytest.raises(ValueError, match="bad objects"):
            judge_commit(json.loads(json.dumps(doctored)), c["name"])
    newest.write_text(json.dumps(
        dict(c, objects={f"ckpt-00000099/{victim}": [len("ATTACKER"), 0], **c["objects"]})))
    p = run("train.py", *ARGS, f"--out_dir={tmp_path / 'new'}", f"--remote_dir=file://{disk}",
            "--max_iters=8")
    assert victim.read_text() == "precious"
    assert f"{c['name']} is not complete" in p.stderr, p.stderr
    assert "downloaded ckpt.pt (iteration 6" in p.stdout, p.stdout  # the complete one before it


def test_a_commit_without_a_run_id_is_never_written_over(shakespeare_char, tmp_path):
    """A ckpt.pt commit in a run's remote_dir that names no run id (this code never writes one) is
    not the run's to replace: the resumed run says so once, copies its other checkpoints, and that
    commit and its data stay as they are, with no upload left behind. Before: it was replaced and
    its data deleted."""
    disk, out = tmp_path / "remote", tmp_path / "out"
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=4")
    best = disk / "ckpt.pt.commit"
    c = json.loads(best.read_text())
    c["run_id"] = None
    best.write_text(json.dumps(c))
    theirs = files_under(disk / c["data"])
    p = run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=8")
    assert json.loads(best.read_text()) == c and files_under(disk / c["data"]) == theirs
    assert p.stderr.count("ckpt.pt belongs to run None, not this run") == 1, p.stderr
    listing = run("checkpoint.py", f"file://{disk}").stdout
    assert "ckpt-00000008.pt" in listing and "no commit object" not in listing, listing


def test_only_the_runs_own_intents_are_deleted_with_its_data(shakespeare_char, tmp_path):
    """Retention deletes a data prefix and its intents by their exact names: an object beside them
    whose name merely matches the pattern (`<prefix>.notes.intent`) stays. Before: a glob took
    it."""
    disk, out = tmp_path / "remote", tmp_path / "out"
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=4")
    notes = [disk / f"{p}.notes.intent"
             for p in sorted(q.relative_to(disk) for q in (disk / "data").iterdir() if q.is_dir())]
    for n in notes:
        n.write_text("someone's notes")
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=12")
    gone = {p.name for p in (disk / "data").iterdir() if p.is_dir()}
    assert not {n.name[:-len(".notes.intent")] for n in notes} <= gone  # retention did delete some
    assert all(n.read_text() == "someone's notes" for n in notes)


def test_a_lease_file_that_is_not_ours_is_refused_not_written_over(shakespeare_char, tmp_path):
    """A lease.json that is not a lease of this format (someone's file, a hand edit) is never
    written over: the start stops with one line and leaves it as it is. Before: it was replaced."""
    disk, out = tmp_path / "remote", tmp_path / "out"
    run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=4")
    (disk / "lease.json").write_text('{"owner": "someone else", "bound": 1e999}')
    p = run("train.py", *ARGS, f"--out_dir={out}", f"--remote_dir=file://{disk}", "--max_iters=6",
            check=False)
    assert "lease.json that is not a lease" in one_error(p)
    assert (disk / "lease.json").read_text() == '{"owner": "someone else", "bound": 1e999}'
