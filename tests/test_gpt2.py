"""GPT-2 weights in and out: the import computes what transformers computes, a local HF folder
fine-tunes and resumes, exports load back into transformers unchanged, missing weights give one
clear line, and the GPT-2 BPE data scripts count right. CPU only, no network: the GPT-2 weights
here are tiny random ones written with transformers itself."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model
from transformers import GPT2Config, GPT2LMHeadModel

from keep.files import BEST, PERIODIC
from keep import store
from console import UsageError
from conftest import ROOT, run, start
from gpt2 import GPT2Error, load_gpt2
from model import GPT, GPTConfig

# initializer_range well above GPT-2's 0.02 spreads the logits, so greedy decoding has no near-ties
TINY_HF = dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=100,
               initializer_range=0.2, bos_token_id=None, eos_token_id=None)
CPU = ["--device=cpu", "--compile=False", "--batch_size=2", "--gradient_accumulation_steps=1",
       "--eval_iters=2", "--eval_interval=2", "--checkpoint_interval=2", "--log_interval=1"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A GPT-2 checkpoint folder as transformers writes it (config.json + model.safetensors)."""
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("hf") / "tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(**TINY_HF)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dataset():
    """train.py reads data/<dataset>/, so a few random token bins live there for this module only.
    No meta.pkl: to train.py this is BPE-style data whose vocab comes from the model."""
    name = "_test_gpt2_tiny"
    folder = os.path.join(ROOT, "data", name)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 1000)):
        rng.integers(0, TINY_HF["vocab_size"], n).astype(np.uint16).tofile(
            os.path.join(folder, f"{split}.bin"))
    yield name
    shutil.rmtree(folder)


def logits_of(model, idx):
    """Every position's logits: our forward returns them all only when given targets."""
    with torch.no_grad():
        return model(idx, idx)[0] if isinstance(model, GPT) else model(idx).logits


def load_ours(path):
    ckpt = store.load(path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def assert_hf_equal(folder, ours, vocab_size):
    hf, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert (not info["missing_keys"] and not info["unexpected_keys"]
            and not info["mismatched_keys"]), info
    idx = torch.randint(0, vocab_size, (2, ours.config.block_size))
    assert (logits_of(hf.eval(), idx) - logits_of(ours, idx)).abs().max() <= 1e-4


def test_import_matches_transformers(hf_folder):
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    ours = load_gpt2(hf_folder).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.bias, c.dropout) == \
        (2, 2, 64, 64, 100, True, 0.0)
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied
    torch.manual_seed(0)
    for T in (1, 7, 64):
        idx = torch.randint(0, 100, (2, T))
        ref = logits_of(hf, idx)
        assert (logits_of(ours, idx) - ref).abs().max() <= 1e-4
        with torch.no_grad():
            last = ours(idx)[0]  # without targets: the last position only
        assert last.shape == (2, 1, 100) and (last[:, 0] - ref[:, -1]).abs().max() <= 1e-4

    prompt = torch.randint(0, 100, (2, 5))
    # top_k=1: sampling is argmax; the KV cache, up to 64
    ours_tokens = ours.generate(prompt, 59, top_k=1)
    hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=59,
                            do_sample=False, pad_token_id=0)
    assert torch.equal(ours_tokens, hf_tokens)
    assert torch.equal(ours.generate(prompt, 59, temperature=0, use_cache=False), hf_tokens)
    assert load_gpt2(hf_folder, dropout=0.1).config.dropout == 0.1


def test_finetune_gpt2_weights_under_fsdp(hf_folder, tiny_dataset, tmp_path):
    """GPT-2 weights (a local HF folder: biases, tied embedding) fine-tuned with FSDP on 2 ranks:
    every loss and the final weights as one process's, the periodic checkpoints folders."""
    from metrics import read_rows
    args = [*CPU, f"--dataset={tiny_dataset}", "--block_size=32", f"--init_from={hf_folder}",
            "--max_iters=4", "--gradient_accumulation_steps=2"]
    run("train.py", *args, f"--out_dir={tmp_path / 'one'}")
    job = start(*args, f"--out_dir={tmp_path / 'fsdp'}", "--parallelism=fsdp",
                torchrun=["--nproc_per_node=2"])
    stdout = job.communicate(timeout=300)[0]
    assert job.returncode == 0, stdout
    losses = [[r["loss"] for r in read_rows(tmp_path / out / "metrics.jsonl")
               if r["kind"] == "train"]
              for out in ("one", "fsdp")]
    assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses)) <= 1e-5
    one = store.load(str(tmp_path / "one" / "ckpt-00000004.pt"))
    sharded = store.load(str(tmp_path / "fsdp" / "ckpt-00000004"))
    assert (sharded["model_args"] == one["model_args"]
            and sharded["metadata"]["init_from"] == hf_folder)
    for k in one["model"]:
        torch.testing.assert_close(sharded["model"][k], one["model"][k], rtol=0, atol=1e-5)


