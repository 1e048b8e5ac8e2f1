"""data/prepare.py and data/openwebtext/prepare.py: a user's own files -> bins train.py reads.

Behaviour is checked by decoding the bins back: every document comes back whole, in order, with
<|endoftext|> after it (BPE), in train or in val, never both. Interruptions are real: a SIGKILL
mid-prepare and a write that fails at a file size limit."""
import importlib.util
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ENV, ROOT, TINY, run
from dataset import DATA_DIR, TokenData
from tokenizer import load_meta
from tokenizer import gpt2_encoding

_spec = importlib.util.spec_from_file_location("corpus", os.path.join(ROOT, "data", "prepare.py"))
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
EOT = "<|endoftext|>"
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare_char", "input.txt")


@pytest.fixture(scope="module")
def docs():
    """40 ASCII documents of 50-3000 characters cut from tiny Shakespeare, one with a line longer
    than a piece, one empty."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    rng = random.Random(0)
    out = []
    for _ in range(38):
        a = rng.randrange(len(text) - 3000)
        out.append(text[a:a + rng.randrange(50, 3000)])
    return out + ["x" * 5000 + "\n\n  tail", ""]


@pytest.fixture
def names():
    """Dataset names under the repo's data/ (train.py reads only there), removed afterwards."""
    made = []

    def name(tag):
        made.append(f"test-prep-{tag}-{os.getpid()}")
        return made[-1]
    yield name
    for n in made:
        shutil.rmtree(os.path.join(DATA_DIR, n), ignore_errors=True)


