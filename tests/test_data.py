"""Data: the char prepare script, the GPT-2 tokenizer, and batches as a pure function."""
import os
import pickle
import subprocess
import sys

import importlib.util

import numpy as np
import pytest
import torch

from conftest import ROOT
from configurator import RunError
from dataset import TokenData, load_meta
from tokenizer import get_codec, gpt2_encoding

_spec = importlib.util.spec_from_file_location("char_prepare", os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"))
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
    out = subprocess.run([sys.executable, os.path.join(shakespeare_char, "prepare.py")], capture_output=True, text=True)
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
    assert codec.decode(ids) == "To be, or not to be<|endoftext|> ünï 😀" and ids[7] == codec.eot == 50256
    assert b"".join(codec.token_bytes(i) for i in ids).decode() == codec.decode(ids)  # what streaming prints


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
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    # one rank with 4 micro-steps sees the same rows as 2 ranks with 2 micro-steps each
    one = torch.cat([data.train_batch(1337, 3, m, 2, 16, 4)[0] for m in range(4)])
    two = torch.cat([data.train_batch(1337, 3, m, 2, 16, 2, rank=r, world_size=2)[0] for r in range(2) for m in range(2)])
    assert torch.equal(one, two)
    # evaluation batches are fixed and do not come from the training stream
    assert torch.equal(data.eval_batch("val", 1337, 0, 4, 16)[0], data.eval_batch("val", 1337, 0, 4, 16)[0])
    assert not torch.equal(data.eval_batch("train", 1337, 7, 4, 16)[0], a[0])


def test_missing_dataset_names_prepare_script(tmp_path):
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "prepare.py").write_text("")
    with pytest.raises(RunError, match="has no train.bin; run: python .*prepare.py"):
        TokenData("shakespeare_char", data_dir=str(tmp_path))
    with pytest.raises(RunError, match="'nope'.*does not exist"):
        TokenData("nope", data_dir=str(tmp_path))
