"""
Sample from a trained model (out_dir's ckpt.pt, or a checkpoint named by --ckpt) or from OpenAI's
GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --ckpt=out-shakespeare-char/ckpt-00001000.pt
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt

A checkpoint is all it needs: the weights are read alone, memory-mapped (load_weights),
and the text is decoded with the checkpoint's own tokenizer, so no data/ folder is read.
Samples are generated with a KV cache, num_samples at a time (up to max_batch), and a lone
sample is printed as it is generated. Sample i draws from its own generator seeded by (seed, i),
so it is the same whatever max_batch is.
"""
import codecs
import os
import sys

from configurator import configure
from console import RunError, UsageError, fail

# -----------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (a checkpoint in out_dir), 'gpt2'...'gpt2-xl', or a local HF folder
out_dir = "out"  # a run's folder, or its remote_dir (s3://...)
which = "best"  # from out_dir: 'best': ckpt.pt, or else 'latest': the newest good checkpoint
ckpt = ""  # a checkpoint file or FSDP folder (local or s3://...) to read instead of out_dir's
start = ""  # the prompt: text or FILE:path; empty: "\n", or the vocab's first symbol if it has none
num_samples = 10
max_new_tokens = 500
temperature = 0.8  # 1.0: the model's distribution as is, lower is more conservative, 0 is greedy
top_k = 200  # sample only among the top_k most likely tokens (0: among all)
seed = 1337
max_batch = 16  # samples generated together, at most (the KV cache grows with it)
stream = True  # print a sample as it is generated, when alone (num_samples=1 or max_batch=1)
stop_at_eot = False  # GPT-2 BPE: end a sample at <|endoftext|> (not printed)
# Past block_size tokens the context is cut to its newest window_keep of block_size and re-read
# once (see GPT.tokens); 1.0 slides by one token as nanoGPT does, a full forward pass per token
window_keep = 0.75
device = "auto"
dtype = "auto"
configure(globals())
# -----------------------------------------------------------------------------------------------
if ckpt and init_from != "resume":
    fail(f"--ckpt reads a checkpoint, but --init_from={init_from!r} asks for GPT-2 weights; drop "
         "one of them")
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {start[5:]!r} ({getattr(e, 'strerror', None) or e})")

# torch and what uses it (seconds to import) only now: a wrong flag is refused at once
import numpy as np  # noqa: E402
import torch  # noqa: E402

import tokenizer  # noqa: E402
from devices import (DeviceError, autocast_context, one_line_out_of_memory,  # noqa: E402
                     pick_device, pick_dtype)
from model import cpu_decoding_layout  # noqa: E402
from reading import read_model  # noqa: E402

one_line_out_of_memory("lower max_batch (the KV cache grows with it) or max_new_tokens")
# a console that cannot show a character gets a '?', not a traceback
sys.stdout.reconfigure(errors="replace")

try:
    device = pick_device(device)
except DeviceError as e:
    raise SystemExit(f"error: {e}")
dtype = pick_dtype(dtype, device)
ctx = autocast_context(device, dtype)

try:  # ckpt.pt, else the newest good checkpoint (resume.pick_to_read), or GPT-2's weights
    model, record, what = read_model(init_from, out_dir, ckpt, which,
                                     log=lambda m: print(m, file=sys.stderr))
except UsageError as e:
    fail(str(e))
except RunError as e:
    raise SystemExit(f"error: {e}")
print(f"sampling from {what}", file=sys.stderr)  # stdout: samples only

model.eval()
model.to(device)
if device == "cpu" and dtype == "float32":  # (under autocast every matmul casts its weights anyway)
    cpu_decoding_layout(model)

codec = tokenizer.codec(record)
if stop_at_eot and codec.eot is None:
    fail("stop_at_eot=True needs a GPT-2 BPE model; a character vocab has no <|endoftext|>")
if not start:
    start, why = tokenizer.default_prompt(codec)
    if why:
        print(f"note: {why}", file=sys.stderr)
if not codec.has(start):
    missing = "".join(sorted({c for c in start if not codec.has(c)}))
    fail(f"the prompt has characters the model's vocabulary lacks: {missing[:20]!r}")
start_ids = codec.encode(start)
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
keep = max(1, round(window_keep * model.config.block_size))
# a padded vocab's extra rows are no token: never drawn
n_vocab = min(codec.size, model.config.vocab_size)


def generate(first, n):
    """Samples first .. first+n-1 as one batch: lists of new token ids, each cut at <|endoftext|>
    when stop_at_eot. A lone sample is printed as it goes when stream is on (and [] returned)."""
    # torch's CPU generator keeps 32 bits of a seed: SeedSequence mixes (seed, i) into them
    generators = [torch.Generator(device).manual_seed(
                      int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                  for i in range(first, first + n)]
    steps = model.tokens(x.expand(n, -1), max_new_tokens, temperature, top_k, keep, generators,
                         n_vocab)
    live = stream and n == 1
    # nothing to do per token, so no wait for the device per token either
    if not (stop_at_eot or live):
        return torch.cat(list(steps), dim=1).tolist()
    rows, ended = [[] for _ in range(n)], [False] * n
    # a BPE token may end mid-character
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if live:
        sys.stdout.write(text.decode(b"".join(codec.token_bytes(i) for i in start_ids)))
    for step in steps:
        for row, token in enumerate(step[:, 0].tolist()):
            ended[row] = ended[row] or (stop_at_eot and token == codec.eot)
            if not ended[row]:
                rows[row].append(token)
                if live:
                    sys.stdout.write(text.decode(codec.token_bytes(token)))
                    sys.stdout.flush()
        if all(ended):
            break
    if not live:
        return rows
    sys.stdout.write(text.decode(b"", final=True) + "\n---------------\n")
    return []


try:
    with torch.no_grad(), ctx:
        for first in range(0, num_samples, max_batch):
            for row in generate(first, min(max_batch, num_samples - first)):
                print(codec.decode(start_ids + row))
                print("---------------", flush=True)
except BrokenPipeError:  # the reader went away (| head): nothing left to print to, not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
