"""Sampling: the KV cache computes the tokens that running the whole window computes (greedy and
sampled, prompts shorter than, equal to and longer than block_size, generations that cross it),
a sample is the same in any batch, a lone sample is printed as it is generated and equals the
final text, and stop_at_eot ends a GPT-2 BPE sample at <|endoftext|>."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ENV, ROOT, copy_run, run
from model import GPT, GPTConfig

T = 16  # block_size of the tiny model


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=T, vocab_size=50, n_layer=2, n_head=2, n_embd=32,
                         dropout=0.0)).eval()


def generators(rows, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in rows]


def sliding_by_one(model, idx, n):
    """nanoGPT's loop, the definition of keep=block_size: every token from the newest block_size."""
    for _ in range(n):
        logits, _ = model(idx[:, -T:])
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("prompt", [1, 7, T, T + 7])
def test_the_cache_gives_the_tokens_of_the_whole_window(prompt):
    model = tiny()
    idx = torch.randint(50, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    new = 3 * T  # crosses block_size at least twice whatever the prompt
    greedy = model.generate(idx, new, temperature=0)
    assert (greedy.shape == (2, prompt + new)
            and torch.equal(greedy, sliding_by_one(model, idx, new)))
    for keep in (T, 12, 1):  # slide by one, cut to 3/4 of the window, keep only the newest token
        for temperature, top_k in ((0, None), (1.0, None), (0.8, 5)):
            cached, full = (model.generate(idx, new, temperature, top_k, keep=keep,
                                           generators=generators(range(2)),
                                           use_cache=use) for use in (True, False))
            assert torch.equal(cached, full), (keep, temperature, top_k)
    with pytest.raises(ValueError):
        model.generate(idx, 3, keep=T + 1)


def test_a_sample_is_the_same_in_any_batch():
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    batch = model.generate(prompt.expand(4, -1), 2 * T, 0.8, 10, generators=generators(range(4)))
    for i in range(4):
        assert torch.equal(batch[i:i + 1],
                           model.generate(prompt, 2 * T, 0.8, 10, generators=generators([i])))
    # and the samples differ from one another
    assert len({tuple(row) for row in batch.tolist()}) == 4


def test_n_vocab_leaves_the_padding_rows_out():
    model = tiny()
    out = model.generate(torch.zeros((8, 1), dtype=torch.long), 40, temperature=5.0, top_k=0,
                         n_vocab=10)
    assert out.max() < 10 and len(set(out.flatten().tolist())) == 10


def sample(*args):
    return run("sample.py", "--device=cpu", *args).stdout


def test_batched_samples_equal_single_ones_and_the_stream(trained):
    args = [f"--out_dir={trained}", "--num_samples=3", "--max_new_tokens=80", "--start=ROMEO:"]
    one_by_one = sample(*args, "--max_batch=1")  # each streamed, as it is alone in its batch
    assert one_by_one.count("---------------\n") == 3 and one_by_one.startswith("ROMEO:")
    assert (sample(*args) == sample(*args, "--max_batch=2")
            == sample(*args, "--max_batch=1", "--stream=False") == one_by_one)
    assert sample(*args, "--seed=2") != one_by_one
    greedy = sample(*args, "--max_batch=1", "--temperature=0")
    assert sample(*args, "--temperature=0") == greedy


def test_a_lone_sample_is_printed_as_it_is_generated(trained):
    args = [sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={trained}", "--device=cpu",
            "--num_samples=1", "--max_new_tokens=5000", "--start=ROMEO:"]
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # sample.py flushes by itself
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    first = b""
    while len(first) < 20:  # the prompt, then the first tokens
        first += os.read(proc.stdout.fileno(), 4096)
    assert proc.poll() is None  # while 5000 tokens are still being generated
    streamed = first + proc.stdout.read()
    assert proc.wait() == 0
    assert streamed.decode() == sample(*args[2:], "--stream=False")


@pytest.mark.parametrize("n", [1, 3])  # streamed, and printed per batch
def test_a_reader_that_goes_away_is_no_error(trained, n):
    """`python sample.py | head -c 10`: sample.py ends quietly, exit 0, as other command-line tools
    do."""
    args = [sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={trained}", "--device=cpu",
            f"--num_samples={2 * n}", f"--max_batch={n}", "--max_new_tokens=2000"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(os.read(proc.stdout.fileno(), 10)) > 0
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read().decode().strip().splitlines() == \
        [f"sampling from {trained}/ckpt.pt (iteration 10)"]


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory):
    """A GPT-2 BPE-vocab model whose next token is <|endoftext|> with probability ~0.05 at every
    step: ln_f puts out the same vector b whatever the input, and only <|endoftext|>'s embedding
    is aligned with b."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32))
    b = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(b)
        hf.transformer.wte.weight[50256] = 7.9 * b  # e^7.9 / (e^7.9 + 50256) = 0.05
    folder = str(tmp_path_factory.mktemp("eot") / "hf")
    hf.save_pretrained(folder)
    return folder


def test_stop_at_eot_ends_each_sample_there(eot_model):
    args = [f"--init_from={eot_model}", "--num_samples=6", "--max_new_tokens=60",
            "--temperature=1.0", "--top_k=0", "--start=Hello"]
    full = sample(*args).split("\n---------------\n")[:6]
    stopped = sample(*args, "--stop_at_eot=True").split("\n---------------\n")[:6]
    assert sum("<|endoftext|>" in s for s in full) >= 3  # most samples meet one
    for f, s in zip(full, stopped):
        assert s == f.split("<|endoftext|>")[0] and s.startswith("Hello")
    one = sample(*args, "--num_samples=1", "--stop_at_eot=True")  # streamed, stopped alike
    assert one == stopped[0] + "\n---------------\n"


SAMPLED = re.compile(r"sampling from (\S+) \(iteration (\d+)\)")
EXPORTED = re.compile(r"exporting (\S+) \(iteration (\d+),")


def picks(tmp_path, *flags):
    """(path, iteration) that sample.py and export.py each read, given the same flags."""
    s = run("sample.py", *flags, "--device=cpu", "--num_samples=1", "--max_new_tokens=2")
    to = tmp_path / f"e{len(os.listdir(tmp_path))}.safetensors"
    e = run("export.py", *flags, "--format=safetensors", f"--to={to}")
    return (SAMPLED.search(s.stderr).groups(), EXPORTED.search(e.stdout).groups(),
            s.stderr + e.stderr)


def test_sample_and_export_read_a_chosen_checkpoint(trained, tmp_path):
    """--ckpt names the checkpoint file (or FSDP folder) to read, in sample.py as in export.py; an
    out_dir that is a checkpoint file is one line that points at --ckpt."""
    chosen = os.path.join(trained, "ckpt-00000005.pt")
    s, e, _ = picks(tmp_path, f"--ckpt={chosen}")
    assert s == e == (chosen, "5")
    for script in ("sample.py", "export.py"):
        p = run(script, f"--out_dir={chosen}", check=False)
        assert p.returncode == 2 and p.stderr.strip() == \
            f"error: out_dir {chosen!r} is a checkpoint file, not a folder; to read it give " \
            f"--ckpt={chosen}", p.stderr
    p = run("sample.py", f"--ckpt={chosen}", "--init_from=gpt2", check=False)
    assert p.returncode == 2 and p.stderr.strip() == \
        "error: --ckpt reads a checkpoint, but --init_from='gpt2' asks for GPT-2 weights; drop " \
        "one of them", p.stderr


def test_sample_and_export_pick_the_same_checkpoint(trained, tmp_path):
    """From an out_dir both read ckpt.pt (the best val loss), else (there is none, or it does not
    load) the newest good checkpoint, saying so; --which=latest the newest good one."""
    out = copy_run(trained, tmp_path / "run")
    # the best val loss was at iteration 5
    shutil.copyfile(out / "ckpt-00000005.pt", out / "ckpt.pt")
    work = tmp_path / "exports"
    work.mkdir()
    s, e, _ = picks(work, f"--out_dir={out}")
    assert s == e == (str(out / "ckpt.pt"), "5")
    s, e, _ = picks(work, f"--out_dir={out}", "--which=latest")
    assert s == e == (str(out / "ckpt-00000010.pt"), "10")
    (out / "ckpt.pt").write_bytes(b"damaged")
    s, e, said = picks(work, f"--out_dir={out}")
    assert (s == e == (str(out / "ckpt-00000010.pt"), "10")
            and said.count(f"warning: skipping {out / 'ckpt.pt'}") == 2)
    os.remove(out / "ckpt.pt")
    s, e, said = picks(work, f"--out_dir={out}")
    assert s == e == (str(out / "ckpt-00000010.pt"), "10")
    assert said.count(f"note: {out} has no ckpt.pt (written when val loss improves): reading the "
                      "newest good checkpoint, ckpt-00000010.pt") == 2, said
