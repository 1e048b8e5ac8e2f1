"""Many train.py runs as one experiment: a grid or a search over train.py's knobs, kept by Optuna.

    python sweep.py config/sweep_shakespeare_char_cpu.py              # run it (again: continue it)
    python sweep.py config/sweep_shakespeare_char_cpu.py --workers=2  # two trials at a time
    python sweep.py config/sweep_x.py --storage=postgresql://u:pw@db/sweeps  # on every machine
    python sweep.py --show out-sweep-shakespeare-char                 # the trials, best first
    python sweep.py --show out-a out-b                                # plain runs, side by side
    python plot.py out-sweep-shakespeare-char                         # every trial's val loss

Each trial is a real train.py run in its own folder under out_dir, with every guarantee a run
has: a sweep killed anywhere (kill -9, SIGTERM, time_limit, a lost machine) continues with the same
command; finished trials are kept, an interrupted one continues from its checkpoint. The config file
sets the globals below, like train.py's; --key=value overrides them (docs/sweeps.md).
"""
import os
import signal
import sys
import threading
import time

import compare
from configurator import config_keys, configure
from console import RunError, UsageError, console, fail, one_line_errors, say

# -----------------------------------------------------------------------------------------------
# the experiment (a sweep out_dir or study holding another experiment is refused)
out_dir = "out-sweep"
train_config = ""  # the train config every trial starts from (config/train_*.py)
flags = {}  # train.py knobs for every trial: {"max_iters": 1000}
grid = {}  # every combination runs: {"learning_rate": [3e-4, 1e-3], "n_layer": [4, 6]}
search = {}  # sampled: {"dropout": (0.0, 0.3), "learning_rate": (1e-4, 1e-2, "log")}
trials = 0  # searched trials (for each grid combination when there is a grid)
sampler = "tpe"  # how a search samples: 'tpe' (Optuna's TPE) or 'random'
seed = 0  # the sampler's seed (the trials' own seed is train.py's knob)
derived = {}  # knobs that follow the swept ones: {"min_lr": lambda k: k["learning_rate"] / 10}
objective = "val_loss"  # val_loss, val_bpb, or a task's <task>_acc / <task>_acc_norm (eval_tasks)
# pruning: stop a trial whose evals fall behind the median of the others at the same iteration
prune = False
prune_warmup = 0  # iterations before which no trial is pruned
prune_startup = 2  # trials that must have finished before any is pruned
continue_pruned = False  # run the pruned trials on from their checkpoints, unpruned
# where and how (these may change between runs of the same sweep)
workers = 1  # trials at a time on this machine (on GPUs: nproc GPUs each)
nproc = 1  # processes per trial (torchrun --nproc_per_node); a trial's GPUs
gpus = "auto"  # GPUs handed out: 'auto' (this process's), '0,1,2', '' (none: trials see all)
storage = ""  # Optuna's storage: '' (out_dir/study.db), or postgresql://... shared by machines
study = ""  # the study's name in the storage (default: out_dir's folder name)
remote_dir = ""  # each trial copies its checkpoints to remote_dir/<trial> (docs/remote.md)
heartbeat = 60.0  # seconds between a trial's heartbeats; 4 missed: another worker takes it over
time_limit = ""  # this sweep's budget ('3:50:00', '90m'): its trials save and it exits 0 in time
# -----------------------------------------------------------------------------------------------
KNOBS = config_keys(globals()) + ["flags", "grid", "search", "derived"]
if sys.argv[1:2] == ["--show"]:  # the table of a sweep, or of plain runs: compare.py
    one_line_errors()
    compare.show(sys.argv[2:])
    sys.exit(0)
configure(globals(), keys=KNOBS)
one_line_errors()
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # a Ctrl-C before the trials: no traceback
for knob, kind in (("flags", dict), ("grid", dict), ("search", dict), ("derived", dict)):
    if not isinstance(globals()[knob], kind):
        fail(f"{knob} must be a dict, got {globals()[knob]!r}")
if not train_config:
    fail("train_config is empty: name the train config every trial starts from "
         "(--train_config=config/train_shakespeare_char_cpu.py)")
for knob, low in (("workers", 1), ("nproc", 1), ("prune_startup", 0), ("prune_warmup", 0)):
    if globals()[knob] < low:
        fail(f"{knob}={globals()[knob]!r} must be at least {low}")
