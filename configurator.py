"""
Config for train.py, sample.py and bench.py: their plain-valued globals are the config.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Each positional argument is a Python file executed into the script's globals; each --key=value
then overrides one global, the value read as a Python literal (or taken as a string if it is not
one). Mistakes end with one line on stderr and exit code 2, never a traceback.
"""
import ast
import difflib
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
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    fail(f"{key} {where} must be {type(default).__name__} (like {default!r}), got {type(value).__name__} {value!r}")


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
            if not eq:
                fail(f"{arg!r} should be --key=value")
            if key not in defaults:
                _unknown(key, keys, f"in {arg}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a literal: a plain string such as --device=cpu
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 means the string '123'
            namespace[key] = _coerce(key, value, defaults[key], f"in {arg}")
            touched[key] = "--" + key
    return touched