def test_finetune_local_folder_resume_and_export(hf_folder, tiny_dataset, tmp_path):
    out = str(tmp_path / "out")
    args = [*CPU, f"--dataset={tiny_dataset}", f"--out_dir={out}", "--block_size=32"]
    run("train.py", *args, f"--init_from={hf_folder}", "--max_iters=4")
    ckpt = store.load(os.path.join(out, PERIODIC.format(4)))
    assert ckpt["model_args"] == dict(n_layer=2, n_head=2, n_embd=64, block_size=32, bias=True,
                                      vocab_size=100, dropout=0.0)
    assert ckpt["iter_num"] == 4 and ckpt["metadata"]["init_from"] == hf_folder

    first = open(os.path.join(out, PERIODIC.format(2)), "rb").read()
    # the same command again (a re-queued job) with a longer max_iters: continues, never re-imports
    p = run("train.py", *args, f"--init_from={hf_folder}", "--max_iters=6")
    assert ("continuing it" in p.stdout and "at iteration 4" in p.stdout
            and "changed on resume: max_iters 4 -> 6" in p.stdout)
    assert "iter 4:" in p.stdout and "iter 3:" not in p.stdout
    assert open(os.path.join(out, PERIODIC.format(2)), "rb").read() == first
    # another run's command into this out_dir
    p = run("train.py", *args, "--init_from=scratch", check=False)
    assert (p.returncode == 1 and f"began from {hf_folder!r}" in p.stderr
            and "--init_from=resume" in p.stderr)
    ckpt = store.load(os.path.join(out, PERIODIC.format(6)))
    # still says where it began
    assert ckpt["iter_num"] == 6 and ckpt["metadata"]["init_from"] == hf_folder

    # export: to an HF folder (the newest checkpoint), and as one safetensors file (a given file)
    ours, _ = load_ours(os.path.join(out, PERIODIC.format(6)))
    hf_out = str(tmp_path / "hf-out")
    p = run("export.py", f"--out_dir={out}", "--which=latest", "--format=hf", f"--to={hf_out}")
    assert "no tokenizer written" in p.stdout
    assert sorted(os.listdir(hf_out)) == ["config.json", "export.json", "model.safetensors"]
    assert_hf_equal(hf_out, ours, 100)
    back = load_gpt2(hf_out).eval()  # an export is itself a local folder to start from
    idx = torch.randint(0, 100, (2, 32))
    assert (logits_of(back, idx) - logits_of(ours, idx)).abs().max() <= 1e-4

    path = os.path.join(out, PERIODIC.format(6))
    run("export.py", f"--ckpt={path}", "--format=safetensors", f"--to={tmp_path / 'w.safetensors'}")
    weights = load_file(tmp_path / "w.safetensors")
    state = ours.state_dict()
    assert set(weights) == set(state) - {"lm_head.weight"}  # tied: stored once, as wte
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        model_args = json.loads(f.metadata()["model_args"])
    again = GPT(GPTConfig(**model_args))
    load_model(again, tmp_path / "w.safetensors")
    assert (logits_of(again.eval(), idx) - logits_of(ours, idx)).abs().max() == 0


def syscalls(log):
    """(call, paths) in the order strace -y logged them, successful calls only: fsync and fdatasync
    with the path of their descriptor, rename* with (from, to), openat with O_CREAT with the file
    made."""
    calls = []
    for line in log.splitlines():
        if m := re.search(r"\b(?:fsync|fdatasync)\(\d+<(.*?)>\)\s+= 0", line):
            calls.append(("fsync", (m[1],)))
        elif m := re.search(r'\brename(?:at2?)?\((?:[^"]*?, )?"(.*?)", (?:[^"]*?, )?"(.*?)".*= 0',
                            line):
            calls.append(("rename", tuple(os.path.join(ROOT, p) for p in m.groups())))
        elif m := re.search(r"\bopenat\(.*O_CREAT.*= \d+<(.*?)>", line):
            calls.append(("create", (m[1],)))
    return calls


def assert_durable_folder(calls, folder):
    """folder was renamed into place from a temp folder in which every file (under its final name,
    or a name it was renamed from) was fsynced, then the temp folder itself, after its last entry
    was made; and after the rename, its parent was fsynced."""
    moved = [i for i, (call, p) in enumerate(calls) if call == "rename" and p[1] == folder]
    assert moved, f"{folder} was never renamed into place"
    at = moved[-1]
    tmp = calls[at][1][0]
    assert os.path.dirname(tmp) == os.path.dirname(folder)
    synced = {p[0] for call, p in calls[:at] if call == "fsync"}
    for name in os.listdir(folder):
        names = {os.path.join(tmp, name)}
        for call, p in reversed(calls[:at]):  # the names the file had before (atomic_write's temp)
            if call == "rename" and p[1] in names:
                names.add(p[0])
        assert names & synced, f"{name} was not fsynced before {folder} was renamed into place"
    last_entry = max(i for i, (call, p) in enumerate(calls[:at]) if os.path.dirname(p[-1]) == tmp)
    assert any(call == "fsync" and p[0] == tmp for call, p in calls[last_entry:at]), \
        "the folder was not fsynced after its last file went in, before its rename"
    assert ("fsync", (os.path.dirname(folder),)) in calls[at:], ("the parent folder was not "
                                                                 "fsynced after the rename")


