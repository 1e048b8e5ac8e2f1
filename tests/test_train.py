"""End to end, as a user runs it: train -> ckpt.pt -> resume -> sample, and the scripts' clear
errors."""
import os
import re

import torch

from keep.files import PERIODIC
from keep import store
from conftest import TINY, run


def test_train_resume_sample(shakespeare_char, tmp_path):
    out = str(tmp_path / "out")
    p = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=20", "--eval_interval=10",
            "--checkpoint_interval=0")
    assert "step 20: train loss" in p.stdout and "ckpt.pt (val loss" in p.stdout
    losses = [float(x) for x in re.findall(r"^iter \d+: loss ([\d.]+)", p.stdout, re.M)]
    assert len(losses) == 20 and losses[-1] < losses[0]  # it learns

    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # plain data only
    assert set(ckpt) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ckpt["iter_num"] == 20 and isinstance(ckpt["best_val_loss"], float)
    assert ckpt["model_args"] == dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False,
                                      vocab_size=65, dropout=0.0)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["config"]["dataset"] == "shakespeare_char" and ckpt["config"]["max_iters"] == 20

    # resume needs no architecture flags: they come from the checkpoint
    p = run("train.py", f"--out_dir={out}", "--init_from=resume", "--dataset=shakespeare_char",
            "--device=cpu", "--compile=False", "--max_iters=25", "--eval_iters=2",
            "--eval_interval=10", "--log_interval=1")
    assert "at iteration 20" in p.stdout and "iter 20:" in p.stdout and "iter 19:" not in p.stdout
    assert store.load(os.path.join(out, PERIODIC.format(25)))["iter_num"] == 25

    p = run("sample.py", f"--out_dir={out}", "--num_samples=2", "--max_new_tokens=30",
            "--device=cpu", "--start=ROMEO:")
    samples = [s for s in p.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith("ROMEO:") for s in samples)


def test_compiled_model_saves_plain_names(shakespeare_char, tmp_path):
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
        "--compile=True", timeout=600)
    ckpt = store.load(os.path.join(out, "ckpt.pt"))
    assert not any("_orig_mod" in k
                   for k in torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"])
    assert "transformer.wte.weight" in ckpt["model"]


def test_float16_on_cpu_runs(shakespeare_char, tmp_path):
    p = run("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=3", "--dtype=float16",
            "--eval_interval=100")
    assert "warning: float16 on this CPU" in p.stdout
    assert "nan" not in p.stdout.lower()
    assert "scaler" in store.load(os.path.join(tmp_path, PERIODIC.format(3)))


def one_error_line(proc, *words):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for w in words:
        assert w in err, err


def test_clear_errors(shakespeare_char, tmp_path):
    one_error_line(run("train.py", "--dataset=nosuchdata", "--device=cpu", check=False),
                   "nosuchdata", "does not exist")
    one_error_line(run("train.py", *TINY, "--init_from=resume", f"--out_dir={tmp_path / 'empty'}",
                       check=False), "no checkpoint", "empty")
    one_error_line(run("sample.py", f"--out_dir={tmp_path / 'empty'}", check=False),
                   "no checkpoint", "empty")
    one_error_line(run("train.py", *TINY, "--init_from=scrach", check=False), "scrach")


def test_bench_runs_on_cpu(shakespeare_char):
    args = ["--device=cpu", "--compile=False", "--batch_size=2", "--block_size=16", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--warmup_steps=1", "--timed_steps=2"]
    p = run("bench.py", *args, "--real_data=False")
    assert re.search(r"median [\d.]+ ms/iter .* tokens/s, MFU [\d.]+%", p.stdout)
    p = run("bench.py", *args, "--dataset=shakespeare_char")
    assert "ms/iter" in p.stdout


def test_console_lines_are_kept_in_out_dir(shakespeare_char, tmp_path):
    """A run's console lines, warnings and notes included, are appended to out_dir/console.log
    (the lines said before out_dir was made too), so a re-run with `>` loses nothing; --eval_only
    adds nothing to the folder; a console.log that cannot be written never stops a run."""
    out = tmp_path / "out"
    log = out / "console.log"
    first = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    said = (first.stdout + first.stderr).splitlines()
    assert (sorted(log.read_text().splitlines()) == sorted(said)
            and "step 4: train loss" in log.read_text())
    (out / PERIODIC.format(99)).write_bytes(b"junk")  # a warning, said before the folder is held
    second = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=6", "--learning_rate=2e-3",
                 "--eval_interval=2")
    both = log.read_text().splitlines()
    assert sorted(both[:len(said)]) == sorted(said)  # appended, never truncated
    again = (second.stdout + second.stderr).splitlines()
    assert sorted(both[len(said):]) == sorted(again) and len(both) == len(said) + len(again)
    assert (any(ln.startswith("warning: skipping") for ln in again)
            and any("learning_rate" in ln for ln in again))
    before = log.read_bytes()
    run("train.py", *TINY, f"--out_dir={out}", "--eval_only")
    assert log.read_bytes() == before
    other = tmp_path / "other"
    (other / "console.log").mkdir(parents=True)  # cannot be opened as a file
    p = run("train.py", *TINY, f"--out_dir={other}", "--max_iters=2")
    assert ("done at iteration 2" in p.stdout
            and p.stderr.count("console.log cannot be written") == 1), p.stderr
