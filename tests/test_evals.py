"""eval.py's task scores against lm-evaluation-harness itself, on the HF export of a small GPT-2
BPE model trained here; and what eval.py refuses."""
import glob
import gzip
import json
import math
import os
import re
import signal
import time
import subprocess
import sys

import pytest

from evals.tasks import write_lm_eval_tasks
from conftest import ENV, ROOT, TINY, files_under, run, start, wait_for

TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy")
@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A small GPT-2 BPE model, trained on Shakespeare until its choices differ clearly."""
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare", "val.bin")):
        run("data/shakespeare/prepare.py")
    out = tmp_path_factory.mktemp("bpe")
    args = [a for a in TINY if not a.startswith(("--dataset", "--block_size", "--learning_rate"))]
    run("train.py", *args, "--dataset=shakespeare", "--block_size=64", "--learning_rate=1e-2",
        f"--out_dir={out}", "--max_iters=40", "--eval_interval=40")
    return str(out)


def test_scores_equal_lm_eval(bpe_run, tmp_path):
    """The same 20 examples of each task: every log-likelihood within float noise of lm-eval's,
    and every acc and acc_norm decision the same (the model's context of 64 tokens cuts some)."""
    hf = tmp_path / "hf"
    run("export.py", f"--out_dir={bpe_run}", f"--to={hf}")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_tasks(str(tasks))
    env = dict(ENV, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={hf},dtype=float32", "--tasks",
                    ",".join(f"{t}_local" for t in TASKS), "--include_path", str(tasks),
                    "--limit", "20", "--device", "cpu", "--batch_size", "8", "--output_path",
                    str(tmp_path / "lm"), "--log_samples"],
                   env=env, check=True, timeout=600, capture_output=True)
    ours = tmp_path / "ours.jsonl"
    p = run("eval.py", f"--out_dir={bpe_run}", f"--tasks={','.join(TASKS)}", "--limit=20",
            f"--samples={ours}", f"--json={tmp_path / 'ours.json'}", "--device=cpu")
    mine = {(r["task"], r["index"]): r for r in map(json.loads, open(ours))}
    compared = 0
    for task in TASKS:
        [path] = glob.glob(str(tmp_path / "lm" / "*" / f"samples_{task}_local_*.jsonl"))
        for s in map(json.loads, open(path)):
            o = mine[(task, s["doc_id"])]
            theirs = [float(r[0]) for r in s["filtered_resps"]]
            assert o["loglikelihoods"] == pytest.approx(theirs, rel=1e-5, abs=1e-3)
            assert float(o["pred"] == o["label"]) == s["acc"], (task, s["doc_id"])
            if "acc_norm" in s:
                assert float(o["pred_norm"] == o["label"]) == s["acc_norm"], (task, s["doc_id"])
            compared += 1
    assert compared == 80
    scores = json.load(open(tmp_path / "ours.json"))
    [results] = glob.glob(str(tmp_path / "lm" / "*" / "results_*.json"))
    theirs = json.load(open(results))["results"]
    for task in TASKS:
        assert scores[task]["acc"] == pytest.approx(theirs[f"{task}_local"]["acc,none"])
        assert scores[task]["n"] == 20
    assert "hellaswag" in p.stdout and "acc_norm" in p.stdout


def test_eval_only_reads(bpe_run):
    """Scoring a run's folder changes nothing in it (a live run may be scored as it trains)."""
    before = files_under(bpe_run, mtimes=True)
    p = run("eval.py", f"--out_dir={bpe_run}", "--tasks=winogrande,arc_easy", "--limit=3",
            "--device=cpu")
    assert "winogrande" in p.stdout and "arc_easy" in p.stdout
    assert files_under(bpe_run, mtimes=True) == before