def test_export_is_durable(trained, tmp_path):
    """An HF export, new and replacing a previous one, is on disk whole before it has its name, and
    its name is on disk when export.py says it wrote it (a power cut loses neither): read from
    the syscalls themselves, strace -y naming the file of every fsync."""
    to = str(tmp_path.resolve() / "hf")
    log = tmp_path / "strace.log"
    for _ in range(2):  # a new folder, then a previous export replaced
        run("export.py", f"--out_dir={trained}", f"--to={to}",
            prefix=["strace", "-f", "-qq", "-y", "-e",
                    "trace=fsync,fdatasync,rename,renameat,renameat2,openat", "-o", str(log)])
        assert sorted(os.listdir(to)) == ["char_vocab.json", "config.json", "export.json",
                                          "model.safetensors"]
        assert_durable_folder(syscalls(log.read_text()), to)
    # neither the temp nor the replaced folder is left
    assert sorted(os.listdir(tmp_path)) == ["hf", "strace.log"]


def test_export_bias_free_bpe_model(tiny_dataset, tmp_path):
    # from scratch: train.py's default bias=False and, with no meta.pkl, the padded GPT-2 vocab
    # 50304
    out = str(tmp_path / "out")
    run("train.py", *CPU, f"--dataset={tiny_dataset}", f"--out_dir={out}", "--n_layer=1",
        "--n_head=2", "--n_embd=32", "--block_size=16", "--max_iters=2")
    p = run("export.py", f"--out_dir={out}", f"--to={tmp_path / 'hf'}")  # --which=best: ckpt.pt
    ours, ckpt = load_ours(os.path.join(out, BEST))
    assert ckpt["model_args"]["bias"] is False and ckpt["model_args"]["vocab_size"] == 50304
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "export.json", "merges.txt",
                                                   "model.safetensors", "vocab.json"]
    assert "vocab.json" in p.stdout
    hf_config = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_config["vocab_size"] == 50304 and hf_config["n_positions"] == 16
    assert_hf_equal(str(tmp_path / "hf"), ours, 50304)
    with open(os.path.join(ROOT, "data", "gpt2_bpe", "vocab.bpe"), "rb") as a, \
            open(tmp_path / "hf" / "merges.txt", "rb") as b:
        assert a.read() == b.read()


def one_error_line(text, *words):
    text = text.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in text, text
    for w in words:
        assert w in text, text


def test_missing_gpt2_weights_offline(tmp_path):
    """Offline, the answer comes without trying the network: no connect() to any address (not even
    DNS)."""
    trace = tmp_path / "connects"
    p = run("sample.py", "--init_from=gpt2-xl", "--device=cpu", check=False,
            prefix=("strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace)),
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path),
                 "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert trace.exists() and "AF_INET" not in trace.read_text()
    assert p.returncode != 0
    one_error_line(p.stderr, "gpt2-xl", "download gpt2-xl", str(tmp_path / "hub"), "local folder")


def test_not_gpt2_weights(tmp_path):
    """The library raises (a script makes it one line): GPT2Error when the folder is there but its
    contents are not GPT-2 (exit 1), UsageError for a mistyped name (the command is wrong: exit
    2)."""
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    for what, words in ((tmp_path / "bert", ["bert", "not GPT-2"]),
                        (tmp_path / "empty", ["not a Hugging Face GPT-2"])):
        with pytest.raises(GPT2Error) as e:
            load_gpt2(str(what))
        one_error_line(f"error: {e.value}", *words)
    with pytest.raises(UsageError) as e:
        load_gpt2("gpt3")
    one_error_line(f"error: {e.value}", "gpt3", "gpt2-xl", "folder")
    p = run("sample.py", f"--init_from={tmp_path / 'bert'}", "--device=cpu", check=False)
    assert p.returncode == 1
    one_error_line(p.stderr, "bert", "not GPT-2")


def test_shakespeare_bpe_prepare():
    p = run("data/shakespeare/prepare.py")
    assert "train has 301,966 tokens" in p.stdout and "val has 36,059 tokens" in p.stdout
    folder = os.path.join(ROOT, "data", "shakespeare")
    train = np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16)
    assert (len(train) == 301_966
            and len(np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)) == 36_059)
    from tokenizer import gpt2_encoding
    assert gpt2_encoding().decode(train[:3].tolist()) == "First Citizen:"
