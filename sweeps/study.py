"""
The sweep's bookkeeping, kept by Optuna: which trials exist, which run where, how each ended.

Every trial is enqueued when the study is made (each grid combination, `trials` times over when a
search samples the rest), so that workers only ever take a waiting trial: the storage hands each
one to exactly one worker (its RUNNING transition is atomic), on one machine (SQLite) or many
(PostgreSQL, MySQL). A trial that does not end well (its process killed, its machine lost, the
sweep stopped) is failed and enqueued again with the same knobs, once, by whoever saw it end
(Optuna's RetryHeartbeatStaleTrialCallback); the copy keeps the first one's number as its `failed_trial`,
which names its out_dir, so it continues from its checkpoint. Who saw it end:
- the worker that ran it, when its process ended badly or was stopped;
- a restart of the same sweep on the same machine (same out_dir, host), at once, when the
  worker's process and its trial's process are both gone (kill -9 of the sweep);
- any worker, once the trial's heartbeat is older than the grace period (a lost machine).
"""
import contextlib
import copy
import fcntl
import json
import os
import socket
import threading
import time
import warnings

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from console import RunError, UsageError
from keep.atomic import atomic_write, temp_name

HOST = socket.gethostname()
FINGERPRINT = "sweep"  # the study's user attribute holding the plan's fingerprint
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
# heartbeats and their retry callback are "experimental" since Optuna 2.8: stable enough for us
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def process_start(pid):
    """The process's start time in clock ticks since boot (None if there is no such process): a pid
    together with it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def me(pid=None):
    pid = pid or os.getpid()
    return {"pid": pid, "started": process_start(pid)}


def gone(record):
    return not record or process_start(record["pid"]) != record["started"]


def direction(objective):
    """Task accuracies are maximised, losses minimised."""
    return "maximize" if objective.endswith(("_acc", "_acc_norm")) else "minimize"


def storage_url(storage, out_dir):
    return storage or "sqlite:///" + os.path.abspath(os.path.join(out_dir, "study.db"))


def hidden(url):
    """The URL for a message: no password."""
    head, at, tail = url.rpartition("@")
    return url if not at else head.split("://")[0] + "://***@" + tail


class Study:
    """One sweep's Optuna study, in its storage."""

    def __init__(self, url, name, out_dir, heartbeat, sweep):
        """Opens (and on first use creates) the storage. Raises RunError when it cannot be reached,
        UsageError when the URL names no database Optuna knows. sweep: the sweep's knobs (the
        sampler's, the pruner's)."""
        self.out_dir, self.name, self.sweep = os.path.abspath(out_dir), name, sweep
        self.given = out_dir  # as the command gave it: sweep.json's paths start with it
        self.shown = hidden(url)
        self.skip = set()  # numbers this process saw fail: not retried by it again (a loop)
        self.lock = threading.Lock()
        # SQLite has no row locks (Optuna's SELECT ... FOR UPDATE is a plain read there): two
        # processes could both make its tables, take one waiting trial, or fail and retry one
        # running trial. Its changes go one at a time under a lock file beside the database;
        # PostgreSQL and MySQL lock the trial's row.
        self.turns = threading.Lock()
        self.lock_file = (url[len("sqlite:///"):] + ".lock" if url.startswith("sqlite:///")
                          else None)
        kwargs = {"pool_pre_ping": True}
        if url.startswith("sqlite"):  # workers of one machine wait for each other's writes
            kwargs = {"connect_args": {"timeout": 300}}
        try:
            with self.turn():
                self.storage = RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=max(1, int(heartbeat)),
                    grace_period=max(3, int(4 * heartbeat)),
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=None))
        except ImportError:
            raise UsageError(f"storage {hidden(url)!r}: its database driver is not installed (for "
                             "postgresql:// pip install 'psycopg[binary]'; for mysql:// pip "
                             "install mysqlclient)") from None
        except (sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError):
            raise UsageError(f"storage {hidden(url)!r} is not a database URL: give "
                             "postgresql://user:password@host/db, mysql://..., or "
                             "sqlite:///path/study.db") from None
        except Exception as e:  # sqlalchemy's errors: a server that does not answer, a login
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(f"storage {hidden(url)!r} cannot be reached: {first}") from None
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=None)

    def worker(self):
        """This study for one worker thread: its own Optuna Study object (its sampler is seeded
        for each trial it takes), the storage and what this process saw fail shared."""
        mine = copy.copy(self)
        mine.study = optuna.load_study(study_name=self.name, storage=self.storage,
                                       pruner=optuna.pruners.MedianPruner(
                                           n_startup_trials=self.sweep["prune_startup"],
                                           n_warmup_steps=self.sweep["prune_warmup"]))
        return mine

    def sampler(self, number):
        """The sampler of trial `number`: seeded by the sweep's seed and the number, so a trial
        samples the same knobs whichever worker takes it, and two workers never the same."""
        kind = (optuna.samplers.TPESampler if self.sweep["sampler"] == "tpe"
                else optuna.samplers.RandomSampler)
        return kind(seed=(self.sweep["seed"] * 1000003 + number) % 2**32)

    def open(self, fingerprint, objective, points):
        """Load the study, or make it with every trial enqueued. A study made for another plan is
        refused."""
        with self.turn():
            return self._open(fingerprint, objective, points)

    def _open(self, fingerprint, objective, points):
        try:
            self.study = optuna.create_study(storage=self.storage, study_name=self.name,
                                             direction=direction(objective))
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=self.name, storage=self.storage)
            self._check(fingerprint)
            return False
        for params in points:
            self.study.enqueue_trial(params)
        self.study.set_user_attr(FINGERPRINT, fingerprint)  # last: the study is whole
        return True

    def _check(self, fingerprint):
        for _ in range(60):  # another worker may be enqueueing its trials right now
            held = self.study.user_attrs.get(FINGERPRINT)
            if held is not None:
                break
            time.sleep(1)
            self.study = optuna.load_study(study_name=self.name, storage=self.storage)
        else:
            raise RunError(f"study {self.name!r} was left half-made by a sweep that stopped while "
                           f"making it: delete it (optuna delete-study --study-name {self.name} "
                           "--storage URL), or pick another --study")
        if held != fingerprint:
            keys = sorted(k for k in set(held) | set(fingerprint) if held.get(k) !=
                          fingerprint.get(k))
            raise UsageError(
                f"study {self.name!r} (out_dir {self.out_dir!r}) holds a sweep with other settings "
                f"({', '.join(keys)} differ: {held.get(keys[0])!r} there, "
                f"{fingerprint.get(keys[0])!r} here): pick another --out_dir (or --study), or "
                "put the sweep config back as it was")

    def trials(self, states=None):
        return self.study.get_trials(deepcopy=False, states=states)

    @staticmethod
    def origin(trial):
        """The number a trial's retries share: its out_dir's."""
        return trial.system_attrs.get("failed_trial", trial.number)

    @contextlib.contextmanager
    def turn(self):
        """One state change at a time (see lock_file)."""
        with self.turns:
            if self.lock_file is None:
                yield
                return
            with open(self.lock_file, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # (dropped when the file closes)
                yield

    def take_over(self):
        """Fail, and enqueue again, the running trials nobody runs any more: those whose
        heartbeat is stale (any machine), and this sweep's own on this machine whose worker and
        trial processes are gone (a restart after kill -9 need not wait for the heartbeat)."""
        with self.turn():
            fail_stale_trials(self.study)
        for t in self.trials((TrialState.RUNNING,)):
            worker = t.system_attrs.get("worker", {})
            if worker.get("host") == HOST and worker.get("out_dir") == self.out_dir \
                    and gone(worker) and gone(t.system_attrs.get("child")):
                self.fail(t.number, "its worker and its process are gone")

    def fail(self, number, why):
        """A running trial failed (and enqueued again) by this process, if nobody did first."""
        with self.turn():
            trial = self.trials()[number]
            try:
                self.storage.set_trial_user_attr(trial._trial_id, "ended", why)
                if not self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    return False
            except optuna.exceptions.UpdateFinishedTrialError:
                return False
            self.retry(self.study, self.storage.get_trial(trial._trial_id))
            return True

    def pop(self):
        """The next waiting trial, now running in this process's name (None when none waits):
        trials to continue first, then new ones in order."""
        with self.turn():
            waiting = self.trials((TrialState.WAITING,))
            for t in sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs,
                                                    t.number)):
                if self.origin(t) in self.skip:
                    continue
                try:
                    if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                        continue  # another worker took it first
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                self.storage.set_trial_system_attr(t._trial_id, "worker", {
                    "host": HOST, "out_dir": self.out_dir, **me()})
                self.storage.record_heartbeat(t._trial_id)
                self.study.sampler = self.sampler(t.number)
                return optuna.Trial(self.study, t._trial_id)
        return None

    def busy(self):
        """Trials that may still need this worker: waiting ones it may take, running ones it may
        have to take over."""
        return any(t.state == TrialState.RUNNING or
                   (t.state == TrialState.WAITING and self.origin(t) not in self.skip)
                   for t in self.trials((TrialState.RUNNING, TrialState.WAITING)))

    def continue_pruned(self):
        """Enqueue each pruned trial again (the newest of its number), to run on unpruned from its
        checkpoint. Returns how many."""
        n = 0
        with self.turn():
            for t in latest(self.trials()):
                if t.state == TrialState.PRUNED:
                    self.study.add_trial(optuna.create_trial(
                        state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                        user_attrs=t.user_attrs,
                        system_attrs={"failed_trial": self.origin(t), "continues": t.number}))
                    n += 1
        return n

    def unfinished(self):
        """Trials whose newest try neither completed nor was pruned."""
        return sum(t.state not in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in latest(self.trials()))

    def publish(self):
        """out_dir/sweep.json (every trial, the best) and out_dir/best, a link to the best trial's
        folder, both replaced whole."""
        with self.lock:
            text = to_json(self.study, self.given)
            atomic_write(os.path.join(self.out_dir, "sweep.json"), lambda f: f.write(text.encode()))
            best = json.loads(text)["best"]
            folder = next((t["out_dir"] for t in json.loads(text)["trials"]
                           if t["number"] == best), None)
            link = os.path.join(self.out_dir, "best")
            folder = folder and os.path.basename(folder)
            if folder and (not os.path.islink(link) or os.readlink(link) != folder):
                tmp = temp_name(link)
                os.symlink(folder, tmp)
                os.replace(tmp, link)

    def summary(self):
        """Where the trials stand, each counted once (its newest try)."""
        trials = latest(self.trials())
        counts = {s: sum(t.state == s for t in trials) for s in TrialState}
        return (f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                f"{counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} waiting"
                + (f", {counts[TrialState.FAIL]} failed" if counts[TrialState.FAIL] else ""))


