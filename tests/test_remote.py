"""The remote copy (remote.py) against a real S3 server (SeaweedFS on loopback, tests/s3server.py)
and a second folder (file://): the same command on a machine whose out_dir is gone continues from
the bucket exactly; a killed upload, a damaged object or a server that goes away never costs the
run; a wrong bucket, credentials or endpoint is one line before training."""
import json
import os
import re
import shutil
import signal
import time

import pytest

from keep import store
from conftest import TINY, run, start, wait_for
from metrics import read_rows
from s3server import READER, S3Server
from test_fsdp import assert_bitwise as assert_bitwise_folders, assert_close
from test_resume import assert_same_state

ARGS = [*TINY, "--dropout=0.1", "--eval_interval=5", "--checkpoint_interval=4", "--keep_last=50"]
N = 12


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def reference(shakespeare_char, tmp_path_factory):
    """The uninterrupted run, no remote_dir."""
    out = tmp_path_factory.mktemp("reference")
    run("train.py", *ARGS, f"--out_dir={out}", f"--max_iters={N}")
    return out


def curve(out):
    """{iteration: loss} of metrics.jsonl's train rows that no resume superseded."""
    return {r["iter"]: r["loss"] for r in read_rows(os.path.join(out, "metrics.jsonl"))
            if r["kind"] == "train" and not r.get("superseded")}


@pytest.mark.parametrize("backend", ["s3", "file"])
def test_new_machine_continues_from_the_remote_copy_bitwise(s3, reference, tmp_path, backend):
    """A run with remote_dir, its out_dir lost (a new machine), the same command continues from the
    remote copy: the end state equals the uninterrupted run's bitwise, and metrics.jsonl is one
    curve."""
    if backend == "s3":
        remote, env = f"s3://{s3.bucket('runs')}/{tmp_path.name}", s3.env()
    else:
        remote, env = f"file://{tmp_path}/other-disk/run", {}
    out = tmp_path / "out"
    command = [*ARGS, f"--out_dir={out}", f"--remote_dir={remote}"]
    first = run("train.py", *command, "--max_iters=6", env=env).stdout
    assert (f"remote_dir {remote} holds the newest checkpoint (ckpt-00000006.pt, iteration 6)"
            in first)
    shutil.rmtree(out)
    second = run("train.py", *command, f"--max_iters={N}", env=env).stdout
    assert ("downloaded ckpt-00000006.pt (iteration 6," in second
            and "out_dir had no checkpoint" in second)
    assert "resuming from" in second and "at iteration 6" in second
    assert_same_state(store.load(str(out / "ckpt-00000012.pt")),
                      store.load(str(reference / "ckpt-00000012.pt")))
    ours, ref = curve(out), curve(reference)
    # the first machine's rows came back with the checkpoint
    assert sorted(ours) == list(range(N)) and ours == ref
    listing = run("checkpoint.py", remote, env=env).stdout
    assert re.search(r"ckpt-00000012\.pt +0 +12 .* complete", listing), listing
    # retention (keep_last=50 here) and nothing left of the uploads that no commit names
    assert "no commit object" not in listing


def test_fsdp_folders_go_to_the_bucket_and_resume_on_two_ranks_and_on_one(s3, shakespeare_char,
                                                                          tmp_path):
    """Checkpoint folders of 2 FSDP gloo ranks reach the bucket; with out_dir lost each time, 2
    ranks continue from it bitwise as an uninterrupted run, then 1 rank continues (world size 2 ->
    1)."""
    fsdp = [*TINY, "--dropout=0.0", "--gradient_accumulation_steps=2", "--eval_interval=5",
            "--checkpoint_interval=4", "--keep_last=50", "--parallelism=fsdp"]
    env = s3.env()
    remote = f"s3://{s3.bucket('runs')}/{tmp_path.name}"

    def torchrun(out, *extra):
        proc = start(*fsdp, f"--out_dir={out}", *extra, torchrun=["--nproc_per_node=2"], env=env)
        stdout = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, stdout
        return stdout

    ref = tmp_path / "ref"
    torchrun(ref, "--max_iters=12")
    out = tmp_path / "out"
    torchrun(out, f"--remote_dir={remote}", "--max_iters=4")
    shutil.rmtree(out)
    p = torchrun(out, f"--remote_dir={remote}", "--max_iters=8")
    assert "downloaded ckpt-00000004 (iteration 4" in p
    assert_bitwise_folders(store.load(str(out / "ckpt-00000008")),
                           store.load(str(ref / "ckpt-00000008")))
    shutil.rmtree(out)
    one = run("train.py", *fsdp, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=12",
              env=env).stdout
    assert ("downloaded ckpt-00000008 (iteration 8" in one
            and "written by 2 rank(s), this run has 1" in one)
    assert_close(store.load(str(out / "ckpt-00000012")), store.load(str(ref / "ckpt-00000012")))


