"""Every bad input ends in one `error:` line: exit 2 when the command is wrong, 1 when the files or
the run stop it (configurator.py's docstring), the knob or file named, no traceback, and nothing
on disk that was not there before. Then the fixes that are behaviour: a diverged run stops without
touching its checkpoints, temperature 0 is greedy, exports replace only their own folders and a
character-level export samples with its own vocab."""
import hashlib
import stat
import importlib.util
import json
import os
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file

from keep.files import BEST
from keep.store import candidates
from keep import store
from conftest import TINY, copy_run, run

FILE, MISSING = "{tmp}/a-file", "{tmp}/missing"

TRAIN = [  # flags, exit code, words the error line holds
    (["--gradient_accumulation_steps=0"], 2, "gradient_accumulation_steps=0 must be at least 1"),
    (["--eval_interval=0"], 2, "eval_interval=0"),
    (["--log_interval=0"], 2, "log_interval=0"),
    (["--n_head=3"], 2, "must be a multiple of n_head=3"),
    (["--learning_rate=-1.0"], 2, "learning_rate=-1.0 must be at least 0"),
    (["--learning_rate=1e999"], 2, "learning_rate=inf must be a finite number"),
    (["--batch_size=-1"], 2, "batch_size=-1"),
    (["--batch_size=0"], 2, "batch_size=0"),
    (["--eval_tokens=-5"], 2, "eval_tokens=-5"),
    (["--max_iters=-5"], 2, "max_iters=-5"),
    (["--max_iters=None"], 2, "max_iters in --max_iters=None must be int"),
    (["--batch_size=None"], 2, "batch_size in --batch_size=None must be int"),
    (["--dropout=None"], 2, "dropout in --dropout=None must be float"),
    (["--bias=None"], 2, "bias in --bias=None must be bool"),
    (["--dropout=1.5"], 2, "dropout=1.5 must be between 0 and 0.999"),
    (["--beta2=1.0"], 2, "beta2=1.0"),
    (["--seed=-1"], 2, "seed=-1"),
    (["--checkpoint_interval=-1"], 2, "checkpoint_interval=-1"),
    (["--keep_last=0"], 2, "keep_last=0 must be at least 1"),
    (["--keep_every=-2"], 2, "keep_every=-2"),
    (["--checkpoint_minutes=1e999"], 2, "checkpoint_minutes=inf"),
    (["--time_limit=1:99:99"], 2, "time_limit='1:99:99' is not a duration"),
    (["--block_size=111540"], 2,
     "block_size=111540 is too long for dataset 'shakespeare_char': its val.bin has 111540"),
    (["--block_size=5000000"], 2, "train.bin has 1003854 tokens"),
    (["--n_embd=200000", "--n_head=1"], 2, "make the model smaller"),
    # 25.6M tokens a micro-batch: ~240 GB of activations, refused before they are allocated (see
    # no_big_allocation)
    (["--batch_size=100000", "--block_size=256"], 2,
     "batch_size=100000 x block_size=256 needs about"),
    (["--device=foo"], 2, "device='foo' is not a device"),
    (["--dtype=fp8"], 2, "dtype='fp8' is not one of"),
    (["--backend=mpi"], 2, "backend='mpi'"),
    (["--parallelism=zero3"], 2, "parallelism='zero3' is not one of 'ddp', 'fsdp'"),
    (["--parallelism=fsdp", "--dtype=float16"], 2, "dtype=float16 needs a gradient scaler"),
    (["--out_dir="], 2, "out_dir is empty"),
    ([f"--out_dir={FILE}"], 2, "is a file, not a folder"),
    ([f"--out_dir={FILE}/run"], 2, "which is a file"),
    (["--init_from=gpt2-foo"], 2, "init_from='gpt2-foo' is neither GPT-2 weights by name"),
    ([f"--resume_from={FILE}", "--init_from=scratch"], 2, "drop one of them"),
    ([f"--resume_from={MISSING}.pt"], 2, "resume_from '{tmp}/missing.pt': no such file"),
    (["--learning_rate=nan"], 2, "learning_rate=nan must be a finite number"),
    (["--init_from=resume", f"--out_dir={MISSING}"], 1, "no checkpoint in"),
    (["--dataset=_no_such_data"], 1,
     "does not exist; prepare it first (docs/data.md); prepared here: "),
]
if not torch.cuda.is_available():
    TRAIN.append((["--device=cuda"], 1, "no CUDA GPU is visible"))
