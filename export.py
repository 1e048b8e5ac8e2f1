"""
Export a checkpoint for use outside this project.

    python export.py --out_dir=out-shakespeare --format=hf --to=hf-out/
    python export.py --out_dir=out-shakespeare --which=latest --format=safetensors --to=model.safetensors

--format=hf writes a folder that transformers reads with GPT2LMHeadModel.from_pretrained(folder):
config.json, model.safetensors and, for GPT-2 BPE runs, the tokenizer files vocab.json and
merges.txt (the same files as data/gpt2_bpe/encoder.json and vocab.bpe). A character-level run gets
no tokenizer: HF has none for its vocab, which stays in data/<dataset>/meta.pkl. The vocab is
exported as trained: a padded vocab_size of 50304 stays 50304 (the 47 extra rows are never a token).
The folder also loads back here: --init_from=hf-out in train.py and sample.py.

--format=safetensors writes our own state dict (nanoGPT's names and layout) as one file, without
pickle. transformer.wte.weight is stored once, lm_head.weight is tied to it; model_args are in the
file's metadata:  model = GPT(GPTConfig(**json.loads(safe_open(path, "pt").metadata()["model_args"])))
                  safetensors.torch.load_model(model, path)
"""
import json
import os
import shutil

from safetensors.torch import save_file

import checkpoint
import dataset
import tokenizer
from configurator import configure
from model import GPTConfig, from_state_dict, to_hf

# -----------------------------------------------------------------------------------------------
out_dir = "out"
which = "best"  # 'best': out_dir/ckpt.pt (best val loss, as sample.py); 'latest': the newest checkpoint that loads
ckpt = ""  # a checkpoint file to export instead of out_dir's
format = "hf"  # 'hf': a Hugging Face GPT-2 folder; 'safetensors': our weights alone, one file
to = "hf-out"  # the output folder (hf), or file (safetensors; a folder gets model.safetensors in it)
configure(globals())
# -----------------------------------------------------------------------------------------------

if format not in ("hf", "safetensors"):
    raise SystemExit(f"error: format={format!r} is not one of 'hf', 'safetensors'")
if which not in ("best", "latest"):
    raise SystemExit(f"error: which={which!r} is not one of 'best', 'latest'")
try:
    if ckpt:
        path, state = ckpt, checkpoint.load(ckpt)
    elif which == "best":
        path = os.path.join(out_dir, checkpoint.BEST)
        if not os.path.exists(path) and checkpoint.candidates(out_dir):
            raise SystemExit(f"error: {path} does not exist (it is written when val loss improves); "
                             f"export the newest checkpoint with --which=latest")
        state = checkpoint.load(path)
    else:
        path, state = checkpoint.load_latest(out_dir)
except checkpoint.CheckpointError as e:
    raise SystemExit(f"error: {e}")
model_args = {k: state["model_args"][k] for k in checkpoint.MODEL_ARGS if k in state["model_args"]}
model = from_state_dict(GPTConfig(**model_args), state["model"])
dataset_name = state.get("config", {}).get("dataset") or ""
iter_num = state.get("iter_num")
del state  # the optimizer state is twice the model's size: free it before writing
print(f"exporting {path} (iteration {iter_num}, {model.get_num_params() / 1e6:.2f}M parameters)")

if format == "safetensors":
    if not to.endswith(".safetensors"):
        to = os.path.join(to, "model.safetensors")
    os.makedirs(os.path.dirname(to) or ".", exist_ok=True)
    # safetensors refuses two names for one tensor: lm_head.weight is tied to wte, keep wte
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, to, metadata={"format": "pt", "model_args": json.dumps(model_args),
                                     "iter_num": str(iter_num), "dataset": dataset_name})
    print(f"wrote {to}")
else:
    hf_config, weights = to_hf(model)
    os.makedirs(to, exist_ok=True)
    hf_config.save_pretrained(to)
    # "format": "pt" marks PyTorch tensors, as transformers' own save_pretrained writes it
    save_file(weights, os.path.join(to, "model.safetensors"), metadata={"format": "pt"})
    written = ["config.json", "model.safetensors"]
    char_meta = os.path.join(dataset.DATA_DIR, dataset_name, "meta.pkl") if dataset_name else ""
    if os.path.exists(char_meta):
        print(f"no tokenizer written: a character-level run, its vocab is {char_meta} (HF has no tokenizer for it)")
    elif model_args["vocab_size"] < 50257:
        print(f"no tokenizer written: vocab_size {model_args['vocab_size']} is not GPT-2 BPE's 50257")
    else:  # GPT-2 BPE: HF's GPT2Tokenizer reads the same two files under its own names
        shutil.copyfile(os.path.join(tokenizer.BPE_DIR, "encoder.json"), os.path.join(to, "vocab.json"))
        shutil.copyfile(os.path.join(tokenizer.BPE_DIR, "vocab.bpe"), os.path.join(to, "merges.txt"))
        written += ["vocab.json", "merges.txt"]
    print(f"wrote {', '.join(written)} to {to}")
