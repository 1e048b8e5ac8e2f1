"""A checkpoint is all that generation needs (docs/sampling.md): it carries its tokenizer, so a run
copied without its data folder samples and exports the same; data prepared again under a run is
caught on resume; the default prompt works on a vocab without a newline; nanoGPT's files (no vocab
inside) fall back to meta.pkl with a note; and sample.py, export.py and checkpoint.py read only the
weights (a damaged optimizer record does not stop them, a damaged weight does)."""
import json
import os
import shutil
import struct
import zipfile

import pytest
import torch

from keep.files import CheckpointError, PERIODIC
from keep import store
from conftest import ROOT, TINY, copy_run, project_without_data, run
from dataset import DATA_DIR

GREEDY = ["--num_samples=1", "--max_new_tokens=40", "--temperature=0", "--device=cpu",
          "--start=ROMEO"]


def script(folder, name, *args, check=True):
    """One of the scripts run from another copy of the project (cwd there): it has no data/."""
    return run(os.path.join(folder, name), *args, cwd=folder, check=check)


def record_data_offset(path, index):
    """Where the bytes of storage record data/<index> begin in a checkpoint file."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(f"/data/{index}"))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip(path, index):
    offset, size = record_data_offset(path, index)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        b = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_run_copied_without_its_data_folder_samples_and_exports_the_same(trained, tmp_path):
    here = run("sample.py", f"--out_dir={trained}", *GREEDY).stdout
    elsewhere = project_without_data(tmp_path / "machine")
    out = copy_run(trained, tmp_path / "machine" / "out")
    p = script(elsewhere, "sample.py", f"--out_dir={out}", *GREEDY)
    assert p.stdout == here and "ROMEO" in here and "note" not in p.stderr
    script(elsewhere, "export.py", f"--out_dir={out}", f"--to={tmp_path / 'hf'}")
    ckpt = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    with open(tmp_path / "hf" / "char_vocab.json", encoding="utf-8") as f:
        assert (json.load(f)["itos"] == ckpt["tokenizer"]["itos"]
                and len(ckpt["tokenizer"]["itos"]) == 65)
    assert script(elsewhere, "sample.py", f"--init_from={tmp_path / 'hf'}", *GREEDY).stdout == here
    # a damaged vocab file beside the export is one line, not a traceback
    (tmp_path / "hf" / "char_vocab.json").write_text('{"itos": ', encoding="utf-8")
    p = script(elsewhere, "sample.py", f"--init_from={tmp_path / 'hf'}", *GREEDY, check=False)
    assert (p.returncode == 1 and "Traceback" not in p.stderr
            and "is not a vocab file" in p.stderr), p.stderr


def test_nanogpt_file_without_a_vocab_uses_meta_pkl_with_a_note(trained, tmp_path):
    ckpt = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    nanogpt = {k: ckpt[k]
               for k in ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")}
    (tmp_path / "old").mkdir()
    torch.save(nanogpt, tmp_path / "old" / "ckpt.pt")
    here = run("sample.py", f"--out_dir={trained}", *GREEDY).stdout
    p = run("sample.py", f"--out_dir={tmp_path / 'old'}", *GREEDY)
    assert p.stdout == here
    assert "carries no tokenizer" in p.stderr and "shakespeare_char/meta.pkl" in p.stderr
    # a damaged meta.pkl is one line too
    (tmp_path / "data" / "broken").mkdir(parents=True)
    (tmp_path / "data" / "broken" / "meta.pkl").write_bytes(b"\x80\x04not a pickle")
    old = project_without_data(tmp_path / "machine")
    shutil.copytree(tmp_path / "data", os.path.join(old, "data"))
    torch.save(dict(nanogpt, config=dict(nanogpt["config"], dataset="broken")),
               tmp_path / "old" / "ckpt.pt")
    p = script(old, "sample.py", f"--out_dir={tmp_path / 'old'}", *GREEDY, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert ("meta.pkl cannot be read as a pickle of plain data" in p.stderr
            and "prepare dataset 'broken'" in p.stderr)
    # with neither a vocab inside nor its dataset's meta.pkl: one error line, never GPT-2 BPE
    # guessed
    nanogpt["config"] = dict(nanogpt["config"], dataset=f"gone-{os.getpid()}")
    torch.save(nanogpt, tmp_path / "old" / "ckpt.pt")
    for cmd in (["sample.py", f"--out_dir={tmp_path / 'old'}", *GREEDY],
                ["export.py", f"--out_dir={tmp_path / 'old'}", f"--to={tmp_path / 'hf'}"]):
        p = run(*cmd, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert (p.stderr.count("error:") == 1 and "carries no tokenizer" in p.stderr
                and "meta.pkl" in p.stderr)


def test_sample_export_and_inspect_read_only_the_weights(trained, tmp_path):
    """The optimizer's records are never read: damaged, they stop a resume (load checks every CRC)
    but not sample.py or export.py, which give what they gave before; a damaged weight stops all of
    them."""
    here = run("sample.py", f"--out_dir={trained}", *GREEDY).stdout
    out = copy_run(trained, tmp_path / "out")
    for name in os.listdir(out):
        if name != "ckpt.pt" and name.startswith("ckpt"):
            os.remove(out / name)
    path = out / "ckpt.pt"
    weights = len({t.untyped_storage().data_ptr()
                   for t in torch.load(path, weights_only=True, mmap=True)["model"].values()})
    flip(path, weights + 3)  # an optimizer moment
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        store.load(str(path))
    assert run("sample.py", f"--out_dir={out}", *GREEDY).stdout == here
    run("export.py", f"--out_dir={out}", f"--to={tmp_path / 'hf'}")
    assert run("sample.py", f"--init_from={tmp_path / 'hf'}", *GREEDY).stdout == here
    p = run("checkpoint.py", str(path))
    assert "header only" in p.stdout and "iter_num:      10" in p.stdout
    p = run("checkpoint.py", "verify", str(path), check=False)
    assert p.returncode == 1 and "CRC mismatch" in p.stderr

    flip(path, 1)  # a weight
    for cmd in (["sample.py", f"--out_dir={out}", *GREEDY],
                ["export.py", f"--out_dir={out}", f"--to={tmp_path / 'hf2'}"]):
        p = run(*cmd, check=False)
        assert (p.returncode == 1 and "CRC mismatch" in p.stderr
                and "Traceback" not in p.stderr), p.stderr
    assert not os.path.exists(tmp_path / "hf2")


@pytest.fixture
def dataset(tmp_path):
    """A char dataset of Shakespeare's first 30,000 characters with every newline made a space,
    prepared under the repo's data/ (train.py reads only there), removed afterwards."""
    name = f"test-alone-{os.getpid()}"
    with open(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), encoding="utf-8") as f:
        text = f.read()[:30000].replace("\n", " ")

    def prepare(txt):  # as ten documents: val takes whole ones
        shutil.rmtree(tmp_path / "in", ignore_errors=True)
        (tmp_path / "in").mkdir()
        for i in range(10):
            (tmp_path / "in" / f"doc{i}.txt").write_text(txt[i * 3000:(i + 1) * 3000],
                                                         encoding="utf-8")
        run("data/prepare.py", f"--input={tmp_path / 'in'}", f"--dataset={name}",
            "--tokenizer=char")
    prepare(text)
    yield name, text, prepare
    shutil.rmtree(os.path.join(DATA_DIR, name), ignore_errors=True)


