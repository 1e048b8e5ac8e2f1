"""
Export a checkpoint for use outside this project.

    python export.py --out_dir=out-shakespeare --format=hf --to=hf-out/
    python export.py --out_dir=out-shakespeare --which=latest --format=safetensors \
        --to=model.safetensors
    python export.py --ckpt=out-shakespeare/ckpt-00000020.pt --to=hf-20/

The checkpoint is picked as sample.py picks it (resume.pick_to_read): --ckpt's file or FSDP folder,
else out_dir's ckpt.pt, or the newest good checkpoint when there is none or it does not load.

--format=hf writes a folder that transformers reads with GPT2LMHeadModel.from_pretrained(folder):
config.json, model.safetensors, export.json (what was exported, from where) and, for GPT-2 BPE
runs, the tokenizer files vocab.json and merges.txt (the same files as data/gpt2_bpe/encoder.json
and vocab.bpe). A character-level run gets char_vocab.json instead: HF has no tokenizer for its
vocab, and sample.py reads that file. The vocab is exported as trained: a padded vocab_size of
50304 stays 50304 (the 47 extra rows are never a token). The folder also loads back here:
--init_from=hf-out in train.py and sample.py.

The checkpoint's weights are read alone, memory-mapped, and written one tensor at a time, so an
export takes about the weights' size in memory, never the whole training state.

--to must be new, empty, or a previous export (it has export.json): that is replaced as a whole (the
new one is written beside it, then renamed into place), so no file of the old export survives into
the new one. A folder holding anything else is refused.

--format=safetensors writes our own state dict (nanoGPT's names and layout) as one file, without
pickle, atomically; an existing file is replaced only if it is such an export itself.
transformer.wte.weight is stored once, lm_head.weight is tied to it; model_args are in the
file's metadata:

    model = GPT(GPTConfig(**json.loads(safe_open(path, "pt").metadata()["model_args"])))
    safetensors.torch.load_model(model, path)
"""
import json
import os
import shutil
import sys

from keep.atomic import OLD_TAG, atomic_write, fsync_tree, replace_folder, temp_name
from configurator import configure
from console import UsageError, fail

# -----------------------------------------------------------------------------------------------
out_dir = "out"  # a run's folder, or its remote_dir (s3://...)
which = "best"  # from out_dir: 'best': ckpt.pt, or else 'latest': the newest good checkpoint
ckpt = ""  # a checkpoint file or FSDP folder (local or s3://...) to read instead of out_dir's
format = "hf"  # 'hf': a Hugging Face GPT-2 folder; 'safetensors': our weights alone, one file
to = "hf-out"  # the output folder (hf), or file (safetensors; a folder gets model.safetensors)
configure(globals())
# -----------------------------------------------------------------------------------------------

MANIFEST = "export.json"  # marks a folder as this script's export: only such a folder is replaced
if format == "safetensors" and not to.endswith(".safetensors"):
    if os.path.isfile(to):
        fail(f"--to={to!r} is a file; give a path ending in .safetensors, or a folder")
    to = os.path.join(to, "model.safetensors")
if format == "hf" and os.path.exists(to):
    if not os.path.isdir(to):
        fail(f"--to={to!r} is a file; --format=hf writes a folder")
    if os.listdir(to) and not os.path.isfile(os.path.join(to, MANIFEST)):
        names = sorted(os.listdir(to))
        raise SystemExit(f"error: {to} holds other files "
                         f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}), not a "
                         "previous export; export into a new or empty folder")

# torch and what uses it (seconds to import) only now: a wrong flag or --to is refused at once
from safetensors import SafetensorError, safe_open  # noqa: E402

from keep.files import CheckpointError, MODEL_ARGS, os_error  # noqa: E402
import dataset  # noqa: E402
from keep import remote, resume  # noqa: E402
import tokenizer  # noqa: E402
from gpt2 import from_state_dict, save_safetensors, to_hf  # noqa: E402
from model import GPTConfig  # noqa: E402

