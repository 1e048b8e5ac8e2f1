"""
OpenAI's GPT-2 weights in (load_gpt2) and our model out (to_hf), through Hugging Face
transformers; from_state_dict builds a GPT around given tensors (an import, or export.py's
checkpoint). transformers is imported inside these functions only, so training from scratch never
pays its few seconds of import. Both models name their tensors alike
(transformer.h.0.attn.c_attn.weight, ...); the differences are HF's Conv1D, which stores (in, out)
where nn.Linear stores (out, in), and its biases.

Library code: weights that cannot be had (not in the cache, offline, not GPT-2, a variant this GPT
does not implement) raise GPT2Error (a script's one line, exit 1); a name that is neither GPT-2's
nor a folder raises configurator.UsageError (the command is wrong: exit 2).
"""
import os

import torch
import torch.nn as nn

from console import RunError, UsageError, first_line
from model import GPT, GPTConfig


class GPT2Error(RunError):
    """GPT-2 weights that cannot be loaded; the message says what was looked for, where, and how to
    get them."""


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M parameters
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_state_dict(config, state_dict):
    """A GPT that takes state_dict's tensors as its parameters: built on the meta device, so there
    is no random init to wait for and no second copy of the weights in memory."""
    model = GPT.skeleton(config)
    model.load_state_dict(state_dict, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # assign gave the tied pair two Parameters
    return model


def _hf_load(load, name, **kwargs):
    """load(name) for a from_pretrained: a folder as it is; a GPT-2 name from the HF cache, else
    from the Hub unless HF_HUB_OFFLINE is set. Every failure is a GPT2Error of one line: what was
    looked for, where, and how to get it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    if os.path.isdir(name):
        try:
            return load(name, **kwargs)
        except Exception as e:  # no config.json, no weights, a truncated file: the same answer
            raise GPT2Error(f"{name} is not a Hugging Face GPT-2 checkpoint folder (config.json "
                            f"and model.safetensors or pytorch_model.bin) ({first_line(e)})")
    cache = constants.HF_HUB_CACHE
    how = (f"on a machine with internet run `hf download {name}` (`huggingface-cli download "
           f"{name}` with older huggingface_hub) and copy its cache to {cache} (or point HF_HOME "
           "at it), or pass a local folder holding the weights as init_from")
    try:
        return load(name, local_files_only=True, **kwargs)
    except Exception:
        pass  # not in the cache (or not all of it): try the Hub
    if constants.HF_HUB_OFFLINE:
        raise GPT2Error(f"GPT-2 weights {name!r} are not in the Hugging Face cache {cache} "
                        f"and HF_HUB_OFFLINE is set; {how}")
    # from_pretrained retries an unreachable Hub for a while; one request without retries
    # (timeout HF_HUB_ETAG_TIMEOUT, 10 s by default) tells at once
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"))
    except Exception as e:
        raise GPT2Error(f"GPT-2 weights {name!r} are not in the Hugging Face cache {cache} and the "
                        f"Hub cannot be reached ({first_line(e)}); {how}")
    try:
        return load(name, **kwargs)
    except Exception as e:
        raise GPT2Error(f"downloading GPT-2 weights {name!r} into {cache} failed "
                        f"({first_line(e)}); {how}")


def load_gpt2(name_or_folder, dropout=None):
    """Our GPT with GPT-2 weights: a name in GPT2_NAMES (HF cache, or downloaded when allowed) or a
    local folder with an HF GPT-2 checkpoint of any size, vocab and context. The shape comes from
    the weights' config.json; dropout is the only setting of ours (None: 0.0, as in nanoGPT)."""
    if not os.path.isdir(name_or_folder) and name_or_folder not in GPT2_NAMES:
        raise UsageError(f"init_from={name_or_folder!r} is neither GPT-2 weights by name "
                         f"({', '.join(GPT2_NAMES)}) nor an existing folder")
    from transformers import AutoConfig
    hf_config = _hf_load(AutoConfig.from_pretrained, name_or_folder)
    if hf_config.model_type != "gpt2":
        raise GPT2Error(f"{name_or_folder} holds a {hf_config.model_type!r} model, not GPT-2")
    c = hf_config
    unsupported = [f"{k}={getattr(c, k)!r}" for k, ok in (
        ("activation_function", c.activation_function in ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", c.n_inner in (None, 4 * c.n_embd)),
        ("layer_norm_epsilon", c.layer_norm_epsilon == 1e-5),
        ("scale_attn_weights", c.scale_attn_weights),
        ("scale_attn_by_inverse_layer_idx", not c.scale_attn_by_inverse_layer_idx),
        ("add_cross_attention", not c.add_cross_attention),
        ("tie_word_embeddings", c.tie_word_embeddings)) if not ok]
    if unsupported:
        raise GPT2Error(f"{name_or_folder} is a GPT-2 variant this GPT does not implement: "
                        f"{', '.join(unsupported)}")
    config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                       n_head=c.n_head, n_embd=c.n_embd,
                       dropout=0.0 if dropout is None else dropout, bias=True)
    from transformers import GPT2LMHeadModel  # imported only now: the slower half of transformers
    from transformers.utils import logging as hf_logging
    # its per-tensor bar is noise in a log; the callers say what is loading
    hf_logging.disable_progress_bar()
    hf = _hf_load(GPT2LMHeadModel.from_pretrained, name_or_folder, config=hf_config,
                  dtype=torch.float32)
    hf_state = hf.state_dict()
    del hf
    # HF's tensors are still mostly on disk (safetensors maps the file). Each is copied into our
    # layout and dropped, so there are never more than two copies of the weights, HF's and ours
    # (one of them the mapped file, freed at return)
    state = {}
    for k in list(hf_state):
        t = hf_state.pop(k)
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of older HF versions; lm_head is tied to wte
        state[k] = t.t().contiguous() if k.endswith(TRANSPOSED) else t.clone()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return from_state_dict(config, state)


def to_hf(model):
    """(GPT2Config, state dict) that GPT2LMHeadModel loads and computes the same logits with.
    vocab_size is exported as trained: a padded 50304 stays 50304, so the export holds exactly
    the trained weights. The padding rows (47 of 50304) are no token of the tokenizer; training has
    taught the model never to predict them."""
    from transformers import GPT2Config
    c = model.config
    eot = 50256 if c.vocab_size > 50256 else None  # <|endoftext|> exists only in a GPT-2 BPE vocab
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                           n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=c.dropout,
                           embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                           activation_function="gelu_new", layer_norm_epsilon=1e-5,
                           bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"])
    state = {}
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":  # tied to wte: HF ties it back (tie_word_embeddings)
            # a view: save_safetensors copies one at a time
            state[k] = v.t() if k.endswith(TRANSPOSED) else v
    if not c.bias:
        # HF's Conv1D and LayerNorm always have a bias. A zero bias adds exactly nothing, so the
        # export computes what our bias-free model does and keeps the standard GPT-2 layout that
        # every GPT-2 tool reads (a config flag to drop biases would be ours alone)
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
                w = module.weight
                state[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return hf_config, state


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64"}


def save_safetensors(tensors, f, metadata):
    """Write tensors as a safetensors file to the binary file f, one tensor at a time: each is made
    contiguous (a transposed view is copied) and written, then let go. safetensors' own save builds
    the whole file in memory first, a second copy of the weights, which is what export.py must not
    take (a 19 GB gpt2-xl checkpoint). The format is that library's: an 8-byte little-endian length,
    a JSON header of dtype, shape and byte range per tensor (and __metadata__), padded to 8 bytes,
    then the bytes; the tests read our files back with safetensors itself."""
    import json
    header, offset = {"__metadata__": metadata}, 0
    for name, t in sorted(tensors.items()):
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(len(blob).to_bytes(8, "little") + blob)
    for name, t in sorted(tensors.items()):
        f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
