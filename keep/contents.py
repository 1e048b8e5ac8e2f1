"""
What a checkpoint holds, judged before anything uses it: a file with valid CRCs may still come
from another program, another version or a hand edit, and each script would otherwise fail on it
with a traceback. check_contents raises CheckpointError naming the file and the first thing wrong.
"""
import functools
import random
import re

import numpy as np
import torch

import tokenizer

from keep.files import FORMAT_VERSION, MODEL_ARGS, CheckpointError, show, strip_prefixes
from keep.rng import python_rng
from model import GPT, GPTConfig


# What a checkpoint holds, judged by check_contents: a file with valid CRCs may still come from
# another program, another version or a hand edit, and each script would otherwise fail on it with a
# traceback.
# nanoGPT's keys (and config)
REQUIRED = ("model", "optimizer", "model_args", "iter_num", "best_val_loss")
# nanoGPT's causal-mask buffer (torch < 2.0): not a weight
MASK = re.compile(r"transformer\.h\.\d+\.attn\.bias")
BLOCK = "transformer.h.0."
SCALER = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _count(v):
    return type(v) is int and v >= 0  # (True is an int to Python, never a count here)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _name(v):
    return v is None or isinstance(v, str)


# metadata that train.py, resume and this file's CLI read, and what each must be
META = dict(run_id=_name, init_from=_name, dataset=_name, branch=_count, world_size=_count,
            train_seconds=_number, tokens_seen=lambda v: v is None or _count(v),
            val_loss=lambda v: v is None or _number(v),
            last_eval=lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                              and _count(v[0]) and _number(v[1])),
            resumes=lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
            scores=lambda v: v is None or (isinstance(v, dict) and all(
                isinstance(k, str) and _number(x) for k, x in v.items())))


def _plain_problem(ckpt):
    """What is wrong with the plain values of a checkpoint, or None."""
    if not _count(ckpt["iter_num"]):
        return f"iter_num is {show(ckpt['iter_num'])}, not a whole number"
    best = ckpt["best_val_loss"]  # nanoGPT stores a 0-d tensor
    if not (_number(best) or isinstance(best, torch.Tensor) and best.numel() == 1
            and best.is_floating_point()):
        return f"best_val_loss is {show(best)}, not a number"
    version = ckpt.get("format_version")
    if version is not None and not _count(version):
        return f"format_version is {show(version)}, not a number"
    if version is not None and version > FORMAT_VERSION:
        return (f"format_version {version}: written by a newer version of this project, which "
                f"reads {FORMAT_VERSION}")
    config = ckpt.get("config", {})
    if not isinstance(config, dict):
        return f"config is {show(config)}, not a dict of the run's settings"
    for k in ("dataset", "init_from"):
        if not _name(config.get(k)):
            return f"config {k}={show(config[k])}, not a name"
    meta = ckpt.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return f"metadata is {show(meta)}, not a dict"
    for k, ok in META.items():
        if meta and k in meta and not ok(meta[k]):
            return f"metadata {k}={show(meta[k])} is of the wrong type"
    if ckpt.get("tokenizer") is not None and _args_problem(ckpt["model_args"]) is None:
        why = tokenizer.problem(ckpt["tokenizer"], ckpt["model_args"]["vocab_size"])
        if why:
            return why
    prints = ckpt.get("data_fingerprint")
    if prints is not None and not (isinstance(prints, dict) and all(
            isinstance(v, list) and len(v) == 2 and _count(v[0]) and isinstance(v[1], str)
            for v in prints.values())):
        return "data_fingerprint is not the bins' sizes and hashes"
    scaler = ckpt.get("scaler")
    if scaler and not (isinstance(scaler, dict) and all(_number(scaler.get(k)) for k in SCALER)):
        return "scaler is not a GradScaler's state"
    rngs = ckpt.get("rng")
    if rngs is not None and not isinstance(rngs, list):
        return f"rng is {show(rngs)}, not a list of the ranks' RNG states"
    for i, r in enumerate(rngs or []):
        try:  # restored into throw-away generators: the process's own stay untouched
            random.Random().setstate(python_rng(r["python"]))
            name, keys, pos, has_gauss, cached = r["numpy"]
            np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss,
                                               cached))
            torch.Generator().set_state(r["torch"])
            if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in r["cuda"]):
                raise TypeError
        except Exception:
            return f"rng of rank {i} is not a state that Python, numpy and torch can restore"
    return None


def _args_problem(args):
    """What keeps GPT(GPTConfig(**model_args)) from being built, or None."""
    if not isinstance(args, dict):
        return f"model_args is {show(args)}, not a dict"
    missing = [k for k in MODEL_ARGS if k not in args]
    if missing:
        return f"model_args lacks {', '.join(missing)}"
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if not _count(args[k]) or args[k] < 1:
            return f"model_args {k}={show(args[k])}, not a whole number >= 1"
    if args["n_embd"] % args["n_head"]:
        return f"model_args n_embd={args['n_embd']} is not a multiple of n_head={args['n_head']}"
    if type(args["bias"]) is not bool:
        return f"model_args bias={show(args['bias'])}, not True or False"
    if not _number(args["dropout"]) or not 0 <= args["dropout"] < 1:
        return f"model_args dropout={show(args['dropout'])}, not a number in [0, 1)"
    return None