if importlib.util.find_spec("wandb") is None:
    TRAIN.append((["--wandb_log=True"], 1, "pip install wandb"))

SAMPLE = [
    ([f"--start=FILE:{MISSING}.txt"], 2, "cannot read the prompt file"),
    (["--start=FILE:{tmp}"], 2, "Is a directory"),
    (["--temperature=-1"], 2, "temperature=-1.0 must be at least 0"),
    (["--top_k=-1"], 2, "top_k=-1"),
    (["--num_samples=0"], 2, "num_samples=0"),
    (["--max_new_tokens=None"], 2, "max_new_tokens in --max_new_tokens=None must be int"),
    (["--init_from=gpt2-foo"], 2, "neither GPT-2 weights"),
    ([f"--out_dir={MISSING}"], 1, "no checkpoint in"),
    (["--start=\u00e9t\u00e9"], 2, "characters the model's vocabulary lacks: '\u00e9'"),
    (["--stop_at_eot=True"], 2, "needs a GPT-2 BPE model"),
    (["--window_keep=1.5"], 2, "window_keep=1.5 must be between 0 and 1"),
    (["--max_batch=0"], 2, "max_batch=0 must be at least 1"),
    (["--compile=True"], 2, "unknown config key 'compile'"),
]

EXPORT = [
    ([f"--to={FILE}"], 2, "is a file; --format=hf writes a folder"),
    ([f"--to={FILE}", "--format=safetensors"], 2, "give a path ending in .safetensors"),
    ([f"--to={FILE}/x"], 2, "which is a file"),
    (["--format=bin"], 2, "format='bin' is not one of 'hf', 'safetensors'"),
    (["--which=newest"], 2, "which='newest'"),
    ([f"--ckpt={MISSING}.pt"], 2, "ckpt '{tmp}/missing.pt': no such file"),
    (["--to={tmp}/other"], 1,
     "holds other files (config.json, foreign.safetensors), not a previous export"),
    (["--to={tmp}/other/foreign.safetensors", "--format=safetensors"], 1,
     "is not a previous export"),
]


def tree(path):
    """Every file and folder under path with its bytes' hash: what 'nothing changed' compares."""
    out = {}
    for folder, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.join(folder, d)] = "dir"
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                out[os.path.join(folder, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def scene(tmp_path):
    """A file where a folder could be expected, and a folder holding somebody else's files."""
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}\n")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other" / "foreign.safetensors"))
    return tmp_path


