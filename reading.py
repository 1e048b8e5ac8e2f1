"""
The model that sample.py and eval.py read, with its tokenizer: a checkpoint of a run (out_dir's
ckpt.pt, else its newest good one; or the file or FSDP folder --ckpt names, local or remote:
resume.pick_to_read) or GPT-2's weights (a name or a local Hugging Face folder). Only the weights
are read, memory-mapped, and no data/ folder is needed: a checkpoint carries its tokenizer.
"""
import os

import tokenizer
from console import RunError, UsageError
from dataset import DATA_DIR
from gpt2 import from_state_dict, load_gpt2
from keep import resume
from keep.files import MODEL_ARGS
from model import GPTConfig


def read_model(init_from, out_dir, ckpt="", which="best", log=print):
    """(model, tokenizer record, what was read: a line for the console). UsageError for a command
    that names nothing; RunError (CheckpointError, RemoteError, GPT2Error) for files that fail."""
    if ckpt and init_from != "resume":
        raise UsageError(f"--ckpt reads a checkpoint, but --init_from={init_from!r} asks for GPT-2 "
                         f"weights; drop one of them")
    if init_from == "resume":
        path, state = resume.pick_to_read(out_dir, ckpt, which, log=log)
        args = GPTConfig(**{k: state["model_args"][k] for k in MODEL_ARGS})
        model = from_state_dict(args, state["model"])
        try:  # the checkpoint's own tokenizer; an older file's comes from its dataset's meta.pkl
            record, note = tokenizer.of_checkpoint(state, DATA_DIR, path)
        except ValueError as e:
            raise RunError(str(e)) from None
        if note:
            log(note)
        return model, record, f"{path} (iteration {state.get('iter_num')})"
    model = load_gpt2(init_from)  # 'gpt2', ..., 'gpt2-xl' or a local Hugging Face folder
    record = None
    if os.path.isdir(init_from):
        try:
            record = tokenizer.of_file(os.path.join(init_from, tokenizer.CHAR_VOCAB))
        except ValueError as e:
            raise RunError(str(e)) from None
    if record is None and model.config.vocab_size < 50257:
        raise RunError(f"{init_from} holds a model with a vocab of {model.config.vocab_size} "
                       f"tokens and no tokenizer for it ({tokenizer.CHAR_VOCAB}, which export.py "
                       f"writes for character-level runs)")
    return model, record or tokenizer.GPT2, init_from