def write_txt(folder, docs):
    os.makedirs(folder, exist_ok=True)
    for i, d in enumerate(docs):
        with open(os.path.join(folder, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(d)
    return folder


def split_docs(name, data_dir=DATA_DIR):
    """{split: [document text]} decoded from a BPE dataset's bins, cut at <|endoftext|>."""
    enc = gpt2_encoding()
    out = {}
    for split in ("train", "val"):
        ids = np.fromfile(os.path.join(data_dir, name, f"{split}.bin"), dtype=np.uint16)
        assert ids[-1] == enc.eot_token  # every document ends with one
        out[split] = enc.decode(ids.tolist(), errors="strict").split(EOT)[:-1]
    return out


def test_folder_glob_file_jsonl_parquet_give_the_documents_back(docs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = write_txt(tmp_path / "txt", docs)
    (tmp_path / "other.md").write_text("not read from a folder")
    with open(tmp_path / "c.jsonl", "w") as f:
        for i, d in enumerate(docs):
            # a blank line is no document
            f.write(json.dumps({"id": i, "body": d}) + ("\n\n" if i == 3 else "\n"))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=7)
    results = {}
    for tag, spec, field in [("folder", folder, "text"),
                             ("glob", str(tmp_path / "txt" / "doc*.txt"), "text"),
                             ("jsonl", str(tmp_path / "c.jsonl"), "body"),
                             ("parquet", str(tmp_path / "c.parquet"), "body")]:
        corpus.prepare(corpus.find_sources(spec, field), tag, val_fraction=0.1, seed=7, num_proc=2,
                       shard_mb=0.01, data_dir=tmp_path / "data")
        parts = split_docs(tag, tmp_path / "data")
        assert len(parts["val"]) == 4 and sorted(parts["train"] + parts["val"]) == sorted(docs)
        val_set = set(parts["val"])
        # input order, whole documents
        assert parts["train"] == [d for d in docs if d not in val_set]
        assert parts["val"] == [d for d in docs if d in val_set]
        results[tag] = [open(tmp_path / "data" / tag / f"{s}.bin", "rb").read()
                        for s in ("train", "val")]
        meta = load_meta(tmp_path / "data" / tag / "meta.pkl")
        assert meta["documents"] == 40 and meta["val_documents"] == 4 and meta["dtype"] == "uint16"
        assert meta["tokenizer"] == "gpt2" and "itos" not in meta
    # the same documents in the same order give the same bins, whatever holds them
    assert results["folder"] == results["glob"] == results["jsonl"] == results["parquet"]
    # one file: one document
    one = corpus.find_sources(os.path.join(folder, "doc000.txt"), "text")
    assert len(one) == 1 and one[0].count() == 1


def test_ids_are_tiktokens_with_one_eot_after_each_document(tmp_path):
    texts = ["Hello world", "", "<|endoftext|> in a text is just text", "the end",
             "caf\u00e9 \U0001f600"]
    with open(tmp_path / "c.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    corpus.prepare(corpus.find_sources(str(tmp_path / "c.jsonl"), "text"), "ids", val_fraction=0.2,
                   seed=0, data_dir=tmp_path)
    enc = gpt2_encoding()
    per_doc = [enc.encode_ordinary(t) + [enc.eot_token] for t in texts]
    ids = {s: np.fromfile(tmp_path / "ids" / f"{s}.bin", dtype=np.uint16).tolist()
           for s in ("train", "val")}
    (val,) = [i for i, d in enumerate(per_doc) if d == ids["val"]]
    assert ids["train"] == [t for i, d in enumerate(per_doc) if i != val for t in d]
    # the text's <|endoftext|> is text
    assert sum(t == enc.eot_token for s in ids.values() for t in s) == len(texts)


def test_val_split_is_deterministic_and_by_document(docs, tmp_path):
    folder = write_txt(tmp_path / "txt", docs)
    bins = {}
    for tag, seed, proc, shard in [("a", 1, 1, 0.002), ("b", 1, 2, 5.0), ("c", 2, 2, 5.0)]:
        corpus.prepare(corpus.find_sources(str(folder), "text"), tag, seed=seed, val_fraction=0.25,
                       num_proc=proc, shard_mb=shard, data_dir=tmp_path)
        bins[tag] = split_docs(tag, tmp_path)
        assert len(bins[tag]["val"]) == 10
    assert bins["a"] == bins["b"]  # threads and shard size change nothing
    assert bins["a"]["val"] != bins["c"]["val"]  # the seed picks the documents
    assert sorted(bins["c"]["train"] + bins["c"]["val"]) == sorted(docs)


def test_a_long_text_is_encoded_in_pieces_with_the_ids_of_the_whole(tmp_path, monkeypatch):
    """A file bigger than a piece is cut only where GPT-2's pre-tokenizer cuts anyway."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:200_000]
    rng = random.Random(1)
    tricky = "".join(rng.choice(["\n", "\n\n", " \n", "\n ", "\r\n", "\r", "a", "Z", ".", "'s",
                                 "é", "\t", "1", "  ", "\u3000"])
                     for _ in range(50_000))
    for i, t in enumerate([text, tricky + text + tricky]):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "z.txt").write_text("another document")
    monkeypatch.setattr(corpus, "PIECE", 4096)
    pieces = list(corpus.TextFile(str(tmp_path / "0.txt")).read(0))
    assert len(pieces) > 40 and "".join(p[1] for p in pieces) == text
    crlf = text.replace("\n", "\r\n")
    (tmp_path / "crlf.txt").write_bytes(crlf.encode())
    pieces = list(corpus.TextFile(str(tmp_path / "crlf.txt")).read(0))
    assert len(pieces) > 40 and "".join(p[1] for p in pieces) == crlf  # CRLF files are cut too
    corpus.prepare(corpus.find_sources(str(tmp_path / "*.txt"), "text"), "long", val_fraction=0.25,
                   seed=0, data_dir=tmp_path / "data")
    enc = gpt2_encoding()
    ids = np.concatenate([np.fromfile(tmp_path / "data" / "long" / f"{s}.bin", dtype=np.uint16)
                          for s in ("train", "val")])
    expected = {tuple(enc.encode_ordinary(t) + [enc.eot_token])
                for t in (text, tricky + text + tricky, "another document", crlf)}
    # each document's ids, as encoding it whole gives them, is a run of the bins
    cuts = np.flatnonzero(ids == enc.eot_token)
    found = {tuple(ids[a + 1 if i else 0:b + 1].tolist())
             for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))}
    assert found == expected


def test_char_tokenizer_and_a_uint32_vocab(tmp_path):
    # small vocab: uint16, documents back to back, meta.pkl as shakespeare_char's
    small = ["hello world\n", "abc", "the end\n", "zz top\n", "quiet"]
    write_txt(tmp_path / "small", small)
    corpus.prepare(corpus.find_sources(str(tmp_path / "small"), "text"), "small", tokenizer="char",
                   val_fraction=0.2, seed=3, data_dir=tmp_path / "data")
    meta = load_meta(tmp_path / "data" / "small" / "meta.pkl")
    chars = sorted(set("".join(small)))
    assert (meta["vocab_size"] == len(chars) and meta["itos"] == dict(enumerate(chars))
            and meta["dtype"] == "uint16")
    data = TokenData("small", data_dir=tmp_path / "data")
    text = {s: "".join(meta["itos"][int(i)] for i in b) for s, b in data.bins.items()}
    val_doc = [d for d in small if d == text["val"]]
    assert len(val_doc) == 1 and text["train"] == "".join(d for d in small if d != val_doc[0])
    assert data.vocab_size() == len(chars)
    # 70,000 distinct characters: ids past 65,535, so uint32, recorded in meta and read by
    # dataset.py
    points = [c for c in range(0x100, 0x100 + 75_000) if not 0xD800 <= c < 0xE000][:70_000]
    big = ["".join(map(chr, points[i::4])) for i in range(4)]
    write_txt(tmp_path / "big", big)
    corpus.prepare(corpus.find_sources(str(tmp_path / "big"), "text"), "big", tokenizer="char",
                   val_fraction=0.25, seed=0, data_dir=tmp_path / "data")
    meta = load_meta(tmp_path / "data" / "big" / "meta.pkl")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    data = TokenData("big", data_dir=tmp_path / "data")
    assert data.bins["train"].dtype == np.uint32 and data.vocab_size() == 70_000
    assert int(data.bins["train"].max()) >= 2**16
    x, y = data.train_batch(seed=0, it=0, micro_step=0, batch_size=64, block_size=8,
                            accum_per_rank=1)
    assert x.dtype == torch.long and x.max() < 70_000 and (x[:, 1:] == y[:, :-1]).all()
    decoded = {s: "".join(meta["itos"][int(i)] for i in b) for s, b in data.bins.items()}
    assert sorted([decoded["val"], *[d for d in big if d != decoded["val"]]]) == sorted(big)
    assert decoded["train"] + decoded["val"] != "" and decoded["val"] in big


def test_kill_mid_prepare_then_the_same_command_finishes_without_redoing_shards(tmp_path, names):
    docs = []
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    rng = random.Random(2)
    for _ in range(400):
        a = rng.randrange(len(text) - 40_000)
        docs.append(text[a:a + 40_000])
    folder = write_txt(tmp_path / "txt", docs)  # 16 MB, 64 shards of 0.25 MB
    ref, killed = names("ref"), names("killed")
    args = [f"--input={folder}", "--num_proc=1", "--shard_mb=0.25"]
    run("data/prepare.py", *args, f"--dataset={ref}")
    proc = subprocess.Popen([sys.executable, "data/prepare.py", *args, f"--dataset={killed}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = os.path.join(DATA_DIR, killed, corpus.MANIFEST)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with open(manifest) as f:
                if len(json.load(f)["shards"]) >= 5:
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = os.path.join(DATA_DIR, killed)
    with open(manifest) as f:
        state = json.load(f)
    assert (5 <= len(state["shards"]) < 64
            and not state["complete"]), "the prepare ended before it was killed"
    assert (not os.path.exists(os.path.join(out, "train.bin"))
            and not os.path.exists(os.path.join(out, "val.bin")))
    assert os.path.exists(os.path.join(out, "train.bin.partial"))
    # The first document is in a finished shard. Change its text but not its size or time: a
    # re-run that redid that shard would write the new text; one that goes on after it cannot.
    first = os.path.join(folder, "doc000.txt")
    st = os.stat(first)
    with open(first, "r+", encoding="utf-8") as f:
        f.write("#" * 100)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    p = run("data/prepare.py", *args, f"--dataset={killed}")
    assert f"resuming: {len(state['shards'])}" in p.stdout, p.stdout
    for split in ("train", "val"):
        with open(os.path.join(DATA_DIR, ref, f"{split}.bin"), "rb") as a, \
                open(os.path.join(out, f"{split}.bin"), "rb") as b:
            assert a.read() == b.read(), split
    assert sorted(os.listdir(out)) == ["meta.pkl", "prepare.json", "train.bin", "val.bin"]
    # the same command again: nothing to do; a changed input (its time moved): done again, with it
    assert "nothing to do" in run("data/prepare.py", *args, f"--dataset={killed}").stdout
    os.utime(first)
    p = run("data/prepare.py", *args, f"--dataset={killed}")
    assert "again from the start" in p.stdout
    assert "#" * 100 in "".join(split_docs(killed)["train"] + split_docs(killed)["val"])


def test_a_write_that_fails_midway_leaves_no_bins_and_resumes(docs, tmp_path, names):
    folder = write_txt(tmp_path / "txt", docs * 5)
    name = names("fsize")
    args = [f"--input={folder}", f"--dataset={name}", "--shard_mb=0.01", "--val_fraction=0.2"]
    limit = 60_000  # bytes: train.bin.partial reaches it after a few shards

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    p = run("data/prepare.py", *args, check=False, preexec_fn=cap)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert (err[-1].startswith("error:") and "File too large" in err[-1]
            and "run the same command again" in err[-1])
    out = os.path.join(DATA_DIR, name)
    assert not os.path.exists(os.path.join(out, "train.bin"))
    # a torn shard past the last finished one
    assert os.path.getsize(os.path.join(out, "train.bin.partial")) == limit
    # a partial file gone (removed by hand, say): the finished shards cannot be trusted, start over
    os.remove(os.path.join(out, "val.bin.partial"))
    p = run("data/prepare.py", *args)
    assert ("val.bin.partial is missing or shorter than the" in p.stdout
            and "resuming" not in p.stdout)
    parts = split_docs(name)
    assert sorted(parts["train"] + parts["val"]) == sorted(docs * 5) and len(parts["val"]) == 40
    good = open(os.path.join(out, "train.bin"), "rb").read()
    # a finished bin cut short is not "nothing to do"; --check sees it too
    os.truncate(os.path.join(out, "train.bin"), len(good) - 2)
    one_error_line(run("data/prepare.py", f"--dataset={name}", "--check", check=False), 1,
                   "meta.pkl records")
    p = run("data/prepare.py", *args)
    assert ("bins are missing or not the size" in p.stdout
            and open(os.path.join(out, "train.bin"), "rb").read() == good)


def test_check_prints_counts_and_windows_and_training_reads_it(docs, tmp_path, names):
    folder = write_txt(tmp_path / "txt", docs)
    name = names("walk")
    p = run("data/prepare.py", f"--input={folder}", f"--dataset={name}", "--check", "--windows=2")
    meta = load_meta(os.path.join(DATA_DIR, name, "meta.pkl"))
    n = meta["tokens"]
    assert (f"train: {n['train']:,} tokens ({n['train'] / (n['train'] + n['val']):.2%}), 36 "
            "<|endoftext|>" in p.stdout)
    assert f"val: {n['val']:,} tokens" in p.stdout and "40 documents (4 in val)" in p.stdout
    parts = split_docs(name)
    joined = {s: "".join(d + EOT for d in parts[s]) for s in parts}
    windows = re.findall(r"^--- (train|val) tokens [\d,]+-[\d,]+ ---\n(.*?)\n(?=^---)", p.stdout,
                         re.S | re.M)
    assert [w[0] for w in windows] == ["train", "train", "val", "val"], p.stdout
    for split, body in windows:  # text from the right split, decoded back
        assert len(body) > 20 and body in joined[split], (split, body)
    # train and sample on it, as the README's walk-through
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--dataset={name}", f"--out_dir={out}", "--max_iters=3",
        "--eval_interval=3", "--block_size=16")
    s = run("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1",
            "--max_new_tokens=5", "--start=ROMEO")
    assert s.stdout.startswith("ROMEO")


def one_error_line(p, code, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and "Traceback" not in p.stderr + p.stdout, (p.returncode, p.stderr)
    assert (lines and lines[-1].startswith("error:")
            and not [ln for ln in lines[:-1] if "error" in ln]), p.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_bad_inputs_get_one_line(tmp_path, names):
    (tmp_path / "one.txt").write_text("just one document")
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{not json\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.parquet").write_text("not parquet")
    name = names("bad")
    cases = [
        ([f"--dataset={name}"], 2, "--input"),
        ([f"--input={tmp_path}/nope.txt", f"--dataset={name}"], 2, "does not exist"),
        ([f"--input={tmp_path}/*.nope", f"--dataset={name}"], 2, "matches no file"),
        ([f"--input={tmp_path}/empty", f"--dataset={name}"], 2, "no .txt, .jsonl or .parquet"),
        ([f"--input={tmp_path}/x.txt", f"--dataset={name}", "--tokenizer=char"], 1, "1 token",
         "too little"),
        ([f"--input={tmp_path}/bad.jsonl", f"--dataset={name}"], 1, "bad.jsonl, line 3",
         "not a JSON line"),
        ([f"--input={tmp_path}/nofield.jsonl", f"--dataset={name}"], 1, "no text field 'text'",
         "'body'", "--text_field"),
        ([f"--input={tmp_path}/fake.parquet", f"--dataset={name}"], 1, "cannot be read as Parquet"),
        ([f"--input={tmp_path}/bad.jsonl", "--dataset=shakespeare_char"], 1, "did not make",
         "input.txt, prepare.py"),
        ([f"--input={tmp_path}/bad.jsonl", "--dataset=gpt2_bpe"], 1, "did not make",
         "encoder.json"),
        ([f"--input={tmp_path}/one.txt", "--dataset=../x"], 2, "plain folder name"),
        ([f"--input={tmp_path}/one.txt", f"--dataset={name}", "--val_fraction=1.0"], 2,
         "val_fraction"),
        ([f"--input={tmp_path}/one.txt", f"--dataset={name}", "--tokenizer=bpe"], 2, "tokenizer"),
        ([f"--input={tmp_path}/one.txt", f"--dataset={name}", "--shard=1"], 2, "shard_mb"),
        (["--check", "--dataset=nothing-here"], 1, "does not exist"),
    ]
    for args, code, *words in cases:
        one_error_line(run("data/prepare.py", *args, check=False), code, *words)
    assert not os.path.exists(os.path.join(DATA_DIR, name, "train.bin"))


def test_one_text_file_is_split_by_position_and_says_so(tmp_path, names):
    """One long text, nanoGPT's own-data case: val is its last val_fraction of the tokens."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        novel = f.read()[:100_000]
    (tmp_path / "novel.txt").write_text(novel, encoding="utf-8")
    chars = names("novel")
    p = run("data/prepare.py", f"--input={tmp_path / 'novel.txt'}", f"--dataset={chars}",
            "--tokenizer=char")
    assert "one document: val is its last 10% by position (10,000 tokens)" in p.stdout, p.stdout
    meta = load_meta(os.path.join(DATA_DIR, chars, "meta.pkl"))
    text = {s: "".join(meta["itos"][int(i)]
                       for i in np.fromfile(os.path.join(DATA_DIR, chars, f"{s}.bin"),
                                            dtype=np.uint16))
            for s in ("train", "val")}
    assert text["train"] == novel[:90_000] and text["val"] == novel[90_000:]
    assert meta["split"] == "position" and meta["tokens"] == {"train": 90_000, "val": 10_000}
    # the same command again has nothing to do; --check says how val was taken
    assert "nothing to do" in run("data/prepare.py", f"--input={tmp_path / 'novel.txt'}",
                                  f"--dataset={chars}", "--tokenizer=char").stdout
    assert "val by position" in run("data/prepare.py", f"--dataset={chars}", "--check").stdout
    # GPT-2 BPE: the ids of the whole text (and its <|endoftext|>), cut at 90% of them
    bpe = names("novelbpe")
    p = run("data/prepare.py", f"--input={tmp_path / 'novel.txt'}", f"--dataset={bpe}",
            "--val_fraction=0.2")
    enc = gpt2_encoding()
    whole = enc.encode_ordinary(novel) + [enc.eot_token]
    ids = {s: np.fromfile(os.path.join(DATA_DIR, bpe, f"{s}.bin"), dtype=np.uint16).tolist()
           for s in ("train", "val")}
    n_val = round(0.2 * len(whole))
    assert ids["train"] == whole[:-n_val] and ids["val"] == whole[-n_val:]
    assert f"one document: val is its last 20% by position ({n_val:,} tokens)" in p.stdout, p.stdout
    # fewer documents than 1/val_fraction: whole ones would give val far more than its share
    write_txt(tmp_path / "three", [novel[:30_000], novel[30_000:60_000], novel[60_000:]])
    few = names("few")
    p = run("data/prepare.py", f"--input={tmp_path / 'three'}", f"--dataset={few}",
            "--tokenizer=char")
    assert "3 documents, fewer than 1/val_fraction=10: val is the last 10% of the tokens by " \
           "position (10,000 tokens)" in p.stdout, p.stdout
    assert os.path.getsize(os.path.join(DATA_DIR, few, "val.bin")) == 2 * 10_000
    # and a training run reads it
    run("train.py", *TINY, f"--dataset={chars}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2",
        "--eval_interval=2", "--block_size=16")


def test_an_empty_input_is_called_empty(tmp_path, names):
    (tmp_path / "novel.txt").write_text("")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.txt").write_text("")
    (tmp_path / "two" / "b.jsonl").write_text("")
    name = names("empty")
    for spec, words in [(tmp_path / "novel.txt", ["novel.txt is empty"]),
                        (tmp_path / "two", ["a.txt", "b.jsonl", "are empty"])]:
        for tok in ("gpt2", "char"):
            p = run("data/prepare.py", f"--input={spec}", f"--dataset={name}", f"--tokenizer={tok}",
                    check=False)
            one_error_line(p, 1, *words)
            assert "document" not in p.stderr
    assert not os.path.exists(os.path.join(DATA_DIR, name))


def test_odd_text_is_read_not_refused(tmp_path, names):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8\n")
    (tmp_path / "b.txt").write_bytes("\ufeffa byte-order mark first\n".encode("utf-8"))
    (tmp_path / "c.jsonl").write_text('{"text": "a lone surrogate \\ud800 here"}\n{"text": null}\n')
    name = names("odd")
    p = run("data/prepare.py", f"--input={tmp_path}", f"--dataset={name}", "--val_fraction=0.25",
            "--seed=1")
    assert "a.txt is not UTF-8 (byte 3)" in p.stderr
    assert sorted(d for part in split_docs(name).values() for d in part) == \
        ["", "a byte-order mark first\n", "a lone surrogate \ufffd here",
         "caf\ufffd latin-1, not UTF-8\n"]
    # the char vocab takes U+FFFD for the lone surrogate, as BPE does, and --check decodes it
    chars = names("oddchar")
    p = run("data/prepare.py", f"--input={tmp_path}", f"--dataset={chars}", "--tokenizer=char",
            "--val_fraction=0.25", "--check")
    meta = load_meta(os.path.join(DATA_DIR, chars, "meta.pkl"))
    assert "\ufffd" in meta["stoi"] and not any(0xD800 <= ord(c) < 0xE000 for c in meta["stoi"])


def test_openwebtext_offline_local_and_without_datasets(docs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = os.path.join(DATA_DIR, "openwebtext")
    if any(os.path.exists(os.path.join(out, f)) for f in ("train.bin", "val.bin", "prepare.json")):
        pytest.skip("data/openwebtext holds a prepared dataset: not touching it")
    hub = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    try:
        # offline, nothing cached: one line that says what to pass
        p = run("data/openwebtext/prepare.py", env=hub, check=False)
        one_error_line(p, 1, "Skylion007/openwebtext is not in the Hugging Face cache",
                       "HF_DATASETS_OFFLINE", "--input")
        # no datasets installed: one line (datasets blocked the way Python marks a module as absent)
        p = subprocess.run([sys.executable, "-c", "import runpy, sys; "
                            "sys.modules['datasets'] = None; "
                            "sys.argv = ['data/openwebtext/prepare.py']; "
                            "runpy.run_path('data/openwebtext/prepare.py', run_name='__main__')"],
                           cwd=ROOT, env=dict(ENV, **hub), capture_output=True, text=True)
        one_error_line(p, 2, "pip install datasets", "--input")
        # a local folder of Parquet files through datasets, offline; and the same file as --input
        (tmp_path / "pq").mkdir()
        pq.write_table(pa.table({"text": docs}), tmp_path / "pq" / "train-00000-of-00001.parquet")
        p = run("data/openwebtext/prepare.py", f"--hf_dataset={tmp_path / 'pq'}", env=hub)
        # 40 documents, fewer than 1/0.0005: val is the last 0.05% of the tokens, by position
        assert ("40 documents, fewer than 1/val_fraction=2000: val is the last 0.05% of the "
                "tokens" in p.stdout)
        via_hub = [np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16)
                   for s in ("train", "val")]
        assert (gpt2_encoding().decode(np.concatenate(via_hub).tolist())
                == "".join(d + EOT for d in docs))
        assert len(via_hub[1]) == round(0.0005 * sum(map(len, via_hub)))
        p = run("data/openwebtext/prepare.py", f"--input={tmp_path / 'pq'}", env=hub)
        assert "again from the start" in p.stdout
        assert all(np.array_equal(np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16), ids)
                   for s, ids in zip(("train", "val"), via_hub))
    finally:
        for f in ("train.bin", "val.bin", "meta.pkl", "prepare.json", "train.bin.partial",
                  "val.bin.partial"):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
