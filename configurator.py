"""
Config for train.py, sample.py, bench.py and export.py: their plain-valued globals are the config.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Each positional argument is a Python file executed into the script's globals; each --key=value
then overrides one global, the value read as a Python literal (or taken as a string if it is not
one); a bare --key sets a True/False knob to True. Then every value is checked (RANGES, CHOICES, NOT_EMPTY, and values that must fit
together), once, here, for whichever of these keys a script has. Mistakes end with one line on
stderr and exit code 2, never a traceback.

Exit codes, the same in every script: 2 when the command is wrong (an unknown key, a value of the
wrong type, out of range or not fitting the data or the model, a config or prompt file that cannot
be read, an out_dir that is a file), 1 when the command is fine but the files or the run stop it
(no prepared dataset, no usable checkpoint, a folder holding another run, a failed write, a
diverged loss, out of memory).
"""
import ast
import difflib
import math
import os
import sys
import types

PLAIN = (int, float, bool, str, type(None))


def config_keys(namespace):
    """The names a user may set: public globals holding plain values."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, PLAIN)]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    fail(f"unknown config key {key!r} {where}{hint}")


def _coerce(key, value, default, where):
    """value as the type of default: int -> float is fine, anything else that differs is an error."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    fail(f"{key} {where} must be {type(default).__name__} (like {default!r}), got {type(value).__name__} {value!r}")


# (lowest, highest) allowed for numeric knobs, None for no bound; a float must also be finite
AT_LEAST_1 = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_size", "gradient_accumulation_steps",
              "eval_interval", "log_interval", "eval_iters", "keep_last", "num_samples", "max_new_tokens",
              "timed_steps", "max_batch", "num_proc", "windows")
AT_LEAST_0 = ("max_iters", "warmup_iters", "lr_decay_iters", "checkpoint_interval", "keep_every",
              "checkpoint_minutes", "warmup_steps", "learning_rate", "min_lr", "weight_decay", "grad_clip",
              "peak_flops", "temperature", "top_k")
RANGES = {**{k: (1, None) for k in AT_LEAST_1}, **{k: (0, None) for k in AT_LEAST_0},
          "dropout": (0, 0.999), "beta1": (0, 0.999999), "beta2": (0, 0.999999), "seed": (0, 2**32 - 1),
          "window_keep": (0, 1), "shard_mb": (0.001, None)}
CHOICES = {"backend": ("auto", "nccl", "gloo"), "dtype": ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
           "format": ("hf", "safetensors"), "which": ("best", "latest"), "mode": ("train", "checkpoint"),
           "tokenizer": ("gpt2", "char"), "parallelism": ("ddp", "fsdp")}
NOT_EMPTY = ("out_dir", "dataset", "device", "to", "text_field")


def check(namespace):
    """Every rule below that applies to the keys namespace has, and the values that must fit together."""
    for key, (low, high) in RANGES.items():
        v = namespace.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"{key}={v!r} must be a finite number")
        if v < low or (high is not None and v > high):
            fail(f"{key}={v!r} must be " + (f"at least {low}" if high is None else f"between {low} and {high}"))
    for key, allowed in CHOICES.items():
        if isinstance(namespace.get(key), str) and namespace[key] not in allowed:  # (export.py's tokenizer is a module)
            fail(f"{key}={namespace[key]!r} is not one of {', '.join(map(repr, allowed))}")
    for key in NOT_EMPTY:
        if namespace.get(key) == "":
            fail(f"{key} is empty; give it a value (--{key}=...)")
    if "n_embd" in namespace and "n_head" in namespace and namespace["n_embd"] % namespace["n_head"]:
        fail(f"n_embd={namespace['n_embd']} must be a multiple of n_head={namespace['n_head']} "
             f"(each head gets n_embd/n_head dimensions)")
    for key in ("out_dir", "to"):  # a file where a folder should be can never work
        if namespace.get(key):
            _check_folders(key, namespace[key], may_be_file=key == "to")
    for key in ("resume_from", "ckpt"):  # a checkpoint file (or FSDP's checkpoint folder) named by the command
        if isinstance(namespace.get(key), str) and namespace[key] and not os.path.exists(namespace[key]):
            fail(f"{key} {namespace[key]!r}: no such file or folder")
    if namespace.get("bench_dir") and not os.path.isdir(namespace["bench_dir"]):
        fail(f"bench_dir {namespace['bench_dir']!r} is not a folder")


def _check_folders(key, path, may_be_file):
    """path's nearest existing ancestor (path itself included unless it may be a file) is a folder."""
    full = os.path.abspath(path)
    at = full if not may_be_file else os.path.dirname(full)
    while not os.path.exists(at):
        at = os.path.dirname(at)
    if not os.path.isdir(at):
        where = "is a file" if at == full else f"is under {at}, which is a file"
        fail(f"{key} {path!r} {where}, not a folder; pick another --{key}")


def check_data(block_size, split_tokens, dataset):
    """block_size against the data: every split needs at least one block of block_size+1 tokens.
    split_tokens: {split: number of tokens}."""
    for split, n in split_tokens.items():
        if n <= block_size:
            fail(f"block_size={block_size} is too long for dataset {dataset!r}: its {split}.bin has {n} tokens, "
                 f"and a batch row needs block_size+1; use a smaller --block_size")


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to namespace.
    Returns {key: where it was set} for the keys a file or flag set ('--key' for a flag, else the
    file's path), so a script can tell a user's choice from a default, and a flag from a file."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    touched = {}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"config file {arg!r} not found (arguments are config files or --key=value)")
            scope = dict(namespace)
            try:
                with open(arg) as f:
                    tree = ast.parse(f.read(), arg)
                exec(compile(tree, arg, "exec"), scope)
            except Exception as e:  # a config file is user code: report its error in one line
                fail(f"config file {arg!r} failed: {type(e).__name__}: {e}")
            # the names the file assigns, even to their default value: on resume a file's value
            # wins over the run's stored one, so "set" must not mean "differs from the default"
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for k in sorted(assigned & scope.keys()):
                v = scope[k]
                if k.startswith("_") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue  # helpers a config file may use
                if k not in defaults:
                    _unknown(k, keys, f"in {arg}")
                namespace[k] = _coerce(k, v, defaults[k], f"in {arg}")
                touched[k] = arg
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq and isinstance(defaults.get(key), bool):
                eq, text = "=", "True"  # --check means --check=True
            if not eq:
                fail(f"{arg!r} should be --key=value")
            if key not in defaults:
                _unknown(key, keys, f"in {arg}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a literal: a plain string such as --device=cpu
            if isinstance(defaults[key], float) and text.strip().lower() in ("nan", "inf", "+inf", "-inf"):
                value = float(text)  # not a literal, but a float all the same: the range check rejects it
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 means the string '123'
            namespace[key] = _coerce(key, value, defaults[key], f"in {arg}")
            touched[key] = "--" + key
    check(namespace)
    return touched
