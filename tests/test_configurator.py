"""configurator.py: config files and --key=value flags, and one clear line for every mistake."""
import os

import pytest

from conftest import ROOT, run
from configurator import configure


def defaults():
    return dict(batch_size=12, learning_rate=6e-4, compile=True, device="auto", out_dir="out",
                n_layer=12)


def test_flags_are_literals_or_strings():
    ns = defaults()
    touched = configure(ns, ["--batch_size=32", "--learning_rate=1e-3", "--compile=False",
                             "--device=cuda:1", "--out_dir=123"])
    assert ns == dict(batch_size=32, learning_rate=1e-3, compile=False, device="cuda:1",
                      out_dir="123", n_layer=12)
    assert set(touched) == {"batch_size", "learning_rate", "compile", "device", "out_dir"}
    assert all(where == "--" + k for k, where in touched.items())


def test_int_for_float_is_fine_and_equals_sign_inside_value():
    ns = defaults()
    configure(ns, ["--learning_rate=0", "--out_dir=a=b"])
    assert ns["learning_rate"] == 0.0 and isinstance(ns["learning_rate"], float)
    assert ns["out_dir"] == "a=b"


def test_config_file_then_flag(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch_size = 64\nn_layer = int(math.sqrt(16))\n_helper = 3\n")
    ns = defaults()
    touched = configure(ns, [str(cfg), "--batch_size=8"])
    assert ns["batch_size"] == 8 and ns["n_layer"] == 4
    # the flag wins; where each came from
    assert touched == {"batch_size": "--batch_size", "n_layer": str(cfg)}


def test_a_file_that_assigns_the_default_value_sets_it(tmp_path):
    """On resume a config file's value wins over the stored run's, so "set" means assigned, even to
    the default (12 is a cached small int: an identity check would miss it)."""
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 12\nif True:\n    out_dir = 'out'\n")
    assert configure(defaults(), [str(cfg)]) == {"batch_size": str(cfg), "out_dir": str(cfg)}


def expect_error(capsys, ns, argv, *words):
    with pytest.raises(SystemExit) as e:
        configure(ns, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    for w in words:
        assert w in err, err
    return err


def test_unknown_key_suggests_close_match(capsys):
    expect_error(capsys, defaults(), ["--batch_sise=3"], "batch_sise", "did you mean 'batch_size'")


def test_unknown_key_in_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layers = 4\n")
    expect_error(capsys, defaults(), [str(cfg)], "n_layers", str(cfg), "did you mean 'n_layer'")


@pytest.mark.parametrize("argv, words", [
    (["--batch_size=1.5"], ["batch_size", "int", "1.5"]),
    (["--compile=yes"], ["compile", "bool"]),
    (["--learning_rate=fast"], ["learning_rate", "float"]),
])
def test_wrong_type(capsys, argv, words):
    expect_error(capsys, defaults(), argv, *words)


def test_wrong_type_in_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = '12'\n")
    expect_error(capsys, defaults(), [str(cfg)], "batch_size", "int")


def test_missing_file_and_malformed_args(capsys, tmp_path):
    expect_error(capsys, defaults(), [str(tmp_path / "nope.py")], "nope.py", "not found")
    expect_error(capsys, defaults(), ["batch_size=3"], "batch_size=3")
    expect_error(capsys, defaults(), ["--batch_size"], "--key=value")


def test_broken_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = = 3\n")
    expect_error(capsys, defaults(), [str(cfg)], "SyntaxError")


@pytest.mark.parametrize("script, typo, key", [("train.py", "n_layr", "n_layer"),
                                               ("sample.py", "num_sample", "num_samples"),
                                               ("bench.py", "blok_size", "block_size")])
def test_scripts_exit_2_without_traceback(script, typo, key):
    proc = run(script, f"--{typo}=3", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: unknown config key '{typo}' in --{typo}=3; "
                                   f"did you mean '{key}'?")


# each script's --help: its docstring's first line, and a knob with its default and comment as
# they are in the code
HELP = {"train.py": ("Train a GPT", "--eval_only=False", "evaluate once and exit"),
        "sample.py": ("Sample from a trained model", "--max_batch=16",
                      "samples generated together"),
        "export.py": ("Export a checkpoint", "--format='hf'", "'hf': a Hugging Face GPT-2 folder"),
        "bench.py": ("Measure training speed", "--mode='train'", "'train': step time"),
        "data/prepare.py": ("Your own text", "--val_fraction=0.1", "of the documents, whole"),
        "checkpoint.py": ("What a checkpoint holds", "consolidate FOLDER OUT.pt", ""),
        "plot.py": ("loss curves", "--x", "")}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", HELP)
def test_every_script_answers_help(script, flag):
    p = run(script, flag, check=False)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    first, knob, comment = HELP[script]
    assert first in p.stdout and knob in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if knob in ln)
    assert comment in line, line


def test_help_lists_every_knob_from_the_code(tmp_path, capsys):
    """Generated from the calling script: its docstring, then every knob in the order of the code,
    with its default and the comment on its line; comment lines above a knob are headings."""
    script = tmp_path / "s.py"
    script.write_text('"""\nDo a thing.\n\n    python s.py\n"""\n'
                      'from configurator import configure\n\n'
                      '# --------\n# I/O\nout_dir = "out"  # where it goes (# not a comment)\n'
                      'steps = 3\nrate = 0.5  # how fast\n_private = 1\n'
                      'configure(globals(), ["--help"])\n')
    with pytest.raises(SystemExit) as e:
        exec(compile(script.read_text(), str(script), "exec"),
             {"__name__": "__main__", "__file__": str(script),
              "__doc__": "\nDo a thing.\n\n    python s.py\n"})
    assert e.value.code == 0
    assert capsys.readouterr().out == (
        "Do a thing.\n\n    python s.py\n\n"
        "Knobs (--key=value, config files: configurator.py), with their defaults:\n"
        "# I/O\n"
        "  --out_dir='out'         where it goes (# not a comment)\n"
        "  --steps=3\n"
        "  --rate=0.5              how fast\n")


def test_help_is_quick_and_the_readme_points_to_it():
    """train.py --help answers before torch is imported (seconds), and the README says where the
    knobs are."""
    # a fresh interpreter, not the fork server
    p = run("train.py", "--help", prefix=["env", "PYTHONPROFILEIMPORTTIME=1"])
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines()
                if ln.startswith("import time:")}
    assert "configurator" in imported and "torch" not in imported
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "python train.py --help" in f.read()
