"""metrics.jsonl and plot.py: a run's record survives kill -9 and reads as one run after the
resume, a torn last line is dropped, plots come out for one and for several runs."""
import importlib.util
import json
import os
import signal

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import TINY, run, start, wait_for
from metrics import METRICS, read_rows, wandb_offline_steps

ARGS = [*TINY, "--max_iters=40", "--eval_interval=10", "--checkpoint_interval=10", "--dropout=0.1"]


def kept(out):
    """The rows not superseded, without the fields that differ between two runs of the same work."""
    rows = [r for r in read_rows(os.path.join(out, METRICS)) if not r.get("superseded")]
    return [{k: v for k, v in r.items() if k not in ("time", "ms", "tok_s", "mfu", "path")}
            for r in rows if r["kind"] in ("train", "eval")], rows


@pytest.fixture(scope="module")
def straight(shakespeare_char, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    run("train.py", *ARGS, f"--out_dir={out}")
    return out


def test_a_killed_and_resumed_run_reads_as_the_straight_one(straight, tmp_path):
    out = str(tmp_path / "run")
    p = start(*ARGS, f"--out_dir={out}", "--max_iters=100000")
    wait_for(p, r"^saved \S+ckpt-00000020\.pt")
    wait_for(p, r"^iter 24:")  # work past the checkpoint, which the resume redoes
    p.send_signal(signal.SIGKILL)
    p.wait()
    run("train.py", *ARGS, f"--out_dir={out}")
    ours, rows = kept(out)
    theirs, _ = kept(straight)
    # same iterations, none twice, none missing, the same losses, lr and tokens
    assert ours == theirs
    train = [r["iter"] for r in ours if r["kind"] == "train"]
    assert train == list(range(40))
    stale = [r for r in read_rows(os.path.join(out, METRICS)) if r.get("superseded")]
    # the redone work, marked
    assert {r["iter"] for r in stale if r["kind"] == "train"} >= set(range(20, 25))
    assert all(r["iter"] >= 20 for r in stale)
    resumes = [r for r in rows if r["kind"] == "event" and r["event"] == "resume"]
    assert (len(resumes) == 1 and resumes[0]["iter"] == 20
            and resumes[0]["path"].endswith("ckpt-00000020.pt"))
    ckpts = [r["iter"] for r in rows if r["kind"] == "event" and r["event"] == "checkpoint"]
    assert sorted(set(ckpts)) == [10, 20, 30, 40]


def test_a_torn_last_line_is_dropped(straight, tmp_path):
    out = tmp_path / "run"
    run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=20")
    with open(out / METRICS, "a") as f:
        f.write('{"kind": "train", "iter": 20, "lo')  # the process died mid-write
    assert read_rows(str(out / METRICS))[-1]["kind"] == "event"  # a reader skips it
    run("train.py", *ARGS, f"--out_dir={out}")  # the resume rewrites the file without it
    text = (out / METRICS).read_text()
    assert '"lo\n' not in text and '"lo{' not in text
    assert all(json.loads(line) for line in text.splitlines())
    assert kept(str(out))[0] == kept(straight)[0]


def png(path):
    img = imread(path)
    assert img.shape[:2] == (850, 900)  # loss, val bits per byte, learning rate
    assert np.asarray(img).std() > 0.05  # curves and text, not a blank canvas
    return img


def test_plot_one_and_two_runs(straight, tmp_path):
    p = run("plot.py", straight)
    assert p.stdout.strip() == f"wrote {os.path.join(straight, 'loss.png')}"
    png(os.path.join(straight, "loss.png"))
    run("plot.py", straight, straight, "--x=tokens", f"--to={tmp_path / 'both.png'}")
    png(tmp_path / "both.png")
    # the file itself names its run too
    p = run("plot.py", os.path.join(straight, METRICS), "--x=tokens")
    png(os.path.join(straight, "loss-tokens.png"))


def test_plot_without_metrics_is_one_line(tmp_path):
    p = run("plot.py", str(tmp_path), check=False)
    assert (p.returncode == 2 and p.stderr.strip().startswith("error:")
            and "no metrics.jsonl" in p.stderr)
    assert "\n" not in p.stderr.strip() and not os.listdir(tmp_path)
    # a row without its fields: not drawn
    (tmp_path / METRICS).write_text('{"kind": "eval", "iter": 5}\n')
    p = run("plot.py", str(tmp_path), check=False)
    assert p.returncode == 1 and p.stderr.strip().endswith("has no train or eval rows yet")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (make test installs it)")
def test_wandb_offline_run_killed_and_resumed_is_one_run_with_each_step_once(shakespeare_char,
                                                                             tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = start(*ARGS, f"--out_dir={out}", "--max_iters=100000", "--wandb_log=True", env=env)
    wait_for(p, r"^saved \S+ckpt-00000020\.pt")
    wait_for(p, r"^iter 24:")  # steps past the checkpoint, sent to wandb, which the resume redoes
    p.send_signal(signal.SIGKILL)
    p.wait()
    run("train.py", *ARGS, f"--out_dir={out}", "--wandb_log=True", env=env)
    # wandb's files: in out_dir
    runs = sorted(d for d in os.listdir(out / "wandb") if d.startswith("offline-run-"))
    # one wandb run id, continued
    assert len(runs) == 2 and len({d.rsplit("-", 1)[1] for d in runs}) == 1
    # every step once, in order: the steps the killed process had not written out (wandb writes
    # whole 32 KiB blocks) are sent again from metrics.jsonl, the redone ones are not sent twice
    assert wandb_offline_steps(str(out), runs[0].rsplit("-", 1)[1]) == list(range(41))
