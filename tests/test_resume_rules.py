"""The run around the files (docs/checkpoints.md): resume restores the stored config, the same
command continues a run, the newest file is read from contents, retention never trades a good file
for a bad one, branches keep each other's files, and each file's val loss is its own."""
import os
import re
import signal

from keep.files import BEST, PERIODIC
from keep.store import candidates
from keep import store
from conftest import TINY, contents, copy_run, listing, run, start, wait_for
from test_checkpoint import nanogpt_file
from test_resume import assert_same_state

ARGS = [*TINY, "--eval_interval=4", "--checkpoint_interval=4", "--keep_last=50"]


def test_readme_sequence_with_the_config_file(shakespeare_char, tmp_path):
    """README's commands: train with the CPU flags on top of the GPU config file, then carry on with
    the config file alone. The file's shape is ignored with a note; its other values apply and are
    listed."""
    out = f"--out_dir={tmp_path}"
    # the README's commands, with fewer iterations and eval batches
    run("train.py", "config/train_shakespeare_char.py", out, "--device=cpu", "--compile=False",
        "--eval_iters=2", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
        "--n_head=4", "--n_embd=128", "--max_iters=4", "--lr_decay_iters=2000", "--dropout=0.0",
        "--peak_flops=1e11")
    p = run("train.py", "config/train_shakespeare_char.py", out, "--init_from=resume",
            "--max_iters=6", "--eval_iters=2")
    assert re.search(r"^note: using the checkpoint's model \(n_layer=4, n_head=4, n_embd=128, "
                     r"block_size=64\), not n_layer=6, n_head=6, n_embd=384, block_size=256 from "
                     r"config/train_shakespeare_char.py$",
                     p.stdout, re.M)
    changed = re.search(r"^changed on resume: (.*)$", p.stdout, re.M).group(1)
    for knob in ("log_interval 1 -> 10", "batch_size 12 -> 64", "dropout 0.0 -> 0.2",
                 "max_iters 4 -> 6", "lr_decay_iters 2000 -> 5000"):
        assert knob in changed
    ckpt = store.load(tmp_path / PERIODIC.format(6))
    # counted across the batch change
    assert ckpt["metadata"]["tokens_seen"] == 4 * 12 * 64 + 2 * 64 * 64
    assert (ckpt["model_args"]["n_layer"] == 4
            and ckpt["model_args"]["dropout"] == 0.2 == ckpt["config"]["dropout"])
    assert ckpt["config"]["batch_size"] == 64  # the checkpoint records what ran
    entry = ckpt["metadata"]["resumes"][-1]
    assert (entry["iter"] == 4 and entry["from"] == PERIODIC.format(4)
            and entry["changed"]["batch_size"] == [12, 64])
    # without --init_from=resume the same config file is not this run's command: its shape differs
    p = run("train.py", "config/train_shakespeare_char.py", out, "--max_iters=8", check=False)
    assert (p.returncode == 1 and "n_layer=6 but the checkpoint has 4" in p.stderr
            and "another --out_dir" in p.stderr)
    p = run("checkpoint.py", str(tmp_path / PERIODIC.format(6)))
    assert "resumed 1 time(s)" in p.stdout and re.search(
        r"iteration 4 from ckpt-00000004.pt \(branch 0\): .*batch_size 12 -> 64", p.stdout)


def test_nanogpt_recipe_file_with_its_config(shakespeare_char, tmp_path):
    """A nanoGPT ckpt.pt of the CPU recipe resumed with nanoGPT's config file, as nanoGPT resumes
    it: the shape from the file, nanoGPT's machine values (device, dtype, backend) not taken as
    choices."""
    nanogpt_file(tmp_path / "ckpt.pt")
    p = run("train.py", "config/train_shakespeare_char.py", f"--out_dir={tmp_path}",
            "--init_from=resume", "--compile=False", "--max_iters=502", "--eval_iters=2",
            "--log_interval=1")
    assert "note: using the checkpoint's model (n_layer=2, n_head=2, n_embd=32, block_size=32)" \
        in p.stdout
    assert ("device cpu, dtype float32" in p.stdout and "at iteration 500" in p.stdout
            and "iter 501:" in p.stdout)
    assert store.load(tmp_path / PERIODIC.format(502))["model_args"]["n_layer"] == 2