def _uploads_in_progress(s3, bucket, prefix):
    from fsspec.asyn import sync
    fs = s3.fs()
    return [u["Key"] for u in sync(fs.loop, fs._list_multipart_uploads, bucket)
            if u["Key"].startswith(prefix)]


def test_kill_9_during_an_upload_never_resumes_the_partial(s3, shakespeare_char, tmp_path):
    """kill -9 while a checkpoint is being uploaded (a multipart upload is in progress), then the
    local copy lost: the new start resumes from the newest complete checkpoint, never the partial
    one, and the partial upload's leftovers are cleaned up."""
    bucket, env = s3.bucket("runs"), s3.env()
    remote = f"s3://{bucket}/{tmp_path.name}"
    big = [*TINY, "--n_layer=4", "--n_embd=256", "--n_head=4", "--checkpoint_interval=2",
           "--eval_interval=1000"]
    out = tmp_path / "out"
    proc = start(*big, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=1000", env=env)
    wait_for(proc, r"saved .*ckpt-00000002\.pt")
    fs, deadline, partial = s3.fs(), time.time() + 120, []
    while (not fs.exists(f"{bucket}/{tmp_path.name}/ckpt-00000002.pt.commit")
            and time.time() < deadline):
        time.sleep(0.05)  # one complete checkpoint there first
    # then an upload caught in the middle, not between two
    while not partial and time.time() < deadline:
        partial = _uploads_in_progress(s3, bucket, f"{tmp_path.name}/data/")
    proc.kill()
    proc.wait()
    assert partial, "no upload was ever seen in progress"
    in_flight = int(re.search(r"data/(\d{8})-", partial[0]).group(1))
    listing = run("checkpoint.py", remote, env=env).stdout
    complete = [int(m) for m in re.findall(r"^ckpt-(\d{8})\.pt .* complete$", listing, re.M)]
    assert (in_flight not in complete and complete
            and max(complete) < in_flight), (in_flight, listing)
    shutil.rmtree(out)
    p = run("train.py", *big, f"--out_dir={out}", f"--remote_dir={remote}",
            f"--max_iters={max(complete) + 2}", env=env)
    assert f"downloaded ckpt-{max(complete):08d}.pt (iteration {max(complete)}," in p.stdout
    assert f"at iteration {max(complete)}" in p.stdout
    assert not _uploads_in_progress(s3, bucket, f"{tmp_path.name}/data/")  # aborted at the start
    assert "no commit object" not in run("checkpoint.py", remote, env=env).stdout


def test_a_flipped_byte_in_the_bucket_is_skipped_for_the_previous_checkpoint(s3, shakespeare_char,
                                                                             tmp_path):
    bucket, env = s3.bucket("runs"), s3.env()
    remote = f"s3://{bucket}/{tmp_path.name}"
    out = tmp_path / "out"
    command = [*ARGS, "--eval_interval=100", f"--out_dir={out}", f"--remote_dir={remote}"]
    run("train.py", *command, "--max_iters=8", env=env)
    fs = s3.fs()
    commit = json.loads(fs.cat_file(f"{bucket}/{tmp_path.name}/ckpt-00000008.pt.commit"))
    key = f"{bucket}/{tmp_path.name}/{commit['data']}/ckpt-00000008.pt"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))  # the same size: only the CRC tells
    shutil.rmtree(out)
    p = run("train.py", *command, "--max_iters=10", env=env)
    warnings = [line for line in p.stdout.splitlines() + p.stderr.splitlines()
                if "ckpt-00000008.pt" in line]
    assert (len(warnings) == 1 and "damaged" in warnings[0]
            and "trying ckpt.pt" in warnings[0]), p.stdout + p.stderr
    # the next complete one: ckpt.pt, written at the same iteration (the end's eval), whose bytes
    # are whole
    assert ("downloaded ckpt.pt (iteration 8," in p.stdout and "from " in p.stdout
            and "at iteration 8" in p.stdout)


