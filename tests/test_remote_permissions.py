"""The documented minimal S3 permissions (docs/remote.md, "Minimal S3 permissions") against a server
that enforces them per action: SeaweedFS with an identity allowed Read, Write and List on one run's
remote_dir only, s3://runner/runs/gpt2 (s3server.RUNNER), as the documented policy is for its
example. Every kind of call the remote copy makes is allowed there and refused on another prefix or
bucket; a whole run with those credentials copies its checkpoints without a warning; credentials
lacking any one of them are one error line before training, because the start-up probe tries every
kind of call the run will make."""
import json
import re

import pytest

from keep import remote as remote_module
from conftest import TINY, run
from s3calls import clear, run_all
from s3server import LACKING, RUNNER, RUNNER_BUCKET, RUNNER_DIR, S3Server

NO_PREFIX = "ListMultipartUploads whole bucket (no Prefix)"
# each S3 operation, by the AWS IAM action that allows it (the documented policy names these)
AWS_ACTION = {"PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
              "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
              "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
              "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
              "DeleteObject": "s3:DeleteObject", "DeleteObjects": "s3:DeleteObject",
              "ListMultipartUploads": "s3:ListBucketMultipartUploads",
              "AbortMultipartUpload": "s3:AbortMultipartUpload"}


REMOTE = f"s3://{RUNNER_BUCKET}/{RUNNER_DIR}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    for bucket in (RUNNER_BUCKET, "another-bucket"):
        server.bucket(bucket)
    yield server
    server.kill()


@pytest.fixture
def empty(s3):
    """RUNNER's remote_dir empty: each test starts as a new run."""
    clear(s3.fs(), RUNNER_BUCKET, RUNNER_DIR)
    yield
    clear(s3.fs(), RUNNER_BUCKET, RUNNER_DIR)


def test_every_call_of_the_remote_copy_is_allowed_on_its_prefix_and_refused_elsewhere(s3, empty,
                                                                                      tmp_path):
    """Each call as remote.py makes it through s3fs (tests/s3calls.py), with RUNNER's credentials:
    all allowed under runner/runs/gpt2/, except a multipart-upload listing without a Prefix (the
    whole bucket's: what s3fs's own _list_multipart_uploads sends); all refused under another prefix
    of the bucket and in another bucket, where the objects exist (made by an identity allowed
    everything)."""
    mine = run_all(s3.fs(*RUNNER), RUNNER_BUCKET, RUNNER_DIR, str(tmp_path), s3.fs())
    assert mine.pop(NO_PREFIX, "allowed") is not None, ("the server does not enforce the prefix on "
                                                        "that listing")
    assert all(why is None for why in mine.values()), \
        {call: why for call, why in mine.items() if why}
    for bucket, prefix in ((RUNNER_BUCKET, "runs/other"), (RUNNER_BUCKET, RUNNER_DIR + "-other"),
                           ("another-bucket", RUNNER_DIR)):
        theirs = run_all(s3.fs(*RUNNER), bucket, prefix, str(tmp_path), s3.fs())
        allowed = [call for call, why in theirs.items() if why is None]
        assert not allowed, (bucket, prefix, allowed)
        assert all(why.startswith("PermissionError") for why in theirs.values()), theirs


def _uploads(s3, prefix):
    from fsspec.asyn import sync
    fs = s3.fs()
    out = sync(fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=RUNNER_BUCKET, Prefix=prefix)
    return out.get("Uploads", [])


