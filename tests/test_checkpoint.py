"""checkpoint.py and the files in out_dir: corruption, fallback, unsafe pickles, nanoGPT files,
retention, guards and the inspect CLI. Real training runs write the files."""
import os
import re

import pytest
import torch

import checkpoint
from conftest import TINY, contents, copy_run, listing, run
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def trained(shakespeare_char, tmp_path_factory):
    """A finished tiny run: periodic checkpoints at 4, 8, 12 and ckpt.pt."""
    out = tmp_path_factory.mktemp("trained")
    run("train.py", *TINY, f"--out_dir={out}", "--max_iters=12", "--eval_interval=4", "--checkpoint_interval=4",
        "--keep_last=5")
    return out


def resume(out, *extra, check=True):
    return run("train.py", *TINY, f"--out_dir={out}", "--init_from=resume", "--eval_interval=100", *extra, check=check)


def test_files_and_contents(trained):
    names = sorted(listing(trained))
    assert names == ["ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000012.pt", "ckpt.pt"]
    ckpt = checkpoint.load(os.path.join(trained, "ckpt-00000012.pt"))
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION and ckpt["iter_num"] == 12
    meta = ckpt["metadata"]
    assert meta["world_size"] == 1 and meta["tokens_seen"] == 12 * 4 * 32 and meta["train_seconds"] > 0
    assert meta["torch_version"] == str(torch.__version__) and meta["init_from"] == "scratch"
    assert isinstance(meta["val_loss"], float) and "created" in meta and "git_commit" in meta
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in ckpt["config"].values())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_falls_back(trained, tmp_path, damage):
    out = copy_run(trained, tmp_path / "run")
    newest = checkpoint.candidates(out)[0]
    data = bytearray(open(newest, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # inside tensor bytes: torch.load alone would not notice
    with open(newest, "wb") as f:
        f.write(data)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable|corrupt"):
        checkpoint.load(newest)
    p = resume(out, "--max_iters=14")
    warnings = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: skipping")]
    # truncated: not even its iteration can be read; flipped: it ranks first, its CRC fails on load
    why = "left in place" if damage == "truncate" else "falling back to ckpt.pt"
    assert len(warnings) == 1 and os.path.basename(newest) in warnings[0] and why in warnings[0]
    assert "at iteration 12" in p.stdout and "iter 12:" in p.stdout


def test_all_bad_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for i in (2, 4):
        (out / checkpoint.PERIODIC.format(i)).write_bytes(b"not a checkpoint at all")
    p = resume(out, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: none of the 2 checkpoint(s)")


def test_malicious_pickle_is_refused_and_never_runs(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = os.path.join(out, checkpoint.PERIODIC.format(99))
    torch.save({"model": {}, "model_args": {}, "iter_num": 99, "x": Payload()}, evil)
    os.utime(evil, (os.path.getmtime(evil) + 60,) * 2)  # clearly the newest file
    with pytest.raises(checkpoint.CheckpointError, match="refused.*arbitrary pickle"):
        checkpoint.load(evil)
    p = resume(out, "--max_iters=13")  # the planted file is newest: refused, then the previous one
    assert "refused" in p.stdout and "at iteration 12" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1", "--device=cpu")
    assert "ckpt.pt" in p.stderr and p.stdout.strip()  # sampled from the good file
    p = run("checkpoint.py", str(out))
    assert re.search(r"ckpt-00000099.pt .* BAD: .*refused", p.stdout)
    assert not marker.exists()


def nanogpt_file(path, dataset="shakespeare_char"):
    """A ckpt.pt laid out as nanoGPT writes it: compiled-model prefixes, a tensor best_val_loss,
    nanoGPT's config, no RNG state."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(GPTConfig(**args))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                "model_args": args, "iter_num": 500, "best_val_loss": torch.tensor(1.75),
                # nanoGPT's config as its CPU recipe stores it: its dtype default is float16 on a
                # machine without bf16 CUDA, backend nccl whatever the device
                "config": {"dataset": dataset, "batch_size": 4, "block_size": 32, "n_layer": 2, "n_head": 2,
                           "n_embd": 32, "dropout": 0.0, "bias": False, "max_iters": 2000, "out_dir": "out",
                           "init_from": "scratch", "device": "cpu", "dtype": "float16", "backend": "nccl",
                           "compile": False, "eval_only": False}}, path)
    return model


def test_nanogpt_checkpoint_samples_and_resumes(shakespeare_char, tmp_path):
    nanogpt_file(tmp_path / "ckpt.pt")
    p = run("checkpoint.py", str(tmp_path / "ckpt.pt"))
    assert "iter_num:      500" in p.stdout and "approximate" in p.stdout
    p = run("sample.py", f"--out_dir={tmp_path}", "--max_new_tokens=20", "--num_samples=1", "--device=cpu")
    assert len(p.stdout.split("---------------")[0].strip()) > 0
    p = resume(tmp_path, "--max_iters=503")
    assert p.stdout.count("approximate resume") == 1 and "at iteration 500" in p.stdout and "iter 502:" in p.stdout
    ours = checkpoint.load(tmp_path / checkpoint.PERIODIC.format(503))
    assert ours["best_val_loss"] == pytest.approx(1.75) and "rng" in ours
    raw = torch.load(tmp_path / checkpoint.PERIODIC.format(503), weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in raw["model"])


def test_retention_keeps_exactly_keep_last(shakespeare_char, tmp_path):
    for keep in (1, 2):
        out = tmp_path / f"keep{keep}"
        run("train.py", *TINY, f"--out_dir={out}", "--max_iters=10", "--eval_interval=100",
            "--checkpoint_interval=2", f"--keep_last={keep}")
        periodic = sorted(n for n in os.listdir(out) if n.startswith("ckpt-"))
        assert periodic == [checkpoint.PERIODIC.format(i) for i in (8, 10)][-keep:]
        for name in periodic:
            checkpoint.load(out / name)


def test_guards(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    p = resume(out, "--n_layer=3", check=False)
    assert p.returncode != 0 and "n_layer=3 but the checkpoint has 2" in p.stderr and "Traceback" not in p.stderr
    p = run("train.py", f"--out_dir={out}", "--init_from=resume", "--dataset=openwebtext", "--device=cpu", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr  # no openwebtext bins here, or a dataset mismatch
    before = contents(out)
    p = run("train.py", *TINY, f"--out_dir={out}")  # the run's own command again: it is complete
    assert "continuing it" in p.stdout and "the run is complete: iteration 12 of max_iters=12" in p.stdout
    p = run("train.py", *TINY, f"--out_dir={out}", "--n_embd=64", check=False)  # another run's command
    assert p.returncode != 0 and "n_embd=64 but the checkpoint has 32" in p.stderr and "another --out_dir" in p.stderr
    assert contents(out) == before  # nothing was touched


def test_dataset_mismatch(shakespeare_char, tmp_path):
    nanogpt_file(tmp_path / "ckpt.pt", dataset="some_other_data")
    p = resume(tmp_path, check=False)
    assert p.returncode != 0 and "trained on 'some_other_data'" in p.stderr


def test_stray_temp_files_are_ignored_and_removed(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    stray = os.path.join(out, ".ckpt-00000016.pt.tmp-12345")
    with open(stray, "wb") as f:
        f.write(b"half a checkpoint")
    assert stray not in checkpoint.candidates(out)
    resume(out, "--max_iters=13")
    assert not os.path.exists(stray)


def test_inspect_cli(trained):
    p = run("checkpoint.py", str(trained))
    lines = p.stdout.splitlines()[1:]
    assert len(lines) == 4 and all(ln.rstrip().endswith("ok") for ln in lines)
    assert re.search(r"ckpt-00000012.pt\s+0\s+12\s+[\d.]+\s+[\d.]+ MB", p.stdout)
    p = run("checkpoint.py", os.path.join(trained, "ckpt-00000008.pt"))
    assert "iter_num:      8" in p.stdout and "'n_layer': 2" in p.stdout and "exact resume:  yes" in p.stdout
    p = run("checkpoint.py", os.path.join(trained, "nope.pt"), check=False)
    assert p.returncode != 0 and "no such file" in p.stderr
