"""checkpoint.py and the files in out_dir: corruption, fallback, unsafe pickles, nanoGPT files,
foreign files, retention, guards and the inspect CLI. Real training runs write the files."""
import os
import re
import struct
import zipfile

import pytest
import torch

from keep.files import BEST, CheckpointError, FORMAT_VERSION, PERIODIC
from keep.store import candidates, read_header, verified
from keep import store
from conftest import TINY, contents, copy_run, listing, run
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def trained(shakespeare_char, tmp_path_factory):
    """A finished tiny run: periodic checkpoints at 4, 8, 12 and ckpt.pt."""
    out = tmp_path_factory.mktemp("trained")
    run("train.py", *TINY, f"--out_dir={out}", "--max_iters=12", "--eval_interval=4",
        "--checkpoint_interval=4", "--keep_last=5")
    return out


def resume(out, *extra, check=True):
    return run("train.py", *TINY, f"--out_dir={out}", "--init_from=resume", "--eval_interval=100",
               *extra, check=check)


def test_files_and_contents(trained):
    names = sorted(listing(trained))
    assert names == ["ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000012.pt", "ckpt.pt"]
    ckpt = store.load(os.path.join(trained, "ckpt-00000012.pt"))
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["iter_num"] == 12
    meta = ckpt["metadata"]
    assert (meta["world_size"] == 1 and meta["tokens_seen"] == 12 * 4 * 32
            and meta["train_seconds"] > 0)
    assert meta["torch_version"] == str(torch.__version__) and meta["init_from"] == "scratch"
    assert isinstance(meta["val_loss"], float) and "created" in meta and "git_commit" in meta
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in ckpt["config"].values())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_falls_back(trained, tmp_path, damage):
    out = copy_run(trained, tmp_path / "run")
    newest = candidates(out)[0]
    data = bytearray(open(newest, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # inside tensor bytes: torch.load alone would not notice
    with open(newest, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match="unreadable|corrupt"):
        store.load(newest)
    p = resume(out, "--max_iters=14")
    warnings = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: skipping")]
    # truncated: not even its iteration can be read; flipped: it ranks first, its CRC fails on load
    why = "left in place" if damage == "truncate" else "falling back to ckpt.pt"
    assert len(warnings) == 1 and os.path.basename(newest) in warnings[0] and why in warnings[0]
    assert "at iteration 12" in p.stdout and "iter 12:" in p.stdout


def test_the_listing_exits_1_when_it_finds_a_bad_file(trained, tmp_path):
    """checkpoint.py OUT_DIR lists every file, then exits 1 with one error line when one of them is
    BAD (a script or a CI job can tell), 0 when all are ok."""
    assert run("checkpoint.py", str(trained)).stderr == ""
    out = copy_run(trained, tmp_path / "run")
    (out / PERIODIC.format(99)).write_bytes(b"not a checkpoint at all")
    p = run("checkpoint.py", str(out), check=False)
    assert p.returncode == 1 and re.search(r"^ckpt-00000099\.pt .* BAD: ", p.stdout, re.M), p.stdout
    assert re.search(r"^ckpt-00000012\.pt .* ok$", p.stdout, re.M)
    assert (p.stderr.strip() == f"error: 1 of the 5 checkpoints in {out} is bad (see BAD "
                                "above)"), p.stderr


def test_all_bad_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for i in (2, 4):
        (out / PERIODIC.format(i)).write_bytes(b"not a checkpoint at all")
    p = resume(out, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: none of the 2 checkpoint(s)")


def test_malicious_pickle_is_refused_and_never_runs(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = os.path.join(out, PERIODIC.format(99))
    torch.save({"model": {}, "model_args": {}, "iter_num": 99, "x": Payload()}, evil)
    os.utime(evil, (os.path.getmtime(evil) + 60,) * 2)  # clearly the newest file
    with pytest.raises(CheckpointError, match="refused.*arbitrary pickle"):
        store.load(evil)
    p = resume(out, "--max_iters=13")  # the planted file is newest: refused, then the previous one
    assert "refused" in p.stdout and "at iteration 12" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1",
            "--device=cpu")
    assert "ckpt.pt" in p.stderr and p.stdout.strip()  # sampled from the good file
    p = run("checkpoint.py", str(out), check=False)
    assert p.returncode == 1 and re.search(r"ckpt-00000099.pt .* BAD: .*refused", p.stdout)
    assert not marker.exists()


def nanogpt_file(path, dataset="shakespeare_char"):
    """A ckpt.pt laid out as nanoGPT writes it: compiled-model prefixes, a tensor best_val_loss,
    nanoGPT's config, no RNG state, and (as nanoGPT on torch < 2.0, without flash attention, keeps
    them) each block's causal-mask buffer attn.bias."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65,
                dropout=0.0)
    model = GPT(GPTConfig(**args))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    masks = {f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
             for i in range(2)}
    torch.save({"model": {"_orig_mod." + k: v for k, v in {**model.state_dict(), **masks}.items()},
                "optimizer": opt.state_dict(),
                "model_args": args, "iter_num": 500, "best_val_loss": torch.tensor(1.75),
                # nanoGPT's config as its CPU recipe stores it: its dtype default is float16 on a
                # machine without bf16 CUDA, backend nccl whatever the device
                "config": {"dataset": dataset, "batch_size": 4, "block_size": 32, "n_layer": 2,
                           "n_head": 2, "n_embd": 32, "dropout": 0.0, "bias": False,
                           "max_iters": 2000, "out_dir": "out", "init_from": "scratch",
                           "device": "cpu", "dtype": "float16", "backend": "nccl", "compile": False,
                           "eval_only": False}}, path)
    return model


def test_nanogpt_checkpoint_samples_and_resumes(shakespeare_char, tmp_path):
    nanogpt_file(tmp_path / "ckpt.pt")
    p = run("checkpoint.py", str(tmp_path / "ckpt.pt"))
    assert "iter_num:      500" in p.stdout and "approximate" in p.stdout
    p = run("sample.py", f"--out_dir={tmp_path}", "--max_new_tokens=20", "--num_samples=1",
            "--device=cpu")
    assert len(p.stdout.split("---------------")[0].strip()) > 0
    p = resume(tmp_path, "--max_iters=503")
    assert (p.stdout.count("approximate resume") == 1 and "at iteration 500" in p.stdout
            and "iter 502:" in p.stdout)
    ours = store.load(tmp_path / PERIODIC.format(503))
    assert ours["best_val_loss"] == pytest.approx(1.75) and "rng" in ours
    raw = torch.load(tmp_path / PERIODIC.format(503), weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in raw["model"])


def test_retention_keeps_exactly_keep_last(shakespeare_char, tmp_path):
    for keep in (1, 2):
        out = tmp_path / f"keep{keep}"
        run("train.py", *TINY, f"--out_dir={out}", "--max_iters=10", "--eval_interval=100",
            "--checkpoint_interval=2", f"--keep_last={keep}")
        periodic = sorted(n for n in os.listdir(out) if n.startswith("ckpt-"))
        assert periodic == [PERIODIC.format(i) for i in (8, 10)][-keep:]
        for name in periodic:
            store.load(out / name)


def test_guards(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    p = resume(out, "--n_layer=3", check=False)
    assert (p.returncode != 0 and "n_layer=3 but the checkpoint has 2" in p.stderr
            and "Traceback" not in p.stderr)
    p = run("train.py", f"--out_dir={out}", "--init_from=resume", "--dataset=openwebtext",
            "--device=cpu", check=False)
    # no openwebtext bins here, or a dataset mismatch
    assert p.returncode != 0 and "Traceback" not in p.stderr
    before = contents(out)
    p = run("train.py", *TINY, f"--out_dir={out}")  # the run's own command again: it is complete
    assert ("continuing it" in p.stdout
            and "the run is complete: iteration 12 of max_iters=12" in p.stdout)
    # another run's command
    p = run("train.py", *TINY, f"--out_dir={out}", "--n_embd=64", check=False)
    assert (p.returncode != 0 and "n_embd=64 but the checkpoint has 32" in p.stderr
            and "another --out_dir" in p.stderr)
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
    assert stray not in candidates(out)
    resume(out, "--max_iters=13")
    assert not os.path.exists(stray)


def test_inspect_cli(trained):
    p = run("checkpoint.py", str(trained))
    lines = p.stdout.splitlines()[1:]
    assert len(lines) == 4 and all(ln.rstrip().endswith("ok") for ln in lines)
    assert re.search(r"ckpt-00000012.pt\s+[0-9a-f]{8}\s+0\s+12\s+[\d.]+\s+[\d.]+ MB", p.stdout)
    p = run("checkpoint.py", os.path.join(trained, "ckpt-00000008.pt"))
    assert ("iter_num:      8" in p.stdout and "'n_layer': 2" in p.stdout
            and "exact resume:  yes" in p.stdout)
    p = run("checkpoint.py", os.path.join(trained, "nope.pt"), check=False)
    assert p.returncode != 0 and "no such file" in p.stderr


# Files whose zip CRCs may all be valid but which are no checkpoint of ours: each is refused in one
# line, with the reason, by every script that reads it. name: (make(path, good, iteration), reason)
def edited(change):
    """The newest good checkpoint loaded, changed (change returns the new dict), saved again; its
    iteration raised first, so that it would rank newest if it were trusted."""
    def make(path, good, it):
        torch.save(change(dict(torch.load(good, weights_only=True), iter_num=it)), path)
    return make


def args(**changes):
    return edited(lambda c: {**c, "model_args": {**c["model_args"], **changes}})


def tensors(**changes):
    return edited(lambda c: {
        **c, "model": {**c["model"], **{k.replace("__", "."): v for k, v in changes.items()}}})


def damaged_local_header(path, good, it):
    """The last record's local header claims a 64 KB extra field: its data would start past the
    end of the file (zipfile raises EOFError; the central directory and every CRC are intact)."""
    data = bytearray(open(good, "rb").read())
    with zipfile.ZipFile(good) as zf:
        last = zf.infolist()[-1]
    struct.pack_into("<H", data, last.header_offset + 28, 0xFFFF)
    open(path, "wb").write(data)


def zeroed_header(path, good, it):
    data = bytearray(open(good, "rb").read())
    data[:4096] = bytes(4096)
    open(path, "wb").write(data)


FOREIGN = {
    "model={}": (edited(lambda c: {**c, "model": {}}),
                 "model holds 0 tensors, GPT(model_args) has 16"),
    "wte of another shape": (tensors(transformer__wte__weight=torch.zeros(10, 32)),
                             "model's transformer.wte.weight has shape (10, 32), GPT(model_args)'s "
                             "(65, 32)"),
    "a tensor GPT lacks": (tensors(lm_head__bias=torch.zeros(65)),
                           "model holds lm_head.bias, which GPT(model_args) has no place"),
    "integer weights": (tensors(transformer__wpe__weight=torch.zeros(32, 32, dtype=torch.long)),
                        "holds torch.int64"),
    "n_head=3": (args(n_head=3), "model_args n_embd=32 is not a multiple of n_head=3"),
    "model_args without n_embd": (edited(lambda c: {**c, "model_args": {
        k: v for k, v in c["model_args"].items() if k != "n_embd"}}), "model_args lacks n_embd"),
    "n_layer='2'": (args(n_layer="2"), "model_args n_layer='2', not a whole number"),
    "bias=1": (args(bias=1), "model_args bias=1, not True or False"),
    "iter_num='abc'": (edited(lambda c: {**c, "iter_num": "abc"}),
                       "iter_num is 'abc', not a whole number"),
    "iter_num a tensor": (edited(lambda c: {**c, "iter_num": torch.tensor(7)}),
                          "iter_num is a Tensor"),
    "best_val_loss a string": (edited(lambda c: {**c, "best_val_loss": "low"}),
                               "best_val_loss is 'low', not a number"),
    "config=None": (edited(lambda c: {**c, "config": None}), "config is None, not a dict"),
    "a tokenizer of another kind": (edited(lambda c: {**c, "tokenizer": {"kind": "sentencepiece"}}),
                                    "tokenizer is not a record of a char vocab or a BPE"),
    "a char vocab larger than the model's": (edited(lambda c: {**c, "tokenizer": {
        "kind": "char", "itos": [chr(256 + i) for i in range(80)]}}),
        "tokenizer's char vocab has 80 symbols, more than the model's 65"),
    "another BPE": (edited(lambda c: {**c, "tokenizer": {"kind": "bpe", "name": "llama",
                                                         "sha256": ["0", "0"]}}),
                    "tokenizer is the BPE 'llama' with other files than GPT-2's"),
    "data_fingerprint of strings": (edited(lambda c: {**c, "data_fingerprint": {"train": "big"}}),
                                    "data_fingerprint is not the bins' sizes and hashes"),
    "optimizer a list": (edited(lambda c: {**c, "optimizer": [1, 2]}),
                         "optimizer is not an optimizer's state_dict"),
    "another model's optimizer": (edited(lambda c: {**c, "optimizer": {**c["optimizer"], "state": {
        **c["optimizer"]["state"], 0: {**c["optimizer"]["state"][0], "exp_avg": torch.zeros(3)}}}}),
        "optimizer's exp_avg of transformer.wte.weight has shape (3,)"),
    "no optimizer": (edited(lambda c: {k: v for k, v in c.items() if k != "optimizer"}),
                     "no 'optimizer' key"),
    "RNG state from elsewhere": (edited(lambda c: {**c, "rng": [{"python": 1}]}),
                                 "rng of rank 0 is not a state"),
    "metadata branch='x'": (edited(lambda c: {**c, "metadata": {**c["metadata"], "branch": "x"}}),
                            "metadata branch='x'"),
    "a list, not a dict": (edited(lambda c: [1, 2, 3]), "it holds [1, 2, 3], not a dict"),
    "a newer format": (edited(lambda c: {**c, "format_version": 99}), "written by a newer version"),
    "damaged local header": (damaged_local_header, "unreadable (a damaged zip archive: EOFError"),
    "zeroed header": (zeroed_header, "corrupt (CRC mismatch in archive/data.pkl)"),
    # open() would block
    "a FIFO": (lambda path, good, it: os.mkfifo(path), "not a regular file (a FIFO)"),
    "a symlink to /dev/zero": (lambda path, good, it: os.symlink("/dev/zero", path),
                               "not a regular file (a character device, through a symlink to "
                               "/dev/zero)"),
    "a dangling symlink": (lambda path, good, it: os.symlink(
        os.path.join(os.path.dirname(path), "gone.pt"), path), "a dangling symlink"),
    "a symlink loop": (lambda path, good, it: os.symlink(os.path.basename(path), path),
                       "a symlink loop"),
}
# the commands that name one file; each case goes through one of them (and all through the folder
# test)
NAMED = {"checkpoint.py": lambda f, tmp: [f],
         "export.py": lambda f, tmp: [f"--ckpt={f}", f"--to={tmp / 'hf'}"],
         "train.py": lambda f, tmp: [*TINY, f"--resume_from={f}", f"--out_dir={tmp / 'run'}"]}


@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_file_is_refused(trained, tmp_path, case):
    """Every case, in this process: load (which every script calls for a file it is named) refuses
    it with its reason, and retention's check counts it bad."""
    make, why = FOREIGN[case]
    path = str(tmp_path / PERIODIC.format(100))
    make(path, os.path.join(trained, "ckpt-00000012.pt"), 100)
    with pytest.raises(CheckpointError, match=re.escape(why)):
        store.load(path)
    assert not verified(path)


# each script named a foreign file: one of the content checks, a damaged archive and a file that is
# no file each (every case goes through every script in the folder test below)
THROUGH = [("wte of another shape", "checkpoint.py"), ("damaged local header", "checkpoint.py"),
           ("a FIFO", "checkpoint.py"), ("n_head=3", "export.py"), ("zeroed header", "export.py"),
           ("a symlink to /dev/zero", "export.py"), ("iter_num='abc'", "train.py"),
           ("damaged local header", "train.py"), ("a symlink loop", "train.py")]


@pytest.mark.parametrize("case, script", THROUGH)
def test_foreign_file_is_refused_in_one_line(trained, tmp_path, case, script):
    make, why = FOREIGN[case]
    path = str(tmp_path / PERIODIC.format(100))
    make(path, os.path.join(trained, "ckpt-00000012.pt"), 100)
    # (a FIFO would hang it)
    p = run(script, *NAMED[script](path, tmp_path), check=False, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert (p.returncode in (1, 2) and "Traceback" not in p.stderr and last.startswith("error: ")
            and path in last)
    # (a dangling name, to the config check)
    assert why in last or (p.returncode == 2 and "no such file" in last)
    # nothing written
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "run")


def foreign_folder(trained, out):
    """A copy of the trained run (good files at 4, 8, 12) with every FOREIGN file in it under a
    later periodic name, and ckpt.pt a FIFO. (A FIFO or a dangling symlink cannot be copied: made
    afresh.)"""
    copy_run(trained, out)
    names = {}
    for i, (case, (make, _)) in enumerate(FOREIGN.items()):
        names[case] = PERIODIC.format(100 + i)
        make(str(out / names[case]), os.path.join(trained, "ckpt-00000012.pt"), 100 + i)
    os.remove(out / BEST)
    os.mkfifo(out / BEST)
    return names


def test_foreign_files_in_out_dir_are_listed_bad_and_skipped(trained, tmp_path):
    out = tmp_path / "run"
    names = foreign_folder(trained, out)
    # exit 1: it found bad files (and lists them all)
    p = run("checkpoint.py", str(out), timeout=120, check=False)
    assert p.returncode == 1, p.stderr
    for case, name in names.items():
        assert re.search(rf"^{re.escape(name)} .* BAD: .*{re.escape(FOREIGN[case][1])}", p.stdout,
                         re.M), case
    assert re.search(r"^ckpt\.pt .* BAD: .*not a regular file \(a FIFO\)$", p.stdout, re.M)
    assert (re.search(r"^ckpt-00000012\.pt +[0-9a-f]{8} +0 +12 .* ok$", p.stdout, re.M)
            and "Traceback" not in p.stderr)
    # sample.py and export.py fall back to the newest good file, train.py resumes it; each says what
    # it skipped
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1",
            "--device=cpu", timeout=120)
    assert (f"sampling from {out / 'ckpt-00000012.pt'} (iteration 12)" in p.stderr
            and p.stdout.strip())
    p = run("export.py", f"--out_dir={out}", "--which=latest", f"--to={tmp_path / 'hf'}",
            timeout=120)
    assert f"exporting {out / 'ckpt-00000012.pt'} (iteration 12" in p.stdout
    skipped = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: skipping")]
    p = resume(out, "--max_iters=13")
    resumed = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: skipping")]
    for name in [*names.values(), BEST]:
        assert (sum(name in ln for ln in skipped) == 1
                and sum(name in ln for ln in resumed) == 1), name
    assert (f"resuming from {out / 'ckpt-00000012.pt'} at iteration 12" in p.stdout
            and "iter 12:" in p.stdout)


def test_a_long_reason_is_cut_at_a_word_boundary(trained, tmp_path):
    """Reading the header of a file whose first 4 KB are zeros: torch's message is long, and shown
    up to the end of a word (then '...'), never cut mid-word."""
    path = tmp_path / PERIODIC.format(100)
    zeroed_header(path, os.path.join(trained, "ckpt-00000012.pt"), 100)
    with pytest.raises(RuntimeError) as raw:
        torch.load(path, weights_only=True, mmap=True)
    full = f"RuntimeError: {str(raw.value).strip().splitlines()[0]}"
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    shown = re.fullmatch(r".*: unreadable \((.*)\)", str(e.value)).group(1).removesuffix(" ...")
    assert len(full) > len(shown) > 40 and full.startswith(shown) and full[len(shown)] == " "
