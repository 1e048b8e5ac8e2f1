"""
Config for train.py, sample.py, eval.py, bench.py and export.py: their plain-valued globals are
the config.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Each positional argument is a Python file executed into the script's globals; each --key=value
then overrides one global, the value read as a Python literal (or taken as a string if it is not
one); a bare --key sets a True/False knob to True. Then every value is checked (RANGES, CHOICES,
NOT_EMPTY, and values that must fit together), once, here, for whichever of these keys a script has;
once the data and the model's shape are known, check_data judges block_size against the data (and
devices.check_fits the training state and a micro-batch's activations against the memory).
Mistakes end with one line on stderr and exit code 2, never a traceback.

Exit codes, the same in every script: 2 when the command is wrong (an unknown key, a value of the
wrong type, out of range or not fitting the data or the model, a config or prompt file that cannot
be read, an out_dir that is a file), 1 when the command is fine but the files or the run stop it
(no prepared dataset, no usable checkpoint, a folder holding another run, a failed write, a
diverged loss, out of memory).
"""
import ast
import importlib.util
import difflib
import io
import math
import os
import re
import sys
import tokenize
import types

from console import UsageError, fail
from evals.tasks import names as task_names

PLAIN = (int, float, bool, str, type(None))


def config_keys(namespace):
    """The names a user may set: public globals holding plain values."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, PLAIN)]


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    fail(f"unknown config key {key!r} {where}{hint}")


def _coerce(key, value, default, where):
    """value as the type of default: int -> float is fine, anything else that differs is an
    error."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    fail(f"{key} {where} must be {type(default).__name__} (like {default!r}), got "
         f"{type(value).__name__} {value!r}")


# (lowest, highest) allowed for numeric knobs, None for no bound; a float must also be finite
AT_LEAST_1 = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_size",
              "gradient_accumulation_steps", "eval_interval", "log_interval", "keep_last",
              "num_samples", "max_new_tokens", "timed_steps", "max_batch", "num_proc", "windows",
              "remote_lease")
AT_LEAST_0 = ("eval_iters", "eval_tokens", "eval_tasks_interval", "remote_wait", "max_iters",
              "warmup_iters", "lr_decay_iters", "checkpoint_interval", "keep_every",
              "checkpoint_minutes", "warmup_steps", "learning_rate", "min_lr", "weight_decay",
              "grad_clip", "peak_flops", "temperature", "top_k")
RANGES = {**{k: (1, None) for k in AT_LEAST_1}, **{k: (0, None) for k in AT_LEAST_0},
          "dropout": (0, 0.999), "beta1": (0, 0.999999), "beta2": (0, 0.999999),
          "seed": (0, 2**32 - 1), "window_keep": (0, 1), "shard_mb": (0.001, None)}
CHOICES = {"backend": ("auto", "nccl", "gloo"),
           "dtype": ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
           "format": ("hf", "safetensors"), "which": ("best", "latest"),
           "mode": ("train", "checkpoint"), "tokenizer": ("gpt2", "char"),
           "parallelism": ("ddp", "fsdp")}
NOT_EMPTY = ("out_dir", "dataset", "device", "to", "text_field")
# a device name; whether this machine has it: devices.py
DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:\d+)?")