def test_a_run_with_the_minimal_permissions_copies_every_checkpoint_without_a_warning(
        s3, empty, shakespeare_char, tmp_path):
    """train.py with RUNNER's credentials: checkpoints over the multipart threshold (16 MB) go up
    whole, retention deletes in the bucket, a killed run's upload in progress under the run's data/
    is aborted, and the run ends with the bucket holding its newest checkpoint: no warning on the
    way. checkpoint.py lists it complete with the same credentials."""
    from fsspec.asyn import sync
    name, remote, env = RUNNER_DIR, REMOTE, s3.env(*RUNNER)
    admin = s3.fs()
    # a ~40 MB checkpoint
    big = [*TINY, "--n_layer=4", "--n_embd=256", "--n_head=4", "--eval_interval=1000"]
    command = [*big, f"--out_dir={tmp_path / 'out'}", f"--remote_dir={remote}",
               "--checkpoint_interval=2", "--keep_last=1", "--remote_wait=30"]
    run("train.py", *command, "--max_iters=2", env=env)
    run_id = json.loads(admin.cat_file(f"{RUNNER_BUCKET}/{name}/ckpt-00000002.pt.commit"))["run_id"]

    def upload_in_progress(prefix):
        return sync(admin.loop, admin._call_s3, "create_multipart_upload", Bucket=RUNNER_BUCKET,
                    Key=f"{name}/{prefix}/ckpt-00000001.pt")["UploadId"]
    # a killed start's upload: its intent names it (remote.py), so the run's next start aborts it;
    # one with no intent is not provably the run's, and stays
    left, foreign = (upload_in_progress("data/00000001-0badf00d"),
                     upload_in_progress("data/00000001-12345678"))
    admin.pipe_file(f"{RUNNER_BUCKET}/{name}/data/00000001-0badf00d.0.intent", json.dumps(dict(
        format=1, prefix="data/00000001-0badf00d", run_id=run_id, attempt="0ld0ld00",
        rank=0)).encode())
    p = run("train.py", *command, "--max_iters=6", env=env, check=False)
    output = p.stdout + p.stderr
    assert p.returncode == 0, output
    warnings = [line for line in output.splitlines()
                if "warning" in line.lower() or line.startswith("error")]
    assert not warnings, output
    assert f"remote_dir {remote} holds the newest checkpoint (ckpt-00000006.pt, iteration 6)" \
        in p.stdout, output
    uploads = [u["UploadId"] for u in _uploads(s3, f"{name}/")]
    # the run's leftover aborted, the other one left alone
    assert left not in uploads and foreign in uploads
    listing = run("checkpoint.py", remote, env=env).stdout
    assert re.search(r"^ckpt-00000006\.pt .* complete$", listing, re.M), listing
    # keep_last=1, in the bucket too
    assert not re.search(r"^ckpt-0000000[24]\.pt", listing, re.M), listing
    assert "no commit object" not in listing and "0badf00d" not in listing, listing
    sizes = [size for c in listing.splitlines() if (size := re.search(r"(\d+\.\d) MB", c))]
    assert sizes and float(sizes[0].group(1)) > 16, listing  # went up in parts


@pytest.mark.parametrize("case",
                         [*(f"no {a}" for a in LACKING), "another prefix", "another bucket"])
def test_credentials_short_of_the_minimum_are_one_line_before_training(s3, empty, shakespeare_char,
                                                                       tmp_path, case):
    """Read, Write or List missing, or the right permissions on another prefix or bucket: the probe
    at start finds it, one error line, before any training."""
    remote, env = REMOTE, s3.env(*RUNNER)
    if case.startswith("no "):
        env = s3.env(*LACKING[case[3:]])
    elif case == "another prefix":
        remote = f"s3://{RUNNER_BUCKET}/runs/other"
    else:
        remote = f"s3://another-bucket/{RUNNER_DIR}"
    out = tmp_path / "out"
    p = run("train.py", *TINY, f"--out_dir={out}", f"--remote_dir={remote}", "--max_iters=4",
            env=env, check=False)
    lines = p.stderr.strip().splitlines()
    assert (p.returncode == 1 and len(lines) == 1
            and lines[0].startswith("error: ")), p.stdout + p.stderr
    assert "access refused" in lines[0] and remote in lines[0], lines[0]
    assert "iter " not in p.stdout and not out.exists()


def test_the_probe_tries_every_kind_of_call_the_run_makes(s3, empty, monkeypatch):
    """The S3 operations remote.probe() sends, by the IAM action each needs: every action of the
    documented policy, so that credentials short of any one fail at start, not hours in at the first
    multipart upload, retention or clean-up."""
    import s3fs
    from fsspec.asyn import sync
    for k, v in s3.env(*RUNNER).items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    r = remote_module.Remote(REMOTE)
    sync(r.fs.loop, r.fs.set_session)
    seen = []
    r.fs.s3.meta.events.register("before-call.s3", lambda model, **kw: seen.append(model.name))
    r.probe()
    s3fs.S3FileSystem.clear_instance_cache()
    assert set(AWS_ACTION) >= set(seen), seen  # nothing outside the documented policy
    missing = sorted(set(AWS_ACTION.values()) - {AWS_ACTION[op] for op in seen})
    assert not missing, f"the probe never tries {missing} (it sent {sorted(set(seen))})"