def test_server_lost_mid_run_costs_one_line_and_the_final_checkpoint_arrives(s3, shakespeare_char,
                                                                             tmp_path):
    """The S3 server killed under a running trainer: one warning line, training goes on; the server
    back: the run says so, and its final checkpoint reaches the bucket. Killed again before a stop:
    the stop waits at most remote_wait and says the newest checkpoint is in out_dir only."""
    bucket, env = s3.bucket("runs"), s3.env()
    remote = f"s3://{bucket}/{tmp_path.name}"
    out = tmp_path / "out"
    command = [*TINY, "--eval_interval=100000", "--checkpoint_interval=20", f"--out_dir={out}",
               f"--remote_dir={remote}", "--max_iters=100000"]

    def saved(lines):
        return int(re.findall(r"saved .*ckpt-(\d{8})\.pt", "".join(lines))[-1])

    for server_back in (True, False):
        # the server back: time enough for the last upload on a busy machine; gone: a short wait,
        # cut at 3 s
        proc, seen = start(*command, f"--remote_wait={30 if server_back else 3}", env=env), []
        wait_for(proc, r"saved .*ckpt-\d{8}\.pt", seen)
        s3.kill()
        try:
            wait_for(proc, r"could not copy ckpt-\d{8}\.pt", seen)
            # training went on, saving locally
            wait_for(proc, rf"saved .*ckpt-{saved(seen) + 100:08d}\.pt", seen)
            if server_back:
                s3.start()
                wait_for(proc, r"remote_dir reachable again: ckpt-\d{8}\.pt copied", seen)
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            output = "".join(seen) + proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, output
            assert time.time() - t0 < 30
        finally:
            if proc.poll() is None or not server_back:
                s3.start()
        warned = [line for line in output.splitlines() if "could not copy" in line]
        # one line for the outage, not one per retry
        assert len(warned) == 1 and "training goes on" in warned[0], output
        last = saved([output])  # the stop's checkpoint
        if server_back:
            assert (f"remote_dir {remote} holds the newest checkpoint (ckpt-{last:08d}.pt, "
                    f"iteration {last})" in output)
            assert re.search(rf"^ckpt-{last:08d}\.pt .* complete$",
                             run("checkpoint.py", remote, env=env).stdout, re.M)
        else:
            assert re.search(rf"warning: ckpt-{last:08d}\.pt \(iteration {last}\) did not reach "
                             r"remote_dir .* within remote_wait=3s.*it is in out_dir only",
                             output), output


@pytest.mark.parametrize("case", ["credentials", "bucket", "endpoint", "read-only", "backend"])
def test_wrong_remote_configuration_is_one_line_before_training(s3, shakespeare_char, tmp_path,
                                                                case):
    env = s3.env()
    remote = f"s3://{s3.bucket('runs')}/{tmp_path.name}"
    if case == "credentials":
        env, fix = s3.env(secret="not-the-secret"), "check the credentials"
    elif case == "bucket":
        remote, fix = "s3://no-such-bucket/run", "create it, or fix the name"
    elif case == "endpoint":
        env, fix = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9"), "cannot reach the storage"
    elif case == "read-only":
        env, fix = s3.env(*READER), "may put, get, list and delete"
    else:
        remote, fix = "gs://some-bucket/run", "pip install gcsfs"
    out = tmp_path / "out"
    t0 = time.time()
    p = run("train.py", *TINY, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=5",
            env=env, check=False)
    assert p.returncode == 1 and time.time() - t0 < 60
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fix in lines[0], p.stderr
    assert "iter " not in p.stdout and not out.exists()  # before any training, nothing made


def test_remote_retention_another_run_and_sample_and_export(s3, shakespeare_char, tmp_path):
    """keep_last applies in the bucket too; an out_dir of another run is refused; sample.py and
    export.py read a remote out_dir through a verified cache."""
    env = dict(s3.env(), XDG_CACHE_HOME=str(tmp_path / "cache"))
    remote = f"s3://{s3.bucket('runs')}/{tmp_path.name}"
    run("train.py", *TINY, f"--out_dir={tmp_path / 'out'}", f"--remote_dir={remote}",
        "--max_iters=6", "--eval_interval=3", "--checkpoint_interval=2", "--keep_last=1", env=env)
    listing = run("checkpoint.py", remote, env=env).stdout
    assert re.findall(r"^(ckpt\S*)", listing, re.M) == ["ckpt-00000006.pt", "ckpt.pt"], listing
    other = tmp_path / "other"
    run("train.py", *TINY, f"--out_dir={other}", "--max_iters=2")
    p = run("train.py", *TINY, f"--out_dir={other}", f"--remote_dir={remote}", "--max_iters=4",
            env=env, check=False)
    assert (p.returncode == 1 and "error: " in p.stderr
            and "give this run its own remote_dir" in p.stderr), p.stderr
    assert p.stderr.count("\n") == 1 and "iter " not in p.stdout
    p = run("sample.py", f"--out_dir={remote}", "--device=cpu", "--num_samples=1",
            "--max_new_tokens=20", env=env)
    assert "downloading ckpt.pt (iteration 6)" in p.stderr and len(p.stdout.strip()) > 0
    again = run("sample.py", f"--out_dir={remote}", "--device=cpu", "--num_samples=1",
                "--max_new_tokens=20", env=env)
    assert "downloading" not in again.stderr  # cached, its commit unchanged
    run("export.py", f"--out_dir={remote}", "--which=latest", "--format=safetensors",
        f"--to={tmp_path / 'm.safetensors'}", env=env)
    assert (tmp_path / "m.safetensors").stat().st_size > 0