def check(namespace):
    """Every rule below that applies to the keys namespace has, and the values that must fit
    together."""
    for key, (low, high) in RANGES.items():
        v = namespace.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"{key}={v!r} must be a finite number")
        if v < low or (high is not None and v > high):
            fail(f"{key}={v!r} must be "
                 + (f"at least {low}" if high is None else f"between {low} and {high}"))
    for key, allowed in CHOICES.items():
        # (export.py's tokenizer is a module)
        if isinstance(namespace.get(key), str) and namespace[key] not in allowed:
            fail(f"{key}={namespace[key]!r} is not one of {', '.join(map(repr, allowed))}")
    for key in NOT_EMPTY:
        if namespace.get(key) == "":
            fail(f"{key} is empty; give it a value (--{key}=...)")
    if (isinstance(namespace.get("device"), str) and namespace["device"]
            and not DEVICE.fullmatch(namespace["device"])):
        fail(f"device={namespace['device']!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    for key in ("limit", "eval_tasks_limit"):  # eval.py's and train.py's count of task examples
        if isinstance(namespace.get(key), int) and (namespace[key] == 0 or namespace[key] < -1):
            fail(f"{key}={namespace[key]} scores no example; give N >= 1 (the first N of each "
                 f"task) or -1 (all of them)")
    for key in ("tasks", "eval_tasks"):
        if isinstance(namespace.get(key), str) and (key == "tasks" or namespace[key]):
            try:
                task_names(namespace[key])
            except UsageError as e:
                fail(f"{key}: {e}")
    if namespace.get("wandb_log") is True and importlib.util.find_spec("wandb") is None:
        fail("wandb_log=True needs the wandb package: pip install wandb", 1)
    if ("n_embd" in namespace and "n_head" in namespace
            and namespace["n_embd"] % namespace["n_head"]):
        fail(f"n_embd={namespace['n_embd']} must be a multiple of n_head={namespace['n_head']} "
             f"(each head gets n_embd/n_head dimensions)")
    if isinstance(namespace.get("remote_dir"), str) and namespace["remote_dir"]:
        problem = url_problem(namespace["remote_dir"])
        if problem:
            fail(f"remote_dir {namespace['remote_dir']!r} {problem}")
    for key in ("out_dir", "to", "remote_dir"):  # a file where a folder should be can never work
        if namespace.get(key) and "://" not in namespace[key]:
            _check_folders(key, namespace[key], may_be_file=key == "to", reads="ckpt" in namespace)
    # a checkpoint file (or FSDP's checkpoint folder) named by the command
    for key in ("resume_from", "ckpt"):
        if isinstance(namespace.get(key), str) and namespace[key] and \
                "://" not in namespace[key] and not os.path.lexists(namespace[key]):
            fail(f"{key} {namespace[key]!r}: no such file or folder")
    if namespace.get("parallelism") == "fsdp" and namespace.get("dtype") in ("float16", "fp16"):
        fail("dtype=float16 needs a gradient scaler, which FSDP here does without: use "
             "--dtype=bfloat16 (or float32) with --parallelism=fsdp")
    if namespace.get("bench_dir") and not os.path.isdir(namespace["bench_dir"]):
        fail(f"bench_dir {namespace['bench_dir']!r} is not a folder")


# remote_dir's protocols: object stores and disks that keep what they are given. Others that fsspec
# knows (zip://, http://, memory://, ...) are refused: a "durable copy" there is none, or cannot
# work
PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "file")
URL = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)", re.I)


def url_problem(url):
    """Why url cannot be a remote_dir (None if it can): a well-formed URL of a known protocol with a
    bucket (s3://bucket/run), file:///absolute/path, or an absolute path. `s3:/x`, `s3:x`, `s3//x`
    and `s3://` (an unset $BUCKET) would otherwise be folders under the current directory."""
    # fsspec reads these as a pattern: a delete could reach past the run
    if any(c in url for c in "*?[]"):
        return "holds a wildcard character (* ? [ ]); name a plain folder"
    m = URL.fullmatch(url)
    if m is None:
        if not os.path.isabs(url):
            return ("is neither a URL (s3://bucket/run, gs://..., az://..., file:///path) nor an "
                    "absolute path; a relative one would put the durable copy on this machine's "
                    "disk")
        return None
    protocol, rest = m.group(1).lower(), m.group(2)
    if protocol not in PROTOCOLS:
        return (f"uses {protocol}://, which cannot hold a remote copy; use one of "
                f"{', '.join(p + '://' for p in PROTOCOLS)} or an absolute path")
    if protocol == "file":
        return None if rest.startswith("/") else "must be file:///absolute/path (three slashes)"
    bucket = rest.split("/", 1)[0]
    if not bucket or bucket in (".", ".."):
        return (f"names no bucket: give {protocol}://BUCKET/PATH (is a variable in the command "
                "empty?)")
    return None