@functools.lru_cache(maxsize=4)
def _one_block(n_head, n_embd, block_size, bias, vocab_size):
    """(name, shape) of a one-block GPT's state dict and of its parameters (in the order AdamW's
    groups take them): built on the meta device, so it costs neither memory nor an init."""
    gpt = GPT.skeleton(GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                 bias=bias,
                                 vocab_size=vocab_size))
    return ([(n, tuple(t.shape)) for n, t in gpt.state_dict().items()],
            [(n, tuple(p.shape)) for n, p in gpt.named_parameters()])


def _blocks(pairs, n_layer):
    """A one-block GPT's (name, shape) pairs -> those of n_layer blocks, in the model's order."""
    block = [(n[len(BLOCK):], s) for n, s in pairs if n.startswith(BLOCK)]
    out = []
    for n, s in pairs:
        if not n.startswith(BLOCK):
            out.append((n, s))
        elif n == BLOCK + block[0][0]:
            out += [(f"transformer.h.{i}.{b}", bs) for i in range(n_layer) for b, bs in block]
    return out


def _tensors_problem(model, optimizer, args):
    """What keeps `model` from being exactly GPT(model_args)'s tensors, or `optimizer` from being
    its AdamW's state, or None."""
    if not isinstance(model, dict) or \
            not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in model.items()):
        return "model is not a dict of named tensors"
    model = {k: t for k, t in strip_prefixes(model).items() if not MASK.fullmatch(k)}
    state_dict, params = _one_block(*(args[k] for k in ("n_head", "n_embd", "block_size", "bias",
                                                        "vocab_size")))
    n_layer = args["n_layer"]
    want = len(state_dict) + (n_layer - 1) * sum(n.startswith(BLOCK) for n, _ in state_dict)
    # no file of that model could have so few tensors: not worth listing them
    if n_layer > len(model):
        return f"model holds {len(model)} tensors, GPT(model_args) has {want}"
    shapes = dict(_blocks(state_dict, n_layer))
    missing, extra = [n for n in shapes if n not in model], [n for n in model if n not in shapes]
    if missing:
        return f"model lacks {missing[0]}" + (f" and {len(missing) - 1} more of GPT(model_args)'s "
                                              f"{want} tensors"
                                              if len(missing) > 1 else "")
    if extra:
        return f"model holds {extra[0]}, which GPT(model_args) has no place for" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for n, shape in shapes.items():
        t = model[n]
        if tuple(t.shape) != shape:
            return f"model's {n} has shape {tuple(t.shape)}, GPT(model_args)'s {shape}"
        if not t.is_floating_point() or t.layout != torch.strided:
            return f"model's {n} holds {t.dtype} ({t.layout}), not floating-point weights"
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(groups, list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return "optimizer is not an optimizer's state_dict, with state and param_groups"
    # GPT.configure_optimizers' groups, as nanoGPT's: matrices, then the rest
    order = _blocks(params, n_layer)
    ours = [[p for p in order if len(p[1]) >= 2], [p for p in order if len(p[1]) < 2]]
    if [len(g["params"]) for g in groups] != [len(g) for g in ours]:
        return (f"optimizer's param groups hold {[len(g['params']) for g in groups]} parameters, "
                f"GPT(model_args)'s AdamW {[len(g) for g in ours]}")
    ids = [i for g in groups for i in g["params"]]
    if not all(type(i) is int for i in ids) or len(set(ids)) != len(ids):
        return "optimizer's param groups do not number each parameter once"
    for g in groups:
        betas = g.get("betas", (0.9, 0.95))
        if not all(_number(g[k]) for k in ("lr", "weight_decay", "eps") if k in g) or not (
                isinstance(betas, (list, tuple)) and len(betas) == 2 and all(map(_number, betas))):
            return "optimizer's param groups hold hyperparameters that are not numbers"
    param = dict(zip(ids, (p for g in ours for p in g)))
    for i, st in optimizer["state"].items():
        if i not in param or not isinstance(st, dict):
            return f"optimizer holds state for parameter {show(i)}, which its param groups lack"
        name, shape = param[i]
        for k in ("exp_avg", "exp_avg_sq"):
            t = st.get(k)
            if not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape
                    and t.is_floating_point()):
                what = (f"has shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                        else f"is {show(t)}")
                return f"optimizer's {k} of {name} {what}, not a float tensor of shape {shape}"
        step = st.get("step")
        if not (_number(step) or isinstance(step, torch.Tensor) and step.numel() == 1):
            return f"optimizer's step of {name} is {show(step)}, not a number"
    return None


def check_contents(ckpt, path):
    """Judge what a loaded checkpoint holds, not only its bytes: nanoGPT's keys and their types,
    model_args that make a GPT, `model` exactly that GPT's tensors in their shapes (nanoGPT's
    causal-mask buffers aside), `optimizer` its AdamW's state, and the scaler, RNG, config and
    metadata that a resume restores. The expected names and shapes come from a GPT on the meta
    device, never built for real. Raises CheckpointError naming path and the first thing wrong."""
    missing = [k for k in REQUIRED if k not in ckpt] if isinstance(ckpt, dict) else None
    if missing is None:
        why = f"it holds {show(ckpt)}, not a dict"
    elif missing:
        why = f"no {' and no '.join(map(repr, missing))} key"
    else:  # (each part assumes the ones before it found nothing)
        why = _plain_problem(ckpt) or _args_problem(ckpt["model_args"]) or \
            _tensors_problem(ckpt["model"], ckpt["optimizer"], ckpt["model_args"])
    if why:
        raise CheckpointError(f"{path}: not a GPT checkpoint ({why})")