def test_shape_flag_is_an_error_and_creates_nothing(shakespeare_char, tmp_path):
    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=4")
    before = contents(tmp_path)
    p = run("train.py", f"--out_dir={tmp_path}", "--init_from=resume", "--n_layer=3",
            "--block_size=16", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert err.startswith("error:") and "\n" not in err
    assert ("n_layer=3 but the checkpoint has 2" in err
            and "block_size=16 but the checkpoint has 32" in err)
    assert contents(tmp_path) == before
    p = run("train.py", "--init_from=resume", f"--out_dir={tmp_path / 'typo'}", check=False)
    assert (p.returncode == 1 and "no checkpoint" in p.stderr
            and not os.path.exists(tmp_path / "typo"))


def test_same_command_twice_continues_and_a_finished_run_exits_0(shakespeare_char, tmp_path):
    out = tmp_path / "run"
    run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=6")
    ref = tmp_path / "ref"
    run("train.py", *ARGS, f"--out_dir={ref}", "--max_iters=10")
    first = contents(out)
    # the command a re-queued job repeats
    p = run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=10")
    assert f"{out} holds this run at iteration 6 (ckpt-00000006.pt): continuing it" in p.stdout
    assert "iter 6:" in p.stdout and "iter 5:" not in p.stdout
    assert all(contents(out)[n] == first[n] for n in first if n != BEST)
    assert_same_state(store.load(out / PERIODIC.format(10)), store.load(ref / PERIODIC.format(10)))
    done = contents(out)
    p = run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=10")
    assert ("the run is complete: iteration 10 of max_iters=10" in p.stdout
            and "iter " not in p.stdout)
    assert contents(out) == done


def test_copied_folder_resumes_from_the_highest_iteration(shakespeare_char, tmp_path):
    run("train.py", *ARGS, f"--out_dir={tmp_path / 'run'}", "--max_iters=12", "--keep_last=2")
    copy = copy_run(tmp_path / "run", tmp_path / "copy")
    assert sorted(listing(copy)) == ["ckpt-00000008.pt", "ckpt-00000012.pt", "ckpt.pt"]
    p = run("train.py", f"--out_dir={copy}", "--init_from=resume", "--max_iters=16")
    assert f"resuming from {copy / 'ckpt-00000012.pt'} at iteration 12" in p.stdout
    assert sorted(listing(copy)) == ["ckpt-00000012.pt", "ckpt-00000016.pt", "ckpt.pt"]


def test_junk_and_damaged_files_never_push_good_ones_out(shakespeare_char, tmp_path):
    def periodic():
        return sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-"))

    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=8", "--checkpoint_interval=2",
        "--keep_last=3")
    assert periodic() == ["ckpt-00000004.pt", "ckpt-00000006.pt", "ckpt-00000008.pt"]
    # junk under a checkpoint's name
    (tmp_path / "ckpt-00000099.pt").write_bytes(b"not a checkpoint")
    data = bytearray((tmp_path / "ckpt-00000006.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a file of this run whose header reads but whose CRC fails
    (tmp_path / "ckpt-00000006.pt").write_bytes(bytes(data))
    p = run("train.py", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=10")
    assert re.search(r"^warning: skipping .*ckpt-00000099.pt: unreadable .*; left in place",
                     p.stdout, re.M)
    assert "at iteration 8" in p.stdout
    # the three good files are 10, 8 and 4: the damaged 6 does not count, so 4 stays
    assert periodic() == ["ckpt-00000004.pt", "ckpt-00000006.pt", "ckpt-00000008.pt",
                          "ckpt-00000010.pt", "ckpt-00000099.pt"]
    run("train.py", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=12")
    assert periodic() == ["ckpt-00000008.pt", "ckpt-00000010.pt", "ckpt-00000012.pt",
                          "ckpt-00000099.pt"]


def test_keep_every(shakespeare_char, tmp_path):
    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=11", "--checkpoint_interval=2",
        "--keep_last=1", "--keep_every=4")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == \
        ["ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000011.pt"]


def test_branches(shakespeare_char, tmp_path):
    """resume_from an older file makes a branch: its files get their own names and outrank the
    abandoned ones, ckpt.pt of the other branch is kept, and a plain resume (also of a copy)
    continues the newest branch."""
    out = tmp_path / "run"
    run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=12", "--always_save_checkpoint=False")
    a = contents(out)
    best_a = store.load(out / BEST)
    p = run("train.py", f"--out_dir={out}", "--init_from=scratch",
            f"--resume_from={out / 'ckpt-00000004.pt'}", check=False)
    # resume_from with an explicit fresh start
    assert p.returncode == 2 and "drop one of them" in p.stderr
    # resume_from implies resume; a new dropout makes this branch differ from the first
    p = run("train.py", f"--out_dir={out}", f"--resume_from={out / 'ckpt-00000004.pt'}",
            "--max_iters=12", "--dropout=0.2")
    assert "at iteration 4, as branch 1: later checkpoints of branch 0 stay as they are" in p.stdout
    note = f"note: ckpt.pt held branch 0's best (iteration {best_a['iter_num']}, val loss "
    assert note in p.stdout and f"kept as ckpt-best-b0-{best_a['iter_num']:08d}.pt" in p.stdout
    files = contents(out)
    assert all(files[n] == a[n] for n in a if n != BEST)  # branch 0's periodic files untouched
    assert files[f"ckpt-best-b0-{best_a['iter_num']:08d}.pt"] == a[BEST]
    assert {"ckpt-00000008-b1.pt", "ckpt-00000012-b1.pt"} <= set(files)
    b12 = store.load(out / "ckpt-00000012-b1.pt")
    assert (b12["metadata"]["branch"] == 1
            and b12["metadata"]["run_id"] == best_a["metadata"]["run_id"])
    assert store.load(out / BEST)["metadata"]["branch"] == 1

    for folder in (out, copy_run(out, tmp_path / "copy")):
        p = run("train.py", f"--out_dir={folder}", "--init_from=resume", "--max_iters=14")
        assert f"resuming from {folder / 'ckpt-00000012-b1.pt'} at iteration 12" in p.stdout
        assert (os.path.exists(folder / "ckpt-00000014-b1.pt")
                and not os.path.exists(folder / "ckpt-00000014.pt"))
    # back to branch 0's last file: a third branch, which outranks both
    p = run("train.py", f"--out_dir={out}", f"--resume_from={out / 'ckpt-00000012.pt'}",
            "--max_iters=13")
    assert "as branch 2" in p.stdout and os.path.exists(out / "ckpt-00000013-b2.pt")
    assert candidates(out)[0] == str(out / "ckpt-00000013-b2.pt")
    # resume_from the newest file is no branch
    p = run("train.py", f"--out_dir={out}", f"--resume_from={out / 'ckpt-00000013-b2.pt'}",
            "--max_iters=14")
    assert "as branch" not in p.stdout and os.path.exists(out / "ckpt-00000014-b2.pt")


def test_branch_from_the_same_state_is_exact(shakespeare_char, tmp_path):
    """A branch resumed with nothing changed retraces its parent bitwise (same data, same RNG)."""
    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=8")
    run("train.py", f"--out_dir={tmp_path}", f"--resume_from={tmp_path / 'ckpt-00000004.pt'}")
    assert_same_state(store.load(tmp_path / "ckpt-00000008-b1.pt"),
                      store.load(tmp_path / "ckpt-00000008.pt"))


def test_each_checkpoint_has_its_own_val_loss(shakespeare_char, tmp_path):
    p = run("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=12", "--eval_interval=4",
            "--checkpoint_interval=6", "--keep_last=5", "--always_save_checkpoint=True")
    printed = {int(i): float(v)
               for i, v in re.findall(r"^step (\d+): .* val loss ([\d.]+)", p.stdout, re.M)}
    assert sorted(printed) == [0, 4, 8, 12]
    six = store.load(tmp_path / PERIODIC.format(6))["metadata"]
    # no eval at 6: not step 4's loss as its own
    assert six["val_loss"] is None and six["last_eval"][0] == 4
    twelve = store.load(tmp_path / PERIODIC.format(12))["metadata"]
    assert round(twelve["val_loss"], 4) == printed[12]
    best = store.load(tmp_path / BEST)
    assert best["iter_num"] == 12 and round(best["metadata"]["val_loss"], 4) == printed[12]
    p = run("checkpoint.py", str(tmp_path / PERIODIC.format(6)))
    assert f"not measured at iteration 6 (last eval: iteration 4, {printed[4]:.4f})" in p.stdout
    p = run("checkpoint.py", str(tmp_path))
    assert re.search(r"^ckpt-00000006.pt\s+[0-9a-f]{8}\s+0\s+6\s+-\s", p.stdout, re.M)
    # a resumed run does not evaluate its first iteration again when the file holds that eval
    p = run("train.py", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=13")
    assert "step 12:" not in p.stdout and "step 13:" in p.stdout
    # but --eval_only always evaluates, also when the file holds its iteration's eval
    p = run("train.py", f"--out_dir={tmp_path}", "--eval_only=True")
    assert re.search(r"^step 13: train loss [\d.]+, val loss [\d.]+ \([\d.]+ bpb\)$", p.stdout,
                     re.M)


def test_one_training_process_per_out_dir(shakespeare_char, tmp_path):
    first = start(*ARGS, f"--out_dir={tmp_path}", "--max_iters=100000", "--checkpoint_interval=50")
    try:
        wait_for(first, r"^saved")
        p = run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=200000",
                "--learning_rate=3e-4", check=False)
        assert p.returncode == 1 and p.stderr.strip() == (
            f"error: out_dir {str(tmp_path)!r} is in use by another training process (pid "
            f"{first.pid}); wait for it to end, or pick another --out_dir")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 0
    # the lock went with the process
    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=5")


def test_resume_from_another_runs_file(shakespeare_char, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (a, b):
        run("train.py", *ARGS, f"--out_dir={out}", "--max_iters=4")
    before = contents(b)
    p = run("train.py", f"--out_dir={b}", f"--resume_from={a / 'ckpt-00000004.pt'}",
            "--max_iters=6", check=False)
    assert p.returncode == 1 and "holds another run" in p.stderr and "new --out_dir" in p.stderr
    assert contents(b) == before
    run("train.py", f"--out_dir={c}", f"--resume_from={a / 'ckpt-00000004.pt'}", "--max_iters=6")
    entry = store.load(c / PERIODIC.format(6))["metadata"]["resumes"][-1]
    # the lineage says which folder it came from
    assert entry["from"] == str(a / "ckpt-00000004.pt")


def test_sample_skips_a_damaged_best_file(shakespeare_char, tmp_path):
    run("train.py", *ARGS, f"--out_dir={tmp_path}", "--max_iters=8")
    (tmp_path / BEST).write_bytes(b"damaged")
    p = run("sample.py", f"--out_dir={tmp_path}", "--max_new_tokens=5", "--num_samples=1",
            "--device=cpu")
    assert ("warning: skipping" in p.stderr and "sampling from" in p.stderr
            and "ckpt-00000008.pt" in p.stderr)
