"""Data: the char prepare script, the GPT-2 tokenizer, and batches as a pure function."""
import os
import pickle
import shutil
import subprocess
import sys

import importlib.util

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run
from console import RunError
from dataset import DATA_DIR, TokenData
from tokenizer import load_meta
from tokenizer import get_codec, gpt2_encoding

_spec = importlib.util.spec_from_file_location(
    "char_prepare", os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"))
char_prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(char_prepare)
prepare = char_prepare.prepare


def test_prepare_small_text(tmp_path):
    text = "hello world\n" * 10
    vocab, n_train, n_val = prepare(text, str(tmp_path))
    assert (vocab, n_train, n_val) == (9, 108, 12)
    meta = load_meta(tmp_path / "meta.pkl")
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == text
    assert meta["vocab_size"] == 9 and meta["stoi"]["h"] == sorted(set(text)).index("h")


def test_shipped_shakespeare(shakespeare_char):
    out = subprocess.run([sys.executable, os.path.join(shakespeare_char, "prepare.py")],
                         capture_output=True, text=True)
    assert "vocab size: 65" in out.stdout and "1,003,854" in out.stdout and "111,540" in out.stdout
    assert os.path.getsize(os.path.join(shakespeare_char, "train.bin")) == 2 * 1_003_854
    assert os.path.getsize(os.path.join(shakespeare_char, "val.bin")) == 2 * 111_540
    codec = get_codec(os.path.join(shakespeare_char, "meta.pkl"))
    assert codec.decode(codec.encode("First Citizen:")) == "First Citizen:"
    assert (codec.size, codec.eot) == (65, None)


def test_gpt2_tokenizer_offline():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    codec = get_codec(None)
    ids = codec.encode("To be, or not to be<|endoftext|> ünï 😀")
    assert (codec.decode(ids) == "To be, or not to be<|endoftext|> ünï 😀"
            and ids[7] == codec.eot == 50256)
    # what streaming prints
    assert b"".join(codec.token_bytes(i) for i in ids).decode() == codec.decode(ids)


def test_meta_pkl_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_meta(tmp_path / "meta.pkl")
    assert not (tmp_path / "pwned").exists()


def test_batches_are_a_pure_function_of_seed_and_iteration(shakespeare_char):
    data = TokenData("shakespeare_char")
    a = data.train_batch(1337, 7, 0, 4, 16, 1)
    b = data.train_batch(1337, 7, 0, 4, 16, 1)
    c = data.train_batch(1337, 8, 0, 4, 16, 1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    x, y = a
    # targets are inputs shifted by one
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    # one rank with 4 micro-steps sees the same rows as 2 ranks with 2 micro-steps each
    one = torch.cat([data.train_batch(1337, 3, m, 2, 16, 4)[0] for m in range(4)])
    two = torch.cat([data.train_batch(1337, 3, m, 2, 16, 2, rank=r, world_size=2)[0]
                     for r in range(2) for m in range(2)])
    assert torch.equal(one, two)
    # evaluation windows are the split's first tokens, one after another, and no training batch
    x, y = data.window_rows("val", 1, 2, 16)
    val = torch.from_numpy(data.bins["val"][16:49].astype("int64"))
    assert torch.equal(x, torch.stack([val[:16], val[16:32]])) and torch.equal(y[1], val[17:33])
    assert not torch.equal(data.window_rows("train", 0, 4, 16)[0], a[0])


def test_missing_dataset_names_prepare_script(tmp_path):
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "prepare.py").write_text("")
    with pytest.raises(RunError, match="has no train.bin; run: python .*prepare.py"):
        TokenData("shakespeare_char", data_dir=str(tmp_path))
    with pytest.raises(RunError, match="'nope'.*does not exist"):
        TokenData("nope", data_dir=str(tmp_path))


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-pwned",))


DAMAGED = [  # meta.pkl's dict (shakespeare_char's ids, 0-64, in the bins), words the one line holds
    ("small-vocab", lambda m: dict(m, vocab_size=10), ["vocab_size 10", "its itos has 65"]),
    ("small-vocab-and-itos", lambda m: dict(vocab_size=10,
                                            itos={i: m["itos"][i] for i in range(10)},
                                            stoi={m["itos"][i]: i for i in range(10)}),
     ["train.bin holds id 64", "vocab of 10"]),
    ("no-itos", lambda m: dict(vocab_size=65), ["vocab_size 65 but no itos"]),
    ("char-no-itos", lambda m: dict(vocab_size=65, tokenizer="char"),
     ["vocab_size 65 but no itos"]),
    ("not-a-dict", lambda m: [m], ["is not a dict"]),
    ("no-vocab-size", lambda m: dict(itos=m["itos"], stoi=m["stoi"]), ["has no vocab_size"]),
    ("planted", lambda m: dict(m, vocab_size=Planted()), ["refus", "posix.system"]),
]


@pytest.fixture
def damaged(shakespeare_char, request):
    """data/<name>/ with shakespeare_char's bins and a damaged meta.pkl (train.py reads only
    data/)."""
    tag, change, words = request.param
    name = f"test-meta-{tag}-{os.getpid()}"
    folder = os.path.join(DATA_DIR, name)
    os.makedirs(folder)
    for f in ("train.bin", "val.bin"):
        shutil.copyfile(os.path.join(shakespeare_char, f), os.path.join(folder, f))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump(change(load_meta(os.path.join(shakespeare_char, "meta.pkl"))), f)
    yield name, words
    shutil.rmtree(folder, ignore_errors=True)


def error_line(p):
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and errors[0] == p.stderr.strip().splitlines()[-1], p.stderr
    return errors[0]


@pytest.mark.parametrize("damaged", DAMAGED, ids=[d[0] for d in DAMAGED], indirect=True)
def test_a_damaged_meta_pkl_is_one_line_before_anything_is_made(damaged, trained, tmp_path):
    name, words = damaged
    out = tmp_path / "out"
    line = error_line(run("train.py", *TINY, f"--dataset={name}", f"--out_dir={out}",
                          "--max_iters=2", check=False))
    for w in words + [os.path.join("data", name), "python data/prepare.py", f"--dataset={name}"]:
        assert w in line, line
    assert not out.exists()  # judged before out_dir, its .lock or metrics.jsonl
    assert not os.path.exists(os.path.join(ROOT, "planted-pwned"))
    if "bin holds id" in line:
        return  # the bins are train.py's to read; sample.py and export.py read meta.pkl alone
    # a checkpoint without its own vocab (nanoGPT's) falls back to its dataset's meta.pkl: the same
    # line
    ckpt = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    old = {k: ckpt[k]
           for k in ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")}
    old["config"] = dict(old["config"], dataset=name)
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "ckpt.pt")
    for cmd in (["sample.py", f"--out_dir={tmp_path / 'old'}", "--device=cpu", "--num_samples=1",
                 "--max_new_tokens=3"],
                ["export.py", f"--out_dir={tmp_path / 'old'}", f"--to={tmp_path / 'hf'}"]):
        assert error_line(run(*cmd, check=False)) == line
    assert not (tmp_path / "hf").exists()


def test_a_big_bin_is_checked_in_pieces_and_every_batch_too(tmp_path, monkeypatch):
    import dataset
    import tokenizer
    monkeypatch.setattr(dataset, "SCAN_ALL", 1000)  # bins past 1,000 ids are read in 4 pieces of 10
    monkeypatch.setattr(dataset, "SCAN_PIECES", 4)
    monkeypatch.setattr(dataset, "SCAN_PIECE", 10)
    folder = tmp_path / "big"
    folder.mkdir()
    chars = [chr(33 + i) for i in range(65)]
    tokenizer.save_meta(folder / "meta.pkl", dict(vocab_size=65, itos=dict(enumerate(chars)),
                                                stoi={c: i for i, c in enumerate(chars)}))
    ids = (np.arange(5000) % 60).astype(np.uint16)
    ids.tofile(folder / "val.bin")
    for at, when in ((0, "open"), (2500, "batch")):  # in the first piece; between pieces
        bad = ids.copy()
        bad[at] = 70
        bad.tofile(folder / "train.bin")
        if when == "open":
            with pytest.raises(RunError, match="train.bin holds id 70, outside the vocab of 65"):
                TokenData("big", data_dir=str(tmp_path))
            continue
        data = TokenData("big", data_dir=str(tmp_path))
        data.train_batch(0, 0, 0, 4, 16, 1)
        with pytest.raises(RunError, match="train.bin holds id 70, outside the vocab of 65 "
                                           ".*data/prepare.py"):
            data._rows("train", np.array([2490]), 16)
