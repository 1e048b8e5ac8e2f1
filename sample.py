"""
Sample from a trained model (out_dir's ckpt.pt) or from OpenAI's GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt
"""
import os
import sys

import torch

import checkpoint
from configurator import configure, fail
from dataset import DATA_DIR
from model import GPT, GPTConfig, autocast_context, load_gpt2, one_line_out_of_memory, pick_device, pick_dtype
from tokenizer import CHAR_VOCAB, get_codec

# -----------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (a checkpoint in out_dir) or GPT-2 weights: 'gpt2', ..., 'gpt2-xl', a local HF folder
out_dir = "out"
start = "\n"  # the prompt: text, or FILE:path to read it from a file
num_samples = 10
max_new_tokens = 500
temperature = 0.8  # 1.0 samples the model's distribution as is, lower is more conservative, 0 is greedy
top_k = 200  # sample only among the top_k most likely tokens (0: among all)
seed = 1337
device = "auto"
dtype = "auto"
compile = False
configure(globals())
# -----------------------------------------------------------------------------------------------
one_line_out_of_memory()
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {start[5:]!r} ({getattr(e, 'strerror', None) or e})")

torch.manual_seed(seed)
device = pick_device(device)
dtype = pick_dtype(dtype, device)
ctx = autocast_context(device, dtype)

meta_path = None
if init_from == "resume":
    best = os.path.join(out_dir, checkpoint.BEST)
    try:  # ckpt.pt (best val) as in nanoGPT, else the newest checkpoint that loads
        path, ckpt = best, checkpoint.load(best)
    except checkpoint.CheckpointError as e:
        if os.path.exists(best):
            print(f"warning: skipping {e}; using the newest checkpoint that loads", file=sys.stderr)
        try:  # (ckpt.pt has been reported just now)
            path, ckpt = checkpoint.load_latest(out_dir, log=lambda m: best in m or print(m, file=sys.stderr))
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"error: {e}")
    model = GPT(GPTConfig(**{k: ckpt["model_args"][k] for k in checkpoint.MODEL_ARGS if k in ckpt["model_args"]}))
    model.load_state_dict(ckpt["model"])
    dataset = ckpt.get("config", {}).get("dataset")
    if dataset:  # a char-level run keeps its vocab in the dataset's meta.pkl
        meta_path = os.path.join(DATA_DIR, dataset, "meta.pkl")
    print(f"sampling from {path} (iteration {ckpt.get('iter_num')})", file=sys.stderr)  # stdout: samples only
    del ckpt
else:  # GPT-2 weights: 'gpt2', ..., 'gpt2-xl' or a local Hugging Face folder
    model = load_gpt2(init_from)
    print(f"sampling from {init_from}", file=sys.stderr)
    if os.path.isdir(init_from) and os.path.exists(os.path.join(init_from, CHAR_VOCAB)):
        meta_path = os.path.join(init_from, CHAR_VOCAB)  # a character-level run's export
    elif model.config.vocab_size < 50257:
        raise SystemExit(f"error: {init_from} holds a model with a vocab of {model.config.vocab_size} tokens and no "
                         f"tokenizer for it ({CHAR_VOCAB}, which export.py writes for character-level runs)")

model.eval()
model.to(device)
if compile:
    model = torch.compile(model)

encode, decode = get_codec(meta_path)
try:
    start_ids = encode(start)
except KeyError as e:
    fail(f"the prompt has a character {e} that is not in the model's vocabulary ({meta_path})")
if not start_ids:
    fail("the prompt is empty; give --start=some text")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]

with torch.no_grad(), ctx:
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
        print(decode(y[0].tolist()))
        print("---------------")