def no_big_allocation(limit=2 << 30):
    """A bad input is refused before anything big is allocated: 2 GiB of address space is plenty
    for a tiny run (about 0.6 GiB), and an allocation past it fails at once, instead of a batch
    that Linux overcommits filling the machine until the OOM killer comes."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def one_error_line(script, args, code, words, tmp_path, *base, **popen):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = tree(tmp_path)
    p = run(script, *base, *args, check=False, timeout=120, **popen)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stdout + p.stderr
    # one error line, the last; before it at most what is being read ("sampling from ...")
    assert ([ln for ln in lines if ln.startswith("error")] == lines[-1:]
            and len(lines) <= 2), p.stderr
    assert (lines[-1].startswith("error: ")
            and words.replace("{tmp}", str(tmp_path)) in lines[-1]), lines[-1]
    assert tree(tmp_path) == before  # nothing created, nothing changed


@pytest.mark.parametrize("args, code, words", TRAIN,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_train_bad_input(shakespeare_char, scene, args, code, words):
    one_error_line("train.py", args, code, words, scene, *TINY, f"--out_dir={scene}/run",
                   preexec_fn=no_big_allocation)


@pytest.mark.parametrize("args, code, words", SAMPLE,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_sample_bad_input(trained, scene, args, code, words):
    one_error_line("sample.py", args, code, words, scene, f"--out_dir={trained}", "--device=cpu",
                   "--num_samples=1", "--max_new_tokens=3")


@pytest.mark.parametrize("args, code, words", EXPORT,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_export_bad_input(trained, scene, args, code, words):
    one_error_line("export.py", args, code, words, scene, f"--out_dir={trained}", "--to={tmp}/hf")


@pytest.mark.parametrize("args, words", [
    (["--block_size=2000000"], "block_size=2000000 is too long"),
    (["--mode=checkpoint", f"--bench_dir={FILE}"], "is not a folder"),
    (["--timed_steps=0"], "timed_steps=0"),
])
def test_bench_bad_input(shakespeare_char, scene, args, words):
    one_error_line("bench.py", args, 2, words, scene, "--device=cpu", "--compile=False",
                   "--dataset=shakespeare_char")


@pytest.mark.parametrize("args", [[], ["a", "b"], ["consolidate", "only-one"]])
def test_checkpoint_cli_usage(args):
    p = run("checkpoint.py", *args, check=False)
    assert p.returncode == 2 and p.stderr.strip() == \
        "error: usage: python checkpoint.py OUT_DIR | REMOTE_DIR | CHECKPOINT | " \
        "verify CHECKPOINT | verify REMOTE_DIR | consolidate FOLDER OUT.pt"


def test_time_limit_too_short_for_one_iteration(shakespeare_char, tmp_path):
    """A job that requeues itself must not loop without progress: exit 1, and say so."""
    p = run("train.py", *TINY, f"--out_dir={tmp_path}", "--time_limit=1", check=False)
    assert p.returncode == 1 and "nothing new to save" in p.stdout
    # the stop line says what happens: no promise of a checkpoint that is then not written
    assert ("saving a checkpoint" not in p.stdout
            and p.stdout.count("nothing new to save") == 1), p.stdout
    assert ("time_limit nearly reached at iteration 0: exiting: nothing new to save"
            in p.stdout), p.stdout
    assert p.stderr.strip() == ("error: time_limit='1' leaves no time for one iteration and a "
                                "checkpoint; raise it")


def test_out_of_memory_is_one_line(shakespeare_char, tmp_path):
    """Out of memory during training (a batch that passes devices.check_fits, about 1.3 GB, but
    not the 1.5 GiB of address space it is given): the allocation fails, one line, exit 1, no
    checkpoint."""
    p = run("train.py", *TINY, f"--out_dir={tmp_path}", "--batch_size=4000", check=False,
            preexec_fn=lambda: no_big_allocation(3 << 29))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: out of memory") and "lower batch_size" in p.stderr
    assert not candidates(str(tmp_path))


@pytest.mark.parametrize("flags, says", [
    # the update of iteration 11 is the first on bad weights
    ([], "the training loss is nan at iteration 11"),
    (["--eval_interval=11"], "the eval loss is nan at iteration 11"),
    (["--checkpoint_interval=11", "--eval_interval=1000"],
     "the model's weights are not finite (nan or inf) at iteration 11"),
])
def test_diverged_run_stops_and_keeps_its_checkpoints(trained, tmp_path, flags, says):
    """learning_rate 1e39 (past float32's range) makes the weights inf in one update, while
    iteration 10's loss is still finite:
    whichever of the three checks sees it first stops the run with one line, exit 1, and every
    file in out_dir is byte for byte what it was."""
    out = copy_run(trained, tmp_path / "run")
    before = tree(out)
    p = run("train.py", *TINY, f"--out_dir={out}", "--max_iters=30", "--learning_rate=1e39",
            "--decay_lr=False", "--warmup_iters=0", "--eval_interval=5", "--checkpoint_interval=5",
            *flags, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"error: {says}: training diverged. No checkpoint of it was "
                                f"written, so the newest one on disk is from before; lower "
                                f"--learning_rate (or raise --warmup_iters) and run again to "
                                f"continue from it")
    assert "iter 10: loss" in p.stdout
    text = open(os.path.join(out, "metrics.jsonl")).read()
    # strict JSON: a diverged loss is null
    assert "NaN" not in text and '"event": "diverged"' in text
    checkpoints = lambda t: {k: v for k, v in t.items() if k.endswith(".pt")}  # noqa: E731
    assert checkpoints(tree(out)) == checkpoints(before) and len(checkpoints(before)) == 3


def samples(*args):
    p = run("sample.py", "--device=cpu", "--num_samples=2", "--max_new_tokens=40", *args)
    return p.stdout.split("---------------\n")[:2]


def test_temperature_zero_is_greedy(trained):
    greedy = samples(f"--out_dir={trained}", "--temperature=0", "--start=ROMEO:")
    assert greedy[0] == greedy[1]  # no sampling: every sample the same
    assert greedy == samples(f"--out_dir={trained}", "--temperature=1.0", "--top_k=1",
                             "--start=ROMEO:", "--seed=7")
    unrestricted = samples(f"--out_dir={trained}", "--top_k=0", "--start=ROMEO:")
    assert all(s.startswith("ROMEO:") for s in unrestricted) and unrestricted[0] != unrestricted[1]


def test_export_replaces_only_its_own_folder_and_samples_with_the_char_vocab(trained, tmp_path):
    """A BPE-style export, then a char-level one into the same folder: the second replaces the first
    whole (no stale vocab.json), transformers loads it, and sample.py on the folder uses the
    char vocab, giving the checkpoint's own greedy text."""
    to = tmp_path / "hf"
    to.mkdir()
    (to / "export.json").write_text("{}")  # a previous export ...
    for name in ("vocab.json", "merges.txt", "config.json"):  # ... of a GPT-2 BPE model
        (to / name).write_text("stale")
    p = run("export.py", f"--out_dir={trained}", f"--to={to}")
    assert sorted(os.listdir(to)) == ["char_vocab.json", "config.json", "export.json",
                                      "model.safetensors"]
    assert (json.loads((to / "export.json").read_text())["iter_num"]
            == store.load(os.path.join(trained, "ckpt.pt"))["iter_num"])
    # no temp folder left beside it
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    from transformers import GPT2LMHeadModel
    assert GPT2LMHeadModel.from_pretrained(str(to)).config.vocab_size == 65
    assert "char_vocab.json" in p.stdout
    ours = samples(f"--out_dir={trained}", "--temperature=0", "--start=ROMEO:")
    assert samples(f"--init_from={to}", "--temperature=0", "--start=ROMEO:") == ours
    # without its vocab the folder is refused, not decoded as GPT-2 BPE
    os.remove(to / "char_vocab.json")
    p = run("sample.py", f"--init_from={to}", "--device=cpu", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(
        f"error: {to} holds a model with a vocab of 65")


def test_safetensors_export_replaces_its_own_file(trained, tmp_path):
    to = str(tmp_path / "m.safetensors")
    run("export.py", f"--out_dir={trained}", "--format=safetensors", f"--to={to}")
    first = load_file(to)
    run("export.py", f"--out_dir={trained}", "--format=safetensors", f"--to={to}")  # ours: replaced
    assert os.listdir(tmp_path) == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(to).st_mode) == 0o666 & ~umask  # for sharing, as the umask says
    assert all(torch.equal(t, first[k]) for k, t in load_file(to).items())


def test_planted_pickle_names_the_global(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": {}, "model_args": {}, "x": Payload()}, os.path.join(out, BEST))
    p = run("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1",
            "--max_new_tokens=3")
    warnings = [ln for ln in p.stderr.splitlines() if "refused" in ln]
    assert len(warnings) == 1 and "(it names posix.system, not plain data)" in warnings[0]
    assert "train first" not in p.stderr and p.stdout.strip()