def test_default_prompt_and_data_changed_under_a_run(dataset, tmp_path):
    name, text, prepare = dataset
    out = tmp_path / "out"
    train = ["train.py", *TINY, f"--dataset={name}", f"--out_dir={out}", "--eval_interval=4",
             "--checkpoint_interval=4"]
    run(*train, "--max_iters=4")
    # no --start and no newline in the vocab: the prompt is a symbol it has, and it says which
    p = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=10",
            "--device=cpu")
    assert "no newline" in p.stderr and "' '" in p.stderr and len(p.stdout) > 10

    # the same text with every 'z' made '~': as many symbols, other ids; refused, naming what
    # changed
    assert "z" in text and "~" not in text
    prepare(text.replace("z", "~"))
    p = run(*train, "--max_iters=6", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    err = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "prepared again" in err[0] and "'z'" in err[0] and "'~'" in err[0], err

    # the same vocab, other text (the halves swapped): said in one line, training goes on
    prepare(text[15000:] + text[:15000])
    p = run(*train, "--max_iters=6")
    notes = [line for line in p.stdout.splitlines() if "data under this run changed" in line]
    assert len(notes) == 1 and "train.bin" in notes[0], p.stdout
    assert store.load(str(out / PERIODIC.format(6)))["iter_num"] == 6
