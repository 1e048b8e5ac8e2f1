"""sweep.py with real processes: trials are real train.py runs, the study a real SQLite file or a
real PostgreSQL server; kills are real kill -9s, stops real signals. A sweep killed anywhere
continues with the same command, no trial runs twice, and each trial ends bitwise equal to a plain
train.py run with the same knobs."""
import ast
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import TINY, popen, run, wait_for
from test_resume import assert_same_state
from keep import store



def literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# TINY as a dict (learning_rate is what the grids sweep)
FLAGS = {k[2:]: literal(v) for k, v in (f.split("=", 1) for f in TINY) if k != "--learning_rate"}
FLAGS.update(eval_interval=20, checkpoint_interval=20, log_interval=20, always_save_checkpoint=True)


def sweep_config(path, out, grid=None, **knobs):
    """A sweep config file over the CPU recipe with TINY's model, its trials in `out` (a flag of
    None: TINY's value left out)."""
    flags = {k: v for k, v in dict(FLAGS, **knobs.pop("flags", {})).items() if v is not None}
    lines = [f"out_dir = {str(out)!r}", "train_config = 'config/train_shakespeare_char_cpu.py'",
             f"flags = {flags!r}",
             f"grid = {grid if grid is not None else {'learning_rate': [1e-3, 3e-3]}!r}"]
    lines += [f"{k} = {v!r}" for k, v in knobs.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def sweep(*args, **popen_options):
    """sweep.py as a background job (stdout piped, stderr with it)."""
    return popen("sweep.py", list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True, **popen_options)


def launches(folder):
    """The train.py commands a trial's train.log records, one per start."""
    with open(os.path.join(folder, "train.log")) as f:
        return re.findall(r"^--- sweep: trial \d+, [^:]+:\d\d:\d\d: (.*)$", f.read(), re.M)


def resumed_at(folder):
    """The iterations the trial's starts resumed from (train.py's own lines)."""
    with open(os.path.join(folder, "train.log")) as f:
        return [int(i) for i in re.findall(r"^resuming from .* at iteration (\d+)", f.read(),
                                           re.M)]


def trials(out):
    with open(os.path.join(out, "sweep.json")) as f:
        return json.load(f)


def train_pid(folder):
    """The pid of the train.py that holds a trial's folder (its .lock names it)."""
    for _ in range(100):
        try:
            with open(os.path.join(folder, ".lock")) as f:
                text = f.read().split()
            if len(text) == 2:
                return int(text[1])
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no train.py holds {folder}")


def saved(folder):
    """A trial folder's periodic checkpoints (iterations), once it has one."""
    for _ in range(300):
        found = [int(n[5:13]) for n in os.listdir(folder) if re.fullmatch(r"ckpt-\d{8}\.pt", n)]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint in {folder}")


def assert_like_plain_run(folder, tmp_path, max_iters):
    """The trial's last checkpoint equals that of train.py run alone with the trial's knobs."""
    knobs = launches(folder)[-1].split()[1:]  # (train.py's path first)
    assert knobs[0] == "config/train_shakespeare_char_cpu.py"
    plain = tmp_path / ("plain-" + os.path.basename(folder))
    run("train.py", *[k for k in knobs if not k.startswith("--out_dir=")], f"--out_dir={plain}")
    name = f"ckpt-{max_iters:08d}.pt"
    assert_same_state(store.load(os.path.join(folder, name)), store.load(str(plain / name)))


def test_a_killed_sweep_and_a_killed_trial_continue_with_the_same_command(shakespeare_char,
                                                                          tmp_path):
    """kill -9 of trial 0's train.py: the sweep says so and goes on with trial 1; kill -9 of the
    sweep during trial 1 (its trial is told to save by the kernel, PR_SET_PDEATHSIG); the same
    command then continues both from their checkpoints, and each ends bitwise equal to a plain
    train.py run."""
    out = tmp_path / "sw"
    cfg = sweep_config(tmp_path / "sweep.py", out, flags={"max_iters": 1500})
    job = sweep(cfg)
    wait_for(job, r"trial 0 at iteration 20:")
    saved(out / "000-learning_rate=0.001")  # (the eval's row comes before its checkpoint)
    os.kill(train_pid(out / "000-learning_rate=0.001"), signal.SIGKILL)
    wait_for(job, r"trial 0 killed by SIGKILL")
    wait_for(job, r"trial 1 at iteration 20:")
    saved(out / "001-learning_rate=0.003")
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    rest = run("sweep.py", cfg, check=False, timeout=600)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "trial 0 started (continuing it)" in rest.stdout
    assert "trial 1 started (continuing it)" in rest.stdout
    for folder in ("000-learning_rate=0.001", "001-learning_rate=0.003"):
        assert len(launches(out / folder)) == 2, folder
        assert resumed_at(out / folder)[0] >= 20, (folder, resumed_at(out / folder))  # not 0
        assert_like_plain_run(out / folder, tmp_path, 1500)
    assert [t["state"] for t in trials(out)["trials"]] == ["complete", "complete"]


def test_sigterm_and_time_limit_stop_the_sweep_with_exit_0_and_it_continues(shakespeare_char,
                                                                            tmp_path):
    """time_limit, then SIGTERM: each time the running trial saves and the sweep exits 0, and the
    next start continues the trial from that checkpoint."""
    out = tmp_path / "sw"
    folder = out / "000-learning_rate=0.001"
    cfg = sweep_config(tmp_path / "sweep.py", out, grid={"learning_rate": [1e-3]},
                       flags={"max_iters": 10**6})
    first = run("sweep.py", cfg, "--time_limit=20", check=False, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "sweep stopped (time_limit)" in first.stdout
    assert trials(out)["trials"][0]["state"] == "waiting"  # to continue
    job = sweep(cfg)
    wait_for(job, r"trial 0 started \(continuing it\)")
    wait_for(job, r"trial 0 at iteration \d+:")  # (a new eval: the first one's are not printed)
    job.send_signal(signal.SIGTERM)
    wait_for(job, r"sweep stopped \(SIGTERM\): its trials saved")
    assert job.wait(timeout=60) == 0
    starts = resumed_at(folder)
    assert len(launches(folder)) == 2 and len(starts) == 1 and starts[0] > 20
    assert max(saved(folder)) > starts[0]  # the SIGTERM's checkpoint, where the next goes on


def test_two_sweeps_on_one_out_dir_split_the_trials(shakespeare_char, tmp_path):
    """Two sweep processes (one of them with two workers) on one out_dir: every trial runs once,
    in one of them."""
    out = tmp_path / "sw"
    cfg = sweep_config(tmp_path / "sweep.py", out,
                       grid={"learning_rate": [1e-3, 2e-3, 3e-3, 4e-3]}, flags={"max_iters": 300})
    a, b = sweep(cfg, "--workers=2"), sweep(cfg)
    ran = []
    for job in (a, b):
        text, _ = job.communicate(timeout=600)
        assert job.returncode == 0, text
        ran.append(set(map(int, re.findall(r"^trial (\d+) started", text, re.M))))
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}, ran
    assert len(ran[0]) >= 1 and len(ran[1]) >= 1  # both took part
    for t in trials(out)["trials"]:
        assert t["state"] == "complete" and len(launches(t["out_dir"])) == 1


@pytest.fixture
def postgres(tmp_path):
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(str(tmp_path / "pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


def test_two_machines_share_a_postgres_study_and_one_takes_over_a_lost_trial(
        shakespeare_char, tmp_path, postgres):
    """Two sweeps in folders of their own share a study in PostgreSQL and a file:// remote_dir.
    Machine A is lost (its sweep and its trial killed -9) mid-trial: once the trial's heartbeat is
    stale, machine B takes it over and continues it from the remote copy of its checkpoint."""
    remote = f"file://{tmp_path}/remote"
    common = ["--study=shared", f"--storage={postgres}", f"--remote_dir={remote}",
              "--heartbeat=1"]
    cfg = sweep_config(tmp_path / "sweep.py", tmp_path / "unused", flags={"max_iters": 1500})
    a = sweep(cfg, f"--out_dir={tmp_path}/a", *common)
    wait_for(a, r"trial 0 at iteration 20:")
    copy = tmp_path / "remote" / "000-learning_rate=0.001"
    for _ in range(300):  # a periodic checkpoint's copy committed in remote_dir
        if os.path.isdir(copy) and any(re.fullmatch(r"ckpt-\d{8}\.pt\.commit", n)
                                       for n in os.listdir(copy)):
            break
        time.sleep(0.1)
    trial_a = train_pid(tmp_path / "a" / "000-learning_rate=0.001")
    b = sweep(cfg, f"--out_dir={tmp_path}/b", *common)
    wait_for(b, r"trial 1 started")
    for pid in (a.pid, trial_a):
        os.kill(pid, signal.SIGKILL)
    a.wait()
    text, _ = b.communicate(timeout=600)
    assert b.returncode == 0, text
    assert "trial 0 started (continuing it)" in text and "sweep complete" in text
    taken = tmp_path / "b" / "000-learning_rate=0.001"
    assert resumed_at(taken)[0] >= 20  # from A's checkpoint in remote_dir, not from iteration 0
    assert_like_plain_run(taken, tmp_path, 1500)
    assert [t["state"] for t in trials(tmp_path / "b")["trials"]] == ["complete", "complete"]


def test_a_storage_that_dies_mid_sweep_stops_it_with_one_line(shakespeare_char, tmp_path):
    """The PostgreSQL server goes away while a trial runs: the sweep warns, then stops that trial
    (it saves) and exits 1 with one error line, not a traceback."""
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(str(tmp_path / "pg"), cleanup_mode="stop")
    cfg = sweep_config(tmp_path / "sweep.py", tmp_path / "sw", flags={"max_iters": 10**6})
    job = sweep(cfg, f"--storage={server.get_uri()}", "--heartbeat=1")
    wait_for(job, r"trial 0 at iteration 20:")
    server.cleanup()  # (stops the server)
    text, _ = job.communicate(timeout=120)
    lines = text.strip().splitlines()
    assert job.returncode == 1, text
    assert "warning: trial 0: the storage failed" in text and "Traceback" not in text
    assert lines[-1].startswith("error: a worker stopped: the storage has failed for"), text
    with open(tmp_path / "sw" / "000-learning_rate=0.001" / "train.log") as f:
        assert "saving a checkpoint, then exiting" in f.read()


def test_a_searched_value_train_py_refuses_fails_that_trial_for_good(shakespeare_char, tmp_path):
    """n_head searched over 1..4 with n_embd=32: 3 does not divide it. That trial fails before it
    starts, the others run; the sweep exits 1 and a second start does not try it again."""
    out = tmp_path / "sw"
    cfg = sweep_config(tmp_path / "sweep.py", out, grid={}, search={"n_head": (1, 4)}, trials=6,
                       sampler="random", flags={"max_iters": 10, "n_head": None})
    first = run("sweep.py", cfg, check=False, timeout=300)
    data = trials(out)["trials"]
    bad = [t for t in data if t["params"]["n_head"] == 3]
    assert bad, data  # (random's picks with seed 0 include 3)
    assert first.returncode == 1 and first.stdout.count("failed for good") == len(bad)
    assert all(t["state"] == "fail" and "must be a multiple of n_head=3" in t["ended"]
               for t in bad)
    assert all(t["state"] == "complete" for t in data if t not in bad)
    second = run("sweep.py", cfg, check=False, timeout=300)
    assert second.returncode == 1 and "started" not in second.stdout


def test_pruning_stops_a_trial_behind_the_median_and_continue_pruned_finishes_it(
        shakespeare_char, tmp_path):
    """A learning rate far too low falls behind the finished trial at the same iteration: it is
    stopped with a checkpoint and marked pruned; continue_pruned runs it on from there."""
    out = tmp_path / "sw"
    cfg = sweep_config(tmp_path / "sweep.py", out, grid={"learning_rate": [3e-3, 1e-6]},
                       flags={"max_iters": 2000}, prune=True, prune_startup=1)
    first = run("sweep.py", cfg, timeout=600)
    assert re.search(r"trial 1 pruned at iteration \d+", first.stdout), first.stdout
    assert [t["state"] for t in trials(out)["trials"]] == ["complete", "pruned"]
    pruned = out / "001-learning_rate=1e-06"
    stopped = trials(out)["trials"][1]["iters"]
    assert 0 < stopped < 2000
    second = run("sweep.py", cfg, "--continue_pruned", timeout=600)
    assert "trial 1 started (continuing it)" in second.stdout
    assert resumed_at(pruned) == [stopped]
    assert [t["state"] for t in trials(out)["trials"]] == ["complete", "complete"]


@pytest.fixture(scope="module")
def done(shakespeare_char, tmp_path_factory):
    """A finished two-trial sweep."""
    tmp = tmp_path_factory.mktemp("done")
    cfg = sweep_config(tmp / "sweep.py", tmp / "sw", flags={"max_iters": 40})
    p = run("sweep.py", cfg, timeout=300)
    return tmp, cfg, p.stdout


def test_the_table_json_plot_and_best_link_of_a_sweep(done):
    tmp, cfg, stdout = done
    out = tmp / "sw"
    data = trials(out)
    best = min(data["trials"], key=lambda t: t["value"])
    assert data["best"] == best["number"] and data["objective"] == "val_loss"
    assert {t["number"]: t["params"] for t in data["trials"]} == {
        0: {"learning_rate": 1e-3}, 1: {"learning_rate": 3e-3}}
    assert all(t["iters"] == 40 and t["value"] == t["best_val_loss"] for t in data["trials"])
    assert os.path.realpath(out / "best") == os.path.realpath(best["out_dir"])
    table = run("sweep.py", "--show", str(out)).stdout.splitlines()
    assert table[0].split() == ["run", "state", "iters", "best", "val", "time"]
    assert table[1].startswith("*") and f"learning_rate={best['params']['learning_rate']:.4g}" \
        in table[1]  # best first, starred
    assert "complete" in table[2]
    plot = run("plot.py", str(out))
    assert os.path.getsize(out / "loss.png") > 10000, plot.stdout
    sample = run("sample.py", f"--out_dir={out / 'best'}", "--num_samples=1",
                 "--max_new_tokens=5", "--device=cpu")
    assert sample.returncode == 0


def test_plain_runs_side_by_side_are_labelled_by_the_knobs_that_differ(done):
    tmp, _, _ = done
    a, b = tmp / "sw" / "000-learning_rate=0.001", tmp / "sw" / "001-learning_rate=0.003"
    table = run("sweep.py", "--show", str(a), str(b)).stdout
    assert "learning_rate=0.001" in table and "learning_rate=0.003" in table
    assert "min_lr=0.0001" in table and "000-" not in table  # knobs, not folder names
    to = tmp / "both.png"
    run("plot.py", str(a), str(b), f"--to={to}")
    assert os.path.getsize(to) > 10000


def one_line(p, code=2):
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), \
        (p.returncode, p.stdout, p.stderr)
    return lines[0]


@pytest.mark.parametrize("knobs, expected", [
    (dict(grid={"learning_rat": [1e-3]}), "train.py has no knob 'learning_rat'"),
    (dict(grid={"learning_rate": [1e-3, -1.0]}), "learning_rate=-1.0 must be at least 0"),
    (dict(grid={"dropout": [0.1, 1.5]}), "dropout=1.5 must be between 0 and 0.999"),
    (dict(grid={"n_head": [3]}), "n_head is set twice"),
    (dict(grid={}), "the sweep varies nothing"),
    (dict(grid={"learning_rate": []}), "needs a non-empty list"),
    (dict(grid={"out_dir": ["x"]}), "is the sweep's to set"),
    (dict(grid={}, search={"learning_rate": (1e-2, 1e-4, "log")}, trials=2), "low < high"),
    (dict(grid={}, search={"dropout": (0.0, 0.5)}), "a search needs trials >= 1"),
    (dict(grid={}, search={"n_layer": (1, 2.5)}, trials=2), "int knob: give it int ends"),
    (dict(objective="piqa_acc"), "needs piqa among eval_tasks"),
    (dict(train_config="config/nope.py"), "is not a file"),
    (dict(workers=0), "workers=0 must be at least 1"),
    (dict(storage="mysql://x/y"), "its database driver is not installed"),
    (dict(storage="nosuch://x/y"), "is not a database URL"),
])
def test_a_bad_sweep_config_is_one_line_before_any_trial(shakespeare_char, tmp_path, knobs,
                                                         expected):
    out = tmp_path / "sw"
    cfg = sweep_config(tmp_path / "sweep.py", out, **{"grid": {"learning_rate": [1e-3]}, **knobs})
    line = one_line(run("sweep.py", cfg, check=False))
    assert expected in line, line
    assert not os.path.exists(out)  # nothing made, no trial run


def test_what_a_sweep_cannot_reach_or_does_not_own_is_one_line(done, tmp_path):
    tmp, cfg, _ = done
    # the sweep config changed under its out_dir
    line = one_line(run("sweep.py", cfg, "--grid={'learning_rate': [1e-3, 2e-3]}", check=False))
    assert "holds a sweep with other settings (grid differ" in line
    # a server that does not answer
    line = one_line(run("sweep.py", cfg, f"--out_dir={tmp_path}/x",
                        "--storage=postgresql://u:secret@127.0.0.1:1/db", check=False), 1)
    assert "cannot be reached" in line and "secret" not in line
    # an out_dir that holds a plain run
    line = one_line(run("sweep.py", cfg, f"--out_dir={tmp / 'sw' / '000-learning_rate=0.001'}",
                        check=False))
    assert "holds a training run, not a sweep" in line
    # no Optuna: a folder on PYTHONPATH whose optuna cannot be imported
    shadow = tmp_path / "shadow" / "optuna"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no optuna here')\n")
    line = one_line(run("sweep.py", cfg, env={"PYTHONPATH": str(shadow.parent)}, prefix=["env"],
                        check=False), 1)
    assert "pip install optuna" in line