def _check_folders(key, path, may_be_file, reads=False):
    """path's nearest existing ancestor (path itself included unless it may be a file) is a folder.
    reads: the script reads a checkpoint (sample.py, export.py), so an out_dir that is one means
    --ckpt."""
    full = os.path.abspath(path)
    at = full if not may_be_file else os.path.dirname(full)
    while not os.path.exists(at):
        at = os.path.dirname(at)
    if reads and key == "out_dir" and at == full and path.endswith(".pt") and os.path.isfile(at):
        fail(f"out_dir {path!r} is a checkpoint file, not a folder; to read it give --ckpt={path}")
    if not os.path.isdir(at):
        where = "is a file" if at == full else f"is under {at}, which is a file"
        fail(f"{key} {path!r} {where}, not a folder; pick another --{key}")


def check_data(block_size, split_tokens, dataset):
    """block_size against the data: every split needs at least one block of block_size+1 tokens.
    split_tokens: {split: number of tokens}."""
    for split, n in split_tokens.items():
        if n <= block_size:
            fail(f"block_size={block_size} is too long for dataset {dataset!r}: its {split}.bin "
                 f"has {n} tokens, and a batch row needs block_size+1; use a smaller --block_size")


def help_text(namespace, path, before=None, keys=None):
    """--help, read from the script at path so that it never drifts from the code: its docstring,
    then each knob in the order of the code as --key=default and the comment on its line (comment
    lines right above a knob are printed as they are: the code's own headings). A knob's line is its
    last `key = ...` (or `key=...,` in a dict) before line `before`, the configure() call; knobs set
    where no line of the script shows them come last."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    keys = keys or config_keys(namespace)
    doc = (ast.get_docstring(ast.parse(source)) or "").strip()
    out = [doc, ""] if doc else []
    out.append("Knobs (--key=value, config files: configurator.py), with their defaults:")
    # line number: (knob, its comment); above: comment lines over the next line
    lines, shown, above = {}, [], []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
    for i, t in enumerate(tokens[:-1]):
        first = (i == 0 or tokens[i - 1].type in (tokenize.NL, tokenize.NEWLINE)
                 or tokens[i - 1].string in ("(", ","))
        if t.type == tokenize.NAME and first and tokens[i + 1].string == "=" and t.string in keys \
                and (before is None or t.start[0] < before):
            comment = next((c.string for c in tokens[i:] if c.start[0] == t.start[0]
                            and c.type == tokenize.COMMENT), "")
            lines = {row: v for row, v in lines.items() if v[0] != t.string}  # the last one counts
            lines[t.start[0]] = (t.string, comment[1:].strip())
    headings = {}
    for row, text in enumerate(source.splitlines(), 1):
        if text.strip().startswith("#"):
            above.append(text.strip())
        elif row in lines:
            headings[row], above = [h for h in above if h.strip("#- ")], []
        else:
            above = []
    for row in sorted(lines):
        key, comment = lines[row]
        shown.append(key)
        out += headings[row]
        knob = f"--{key}={namespace[key]!r}"
        out.append(f"  {knob:<22}  {comment}".rstrip() if comment else f"  {knob}")
    out += [f"  --{k}={namespace[k]!r}" for k in keys if k not in shown]
    return "\n".join(out) + "\n"


def configure(namespace, argv=None, keys=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to namespace.
    keys: the knobs (default: config_keys; sweep.py adds its dict-valued ones).
    Returns {key: where it was set} for the keys a file or flag set ('--key' for a flag, else the
    file's path), so a script can tell a user's choice from a default, and a flag from a file.
    --help (or -h) prints help_text of the calling script and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        caller = sys._getframe(1)  # the script's own frame: its file is the help's source
        sys.stdout.write(help_text(namespace, caller.f_code.co_filename, caller.f_lineno, keys))
        sys.exit(0)
    keys = keys or config_keys(namespace)
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
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                        and isinstance(n.ctx, ast.Store)}
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
            if (isinstance(defaults[key], float)
                    and text.strip().lower() in ("nan", "inf", "+inf", "-inf")):
                # not a literal, but a float all the same: the range check rejects it
                value = float(text)
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 means the string '123'
            namespace[key] = _coerce(key, value, defaults[key], f"in {arg}")
            touched[key] = "--" + key
    check(namespace)
    return touched