@pytest.mark.parametrize("args, code, words", [
    (["--tasks=hellaswag,mmlu"], 2, ["unknown task 'mmlu'", "hellaswag, piqa"]),
    (["--tasks=,"], 2, ["no task named"]),
    (["--limit=0"], 2, ["limit=0", "scores no example"]),
    (["--limit=-2"], 2, ["limit=-2"]),
    (["--eval_data=EMPTY"], 1, ["data of task piqa is missing", "piqa_validation.jsonl.gz"]),
    (["--eval_data=BAD"], 1, ["not the piqa validation set"]),
])
def test_bad_input_is_one_line(bpe_run, tmp_path, args, code, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    with gzip.open(tmp_path / "bad" / "piqa_validation.jsonl.gz", "wt") as f:
        f.write('{"goal": "x", "sol1": "a", "sol2": "b", "label": 0}\n')
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("BAD", str(tmp_path / "bad"))
            for a in args]
    p = run("eval.py", f"--out_dir={bpe_run}", "--tasks=piqa", *args, "--device=cpu", check=False)
    assert p.returncode == code, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_char_model_names_what_it_cannot_encode(trained):
    """A char-level model (Shakespeare's 65 characters) on ARC: the characters it lacks."""
    p = run("eval.py", f"--out_dir={trained}", "--tasks=arc_easy", "--device=cpu", check=False)
    assert p.returncode == 1
    error = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "cannot encode task arc_easy" in error[0], p.stderr
    assert "lacks '" in error[0] and "0" in error[0].split("lacks")[1]  # digits: not Shakespeare's


def eval_line(stdout):
    """(val loss, val bpb) of the last eval line a run printed."""
    m = re.findall(r"val loss ([\d.]+) \(([\d.]+) bpb\)", stdout)
    assert m, stdout
    return tuple(map(float, m[-1]))


def test_every_run_is_scored_on_the_same_text(trained, tmp_path):
    """One checkpoint evaluated with other seeds and batch sizes: the same val loss (the same
    windows), where random windows drawn from the seed and batch would differ."""
    seen = set()
    for seed, batch in ((1337, 4), (7, 4), (1337, 3), (99, 5)):
        p = run("train.py", *TINY, f"--out_dir={trained}", "--init_from=resume", "--eval_only=True",
                "--eval_iters=0", "--eval_tokens=480", f"--seed={seed}", f"--batch_size={batch}")
        seen.add(round(eval_line(p.stdout)[0], 5))
    assert len(seen) == 1, seen


def test_bits_per_byte_of_a_char_run(trained):
    """Shakespeare's characters are one byte each: bits per byte is the loss in bits."""
    p = run("train.py", *TINY, f"--out_dir={trained}", "--init_from=resume", "--eval_only=True",
            "--eval_iters=0", "--eval_tokens=0")
    loss, bpb = eval_line(p.stdout)
    assert bpb == pytest.approx(loss / math.log(2), abs=2e-4)