if not heartbeat > 0:
    fail(f"heartbeat={heartbeat!r} must be above 0 seconds")
if sampler not in ("tpe", "random"):
    fail(f"sampler={sampler!r} is not one of 'tpe', 'random'")
try:
    import optuna  # noqa: F401
except ImportError:
    fail("sweep.py needs Optuna: pip install optuna (it is in requirements.txt)", 1)

from keep.preemption import parse_duration  # noqa: E402
from sweeps.plan import Plan, describe_derived  # noqa: E402
from sweeps.study import Study, storage_url  # noqa: E402
from sweeps.trial import Runner, gpu_slots  # noqa: E402

sweep = {k: globals()[k] for k in KNOBS}
budget = parse_duration(time_limit)
slots = gpu_slots(gpus, workers, nproc)
plan = Plan(sweep)  # every trial's knobs checked by train.py's rules: one line if one is refused
if os.path.isfile(out_dir) or compare.is_run(out_dir):
    fail(f"out_dir {out_dir!r} holds a training run, not a sweep: pick another --out_dir")
url = storage_url(storage, out_dir)
if not storage:
    os.makedirs(out_dir, exist_ok=True)
db = Study(url, study or os.path.basename(os.path.abspath(out_dir)), out_dir, heartbeat, sweep)
made = db.open(plan.fingerprint(), objective, plan.grid_points())
os.makedirs(out_dir, exist_ok=True)
console.keep()
console.open(out_dir)  # the sweep's lines also go to out_dir/console.log
say(f"sweep {db.name!r}: {'made' if made else 'continued'} in {db.shown}: {db.summary()}")
for line in describe_derived(plan):
    say(f"derived: {line}")
if continue_pruned:
    say(f"continue_pruned: {db.continue_pruned()} pruned trials continue from their checkpoints")
db.take_over()  # this sweep's own trials that a kill -9 left running: continued now
db.publish()  # sweep.json and the table (sweep.py --show) from the start

# no trial starts in the budget's last tenth (15 s to 60 s): too little for a start and a save
deadline = time.time() + budget if budget else None
margin = min(60.0, max(15.0, 0.1 * budget))
runner = Runner(plan, sweep, db, say, deadline, slots)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: runner.stop(signum))


def work(slot):
    """One worker: takes waiting trials until none is left, then waits while others run (one of
    them may need taking over: its machine lost). Anything that stops it (the storage gone, a
    full disk) stops the others too: their trials save, and the error is the sweep's last line."""
    try:
        mine = db.worker()
        while runner.signum is None and not runner.out_of_time and not (
                deadline and time.time() > deadline - margin):
            mine.take_over()
            trial = mine.pop()
            if trial is None:
                if not mine.busy():
                    return
                time.sleep(min(heartbeat, 5.0))
                continue
            runner.run(trial, slot, mine)
            db.publish()
            say(f"sweep: {db.summary()}")
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        errors.append(text if isinstance(e, (UsageError, RunError)) else
                      f"{type(e).__name__}: {text}")
        runner.stop(signal.SIGTERM)


errors = []


threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):  # the main thread stays free for the signals
    for t in threads:
        t.join(0.5)
if errors:  # (the storage may be what failed: nothing more is asked of it)
    fail(f"a worker stopped: {errors[0]}; the running trials saved, and the same command "
         "continues the sweep", 1)
db.publish()
compare.show([out_dir], head=20)
left, lost = db.unfinished()
if runner.signum is not None or (left and (runner.out_of_time or deadline and
                                          time.time() > deadline - margin)):
    why = signal.Signals(runner.signum).name if runner.signum else "time_limit"
    say(f"sweep stopped ({why}): its trials saved; the same command continues it")
    sys.exit(130 if runner.signum == signal.SIGINT else 0)
if left:
    parts = [f"{left - lost} to continue: see their train.log; the same command continues them"]
    parts = parts[:left > lost] + [f"{lost} failed for good: sweep.json says why"][:lost > 0]
    fail(f"{left} trials did not finish ({'; '.join(parts)})", 1)
best = db.publish()
say(f"sweep complete: {db.summary()}" + (f"; the best trial: {os.path.join(out_dir, 'best')} -> "
                                         f"{os.path.basename(best)}" if best else ""))