def latest(trials):
    """The newest trial of each origin: what a trial's row in the table shows."""
    by = {}
    for t in trials:
        by[t.system_attrs.get("failed_trial", t.number)] = t
    return [by[k] for k in sorted(by)]


def state_name(trial):
    return trial.state.name.lower()


def record(trial, out_dir):
    """A trial as sweep.json holds it."""
    attrs = trial.user_attrs
    return {"number": trial.system_attrs.get("failed_trial", trial.number),
            "params": trial.params or trial.system_attrs.get("fixed_params", {}),
            "state": state_name(trial), "value": trial.value,
            "out_dir": os.path.join(out_dir, attrs["out_dir"]) if "out_dir" in attrs else None,
            **{k: attrs.get(k) for k in ("iters", "best_val_loss", "scores", "seconds", "ended")}}


def to_json(study, out_dir):
    trials = [record(t, out_dir) for t in latest(study.get_trials(deepcopy=False))]
    trials.sort(key=lambda t: t["number"])
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(done, key=lambda t: t["value"]) if done else None
    objective = study.user_attrs.get(FINGERPRINT, {}).get("objective")
    return json.dumps({"study": study.study_name, "objective": objective,
                       "direction": study.direction.name.lower(),
                       "trials": trials, "best": best["number"] if best else None}, indent=1)