def test_tasks_during_training_are_kept_and_not_repeated(bpe_run, tmp_path):
    """eval_tasks at every eval: metrics.jsonl, the checkpoint's metadata (checkpoint.py shows it);
    a resumed run neither repeats the eval its checkpoint holds nor loses the next one."""
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("--dataset", "--block_size"))]
    args += ["--dataset=shakespeare", "--block_size=64", f"--out_dir={out}", "--eval_interval=5",
             "--eval_tasks=winogrande,arc_easy", "--eval_tasks_limit=6", "--checkpoint_interval=5"]
    run("train.py", *args, "--max_iters=10")
    run("train.py", *args, "--max_iters=15")
    rows = [r for r in map(json.loads, open(out / "metrics.jsonl"))
            if r["kind"] == "eval" and not r.get("superseded")]
    assert [r["iter"] for r in rows] == [0, 5, 10, 15]
    for r in rows:
        assert {"val_bpb", "winogrande_acc", "arc_easy_acc", "arc_easy_acc_norm"} <= set(r), r
        assert "winogrande_acc_norm" not in r  # lm-eval reports acc alone for it
    p = run("checkpoint.py", str(out / "ckpt-00000015.pt"))
    assert re.search(r"^scores: .*winogrande_acc [\d.]+.*\(eval at iteration 15\)$", p.stdout, re.M)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_ranks_share_the_examples(bpe_run, parallelism):
    """Two ranks score half the examples each: the same scores as one process."""
    args = [a for a in TINY if not a.startswith(("--dataset", "--block_size"))]
    args += ["--dataset=shakespeare", "--block_size=64", f"--out_dir={bpe_run}", "--eval_only=True",
             "--init_from=resume", "--eval_tasks=arc_easy,winogrande", "--eval_tasks_limit=7",
             "--eval_iters=0", "--eval_tokens=1024"]
    one = run("train.py", *args).stdout
    two = start(*args, f"--parallelism={parallelism}", "--gradient_accumulation_steps=2",
                torchrun=["--nproc_per_node=2"])
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out
    line = re.compile(r"^step \d+: .*$", re.M)
    assert line.findall(one) and line.findall(out)[-1] == line.findall(one)[-1], (one, out)


def test_checkpoint_without_a_tokenizer(trained, tmp_path):
    """A char-level file with no tokenizer inside and no meta.pkl to find it by: one line."""
    import torch
    ckpt = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    del ckpt["tokenizer"]
    ckpt["config"]["dataset"] = "gone"
    torch.save(ckpt, tmp_path / "old.pt")
    p = run("eval.py", f"--ckpt={tmp_path / 'old.pt'}", "--tasks=piqa", "--device=cpu", check=False)
    assert p.returncode == 1
    error = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "carries no tokenizer" in error[0], p.stderr
    assert "meta.pkl" in error[0]


def test_a_stop_abandons_the_task_eval(bpe_run, tmp_path):
    """SIGTERM while all of HellaSwag is being scored: the run stops at once (the eval abandoned,
    exit 0), not after the thousands of examples left; the resumed run scores that eval."""
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("--dataset", "--block_size"))]
    args += ["--dataset=shakespeare", "--block_size=64", f"--out_dir={out}", "--eval_interval=2",
             "--checkpoint_interval=2"]
    run("train.py", *args, "--max_iters=2")
    proc = start(*args, "--max_iters=4", "--eval_tasks=hellaswag", "--eval_tasks_limit=-1")
    wait_for(proc, r"^iter 3:")  # now iteration 4's eval scores 10,042 examples
    time.sleep(2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.time() - t0 < 30, rest
    assert "SIGTERM received at iteration 4" in rest and "step 4:" not in rest, rest
    run("train.py", *args, "--max_iters=6", "--eval_tasks=hellaswag", "--eval_tasks_limit=5")
    rows = [r for r in map(json.loads, open(out / "metrics.jsonl"))
            if r["kind"] == "eval" and not r.get("superseded")]
    assert [r["iter"] for r in rows] == [0, 2, 4, 6] and "hellaswag_acc" in rows[2], rows


def test_a_checkpoint_from_before_fixed_eval_text_says_so(trained, tmp_path):
    """A checkpoint whose config has no eval_tokens (written when evals drew random windows): its
    resume says in one line that the losses before and after are on different text."""
    import torch
    out = tmp_path / "old"
    out.mkdir()
    ckpt = torch.load(os.path.join(trained, "ckpt-00000010.pt"), weights_only=True)
    del ckpt["config"]["eval_tokens"]
    torch.save(ckpt, out / "ckpt-00000010.pt")
    p = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=12", "--eval_interval=2")
    said = [line for line in p.stdout.splitlines() if "random windows" in line]
    assert len(said) == 1 and said[0].startswith("note: ") and "iteration 10" in said[0], p.stdout
    p = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=14", "--eval_interval=2")
    assert "random windows" not in p.stdout  # its own checkpoints have it now