if format == "safetensors" and os.path.exists(to):
    try:
        with safe_open(to, "pt") as f:
            ours = "model_args" in (f.metadata() or {})
    except (SafetensorError, OSError):
        ours = False
    if not ours:
        raise SystemExit(f"error: {to} exists and is not a previous export; pick another --to")
try:  # the weights alone, memory-mapped; the same rule as sample.py's
    path, state = resume.pick_to_read(out_dir, ckpt, which, log=lambda m: print(m, file=sys.stderr))
    record, note = tokenizer.of_checkpoint(state, dataset.DATA_DIR, path)
except UsageError as e:
    fail(str(e))
except (CheckpointError, remote.RemoteError) as e:
    raise SystemExit(f"error: {e}")
except ValueError as e:  # no tokenizer to be found for a small vocab
    raise SystemExit(f"error: {e}")
if note:
    print(note)
model_args = {k: state["model_args"][k] for k in MODEL_ARGS}
model = from_state_dict(GPTConfig(**model_args), state["model"])
dataset_name = state.get("config", {}).get("dataset") or ""
iter_num = state.get("iter_num")
del state
print(f"exporting {path} (iteration {iter_num}, {model.get_num_params() / 1e6:.2f}M parameters)")

if format == "safetensors":  # one file: written whole, then renamed into place
    # one name per tensor: lm_head.weight is tied to wte, keep wte
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    meta = {"format": "pt", "model_args": json.dumps(model_args), "iter_num": str(iter_num),
            "dataset": dataset_name, "tokenizer": json.dumps(record)}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(to)), exist_ok=True)
        atomic_write(to, lambda f: save_safetensors(weights, f, meta))
    except OSError as e:
        raise SystemExit(f"error: could not write {to}: {os_error(e)}") from None
    print(f"wrote {to}")
    sys.exit(0)

# hf: durable as a checkpoint folder is. The folder is written under a temporary name beside `to`,
# every file in it and then the folder fsynced, renamed into place (a previous export there is
# swapped out first and removed after) and the parent fsynced: keep/atomic.replace_folder. Files are
# written with plain open(), so the umask decides who may read them: safetensors' own save_file
# makes owner-only files, and an export is for sharing.
tmp = temp_name(to)
try:
    os.makedirs(tmp)
    hf_config, weights = to_hf(model)
    hf_config.save_pretrained(tmp)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        # "pt": PyTorch tensors, as transformers writes it
        save_safetensors(weights, f, {"format": "pt"})
    written = ["config.json", "model.safetensors"]
    if record["kind"] == "char":
        tokenizer.save_chars(record, tmp)
        written.append(tokenizer.CHAR_VOCAB)
        print(f"a character-level run: its vocab goes into {tokenizer.CHAR_VOCAB} (HF has no "
              "tokenizer for it)")
    elif model_args["vocab_size"] < 50257:  # HF's tokenizer would make ids the model does not have
        print(f"no tokenizer written: vocab_size {model_args['vocab_size']} is smaller than GPT-2 "
              "BPE's 50257")
    else:  # GPT-2 BPE: HF's GPT2Tokenizer reads the same two files under its own names
        shutil.copyfile(os.path.join(tokenizer.BPE_DIR, "encoder.json"),
                        os.path.join(tmp, "vocab.json"))
        shutil.copyfile(os.path.join(tokenizer.BPE_DIR, "vocab.bpe"),
                        os.path.join(tmp, "merges.txt"))
        written += ["vocab.json", "merges.txt"]
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(dict(source=os.path.abspath(path), iter_num=iter_num, dataset=dataset_name,
                       files=written), f)
    fsync_tree(tmp)  # whole on disk before it has its name
    replace_folder(tmp, to)
except BaseException as e:
    # a failed or interrupted export leaves no half-written folder, and the old export
    old = temp_name(to, OLD_TAG)  # where replace_folder puts the old export aside
    if os.path.isdir(old) and not os.path.exists(to):
        os.rename(old, to)
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
        raise SystemExit(f"error: could not write {to}: {os_error(e)}") from None
    raise
print(f"wrote {', '.join(written + [MANIFEST])} to {to}")
