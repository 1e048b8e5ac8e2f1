"""
The sweep's bookkeeping, kept by Optuna: which trials exist, which run where, how each ended.

Every trial is enqueued when the study is made (each grid combination, `trials` times over when a
search samples the rest), so workers only ever take a waiting trial. Every change of a trial's
state goes through turn(), one at a time across all workers of the study: a lock file beside a
SQLite database (which has no row locks), an advisory lock in PostgreSQL or MySQL. So a waiting
trial goes to exactly one worker, and a trial that ended badly is enqueued again exactly once.

A try that does not end well (its process killed, its machine lost, the sweep stopped) is failed;
a copy with the same knobs is then enqueued by requeue(), which every worker runs before it takes
a trial (Optuna's heartbeat check enqueues it at once). The copy keeps the first try's number as
its `failed_trial`; that number names the out_dir, so the copy continues from its checkpoint. Who
fails a running try:
- the worker that ran it, when its process ended badly or was stopped;
- a restart of the same sweep on the same machine (same out_dir, host), at once, when the
  worker's process and its trial's process are both gone (kill -9 of the sweep);
- any worker, once the trial's heartbeat is older than the grace period (a lost machine).
A worker does not take again a trial it saw fail (a loop); another worker, or the next start,
does. A try whose knobs train.py refuses is failed for good ("permanent").
"""
import contextlib
import fcntl
import functools
import json
import os
import socket
import threading
import warnings
import zlib

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from console import RunError, UsageError
from keep.atomic import atomic_write, temp_name

HOST = socket.gethostname()
FINGERPRINT = "sweep"  # the study's user attribute holding the plan's fingerprint
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
# heartbeats are "experimental" since Optuna 2.9: stable enough for us
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
    """The study's URL: out_dir/study.db by default. postgresql:// names its driver (psycopg 3),
    which SQLAlchemy before 2.1 would not pick by itself."""
    if storage.startswith("postgresql://"):
        storage = "postgresql+psycopg://" + storage[len("postgresql://"):]
    return storage or "sqlite:///" + os.path.abspath(os.path.join(out_dir, "study.db"))


def hidden(url):
    """The URL for a message: no password."""
    head, at, tail = url.rpartition("@")
    return url if not at else head.split("://")[0] + "://***@" + tail


def stored(method):
    """A storage that fails (a server gone, a disk full) is the sweep's one error line."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError,
                OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RunError(f"storage {self.shown!r} failed: {first}") from None
    return call


class Study:
    """One sweep's Optuna study, in its storage."""

    def __init__(self, url, name, out_dir, heartbeat, sweep):
        """Opens (and on first use creates) the storage. Raises RunError when it cannot be reached,
        UsageError when the URL names no database Optuna knows. sweep: the sweep's knobs (the
        sampler's, the pruner's)."""
        self.out_dir, self.name, self.sweep = os.path.abspath(out_dir), name, sweep
        self.given = out_dir  # as the command gave it: sweep.json's paths start with it
        self.shown = hidden(url)
        self.skip = set()  # numbers this process saw fail: not taken by it again (a loop)
        self.lock = threading.Lock()  # sweep.json
        self.turns = threading.Lock()  # this process's threads; turn() adds the other processes
        self.kind = url.split(":", 1)[0].split("+", 1)[0]
        self.key = zlib.crc32(f"sweep:{name}".encode())  # the advisory lock's number
        kwargs = {"pool_pre_ping": True}
        if self.kind == "sqlite":  # workers of one machine wait for each other's writes
            kwargs = {"connect_args": {"timeout": 300}}
        try:
            self.engine = sqlalchemy.create_engine(url, **kwargs)  # turn()'s own connection
            with self.turn():  # (two first starts would both make the tables)
                self.storage = RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=max(1, int(heartbeat)),
                    grace_period=max(3, int(4 * heartbeat)),
                    heartbeat_stale_trial_callback=lambda study, t: self.again(
                        t, "its heartbeat stopped (a lost machine?)"))
        except ImportError:
            raise UsageError(f"storage {self.shown!r}: its database driver is not installed (for "
                             "postgresql:// pip install 'psycopg[binary]'; for mysql:// pip "
                             "install mysqlclient)") from None
        except (sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError):
            raise UsageError(f"storage {self.shown!r} is not a database URL: give "
                             "postgresql://user:password@host/db, mysql://..., or "
                             "sqlite:///path/study.db") from None
        except Exception as e:  # sqlalchemy's errors: a server that does not answer, a login
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RunError(f"storage {self.shown!r} cannot be reached: {first}") from None

    @contextlib.contextmanager
    def turn(self):
        """One state change at a time, across every worker of the study (see above)."""
        with self.turns:
            if self.kind == "sqlite":
                with open(self.engine.url.database + ".lock", "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX)  # (dropped when the file closes)
                    yield
                return
            take, drop = {"postgresql": ("SELECT pg_advisory_lock(:k)",
                                         "SELECT pg_advisory_unlock(:k)"),
                          "mysql": ("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)")
                          }.get(self.kind, (None, None))
            if take is None:
                yield
                return
            with self.engine.connect() as c:
                c = c.execution_options(isolation_level="AUTOCOMMIT")
                c.execute(sqlalchemy.text(take), {"k": self.key if self.kind != "mysql"
                                                  else str(self.key)})
                try:
                    yield
                finally:
                    c.execute(sqlalchemy.text(drop), {"k": self.key if self.kind != "mysql"
                                                      else str(self.key)})

    def worker(self):
        """This study for one worker thread: its own Optuna Study object (its sampler is seeded
        for each trial it takes); the storage, locks and what this process saw fail shared."""
        mine = object.__new__(Study)
        mine.__dict__.update(self.__dict__)
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

    @stored
    def open(self, fingerprint, objective, points):
        """Load the study, or make it with every trial enqueued. A study made for another plan is
        refused. Returns whether it was made now."""
        with self.turn():
            try:
                self.study = optuna.create_study(storage=self.storage, study_name=self.name,
                                                 direction=direction(objective))
            except optuna.exceptions.DuplicatedStudyError:
                self.study = optuna.load_study(study_name=self.name, storage=self.storage)
                held = self.study.user_attrs.get(FINGERPRINT)
                if held is None:
                    raise RunError(f"study {self.name!r} was left half-made by a sweep stopped "
                                   f"while making it: delete it (optuna delete-study "
                                   f"--study-name {self.name} --storage URL), or pick another "
                                   "--study") from None
                if held != fingerprint:
                    keys = sorted(k for k in set(held) | set(fingerprint)
                                  if held.get(k) != fingerprint.get(k))
                    raise UsageError(
                        f"study {self.name!r} (out_dir {self.out_dir!r}) holds a sweep with other "
                        f"settings ({', '.join(keys)} differ: {held.get(keys[0])!r} there, "
                        f"{fingerprint.get(keys[0])!r} here): pick another --out_dir (or "
                        "--study), or put the sweep config back as it was") from None
                return False
            for params in points:
                self.study.enqueue_trial(params)
            self.study.set_user_attr(FINGERPRINT, fingerprint)  # last: the study is whole
            return True

    def trials(self, states=None):
        return self.study.get_trials(deepcopy=False, states=states)


    def again(self, trial, why, **system_attrs):
        """Enqueue a copy of a try: the same knobs and folder, why the last try ended."""
        keep = {k: v for k, v in trial.user_attrs.items() if k in ("out_dir", "seconds")}
        self.study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={**keep, "ended": why},
            system_attrs={"failed_trial": origin(trial), **system_attrs}))

    def _requeue(self):
        """(in a turn) A copy of every trial whose newest try failed, unless it failed for good
        or this process saw it fail."""
        for t in latest(self.trials()):
            if t.state == TrialState.FAIL and not t.user_attrs.get("permanent") \
                    and origin(t) not in self.skip:
                self.again(t, t.user_attrs.get("ended") or "failed")

    @stored
    def take_over(self):
        """Fail the running trials nobody runs any more (a stale heartbeat, on any machine; or,
        at once, this sweep's own on this machine whose worker and trial processes are gone: a
        restart after kill -9), then enqueue a copy of each failed trial."""
        with self.turn():
            fail_stale_trials(self.study)
            for t in self.trials((TrialState.RUNNING,)):
                worker = t.system_attrs.get("worker", {})
                if worker.get("host") == HOST and worker.get("out_dir") == self.out_dir \
                        and gone(worker) and gone(t.system_attrs.get("child")):
                    self._fail(t, "its sweep and its process were killed")
            self._requeue()

    def _fail(self, trial, why, permanent=False):
        try:
            self.storage.set_trial_user_attr(trial._trial_id, "ended", why)
            if permanent:
                self.storage.set_trial_user_attr(trial._trial_id, "permanent", True)
            return self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    @stored
    def fail(self, trial_id, why, permanent=False, again=False):
        """This process's running try ended badly: FAIL. again: stopped by the sweep (a signal,
        its time_limit), so a copy is enqueued now for the next start; otherwise this process will
        not take the trial again (another worker, or the next start, continues it; never, when
        permanent). False when it was no longer running (taken over)."""
        with self.turn():
            trial = self.storage.get_trial(trial_id)
            if not again:
                self.skip.add(origin(trial))
            if trial.state != TrialState.RUNNING or not self._fail(trial, why, permanent):
                return False
            if again:
                self.again(trial, why)
            return True

    @stored
    def pop(self):
        """The next waiting trial, now running in this process's name (None when none waits):
        trials to continue first, then new ones in order. Its worker and heartbeat are recorded
        before it is running, so a running trial always has both."""
        with self.turn():
            trials = self.trials()
            taken = {origin(t) for t in trials if t.state in (TrialState.RUNNING, *DONE)}
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            for t in sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs,
                                                    t.number)):
                if origin(t) in self.skip:
                    continue
                if origin(t) in taken and not t.system_attrs.get("continues"):
                    # (cannot happen while every change takes its turn; never run it twice)
                    self.storage.set_trial_user_attr(t._trial_id, "duplicate", True)
                    self._fail(t, "a second copy of a running or finished trial", True)
                    continue
                self.storage.set_trial_system_attr(t._trial_id, "worker", {
                    "host": HOST, "out_dir": self.out_dir, **me()})
                self.storage.record_heartbeat(t._trial_id)
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    continue
                self.study.sampler = self.sampler(t.number)
                return optuna.Trial(self.study, t._trial_id)
        return None

    @stored
    def continue_pruned(self):
        """Enqueue each pruned trial again, to run on unpruned from its checkpoint. Returns how
        many."""
        with self.turn():
            pruned = [t for t in latest(self.trials()) if t.state == TrialState.PRUNED]
            for t in pruned:
                self.again(t, "pruned", continues=t.number)
        return len(pruned)

    @stored
    def busy(self):
        """Trials that may still need this worker: waiting ones it may take, running ones it may
        have to take over."""
        return any(t.state == TrialState.RUNNING or
                   (t.state == TrialState.WAITING and origin(t) not in self.skip)
                   for t in self.trials((TrialState.RUNNING, TrialState.WAITING)))

    @stored
    def unfinished(self):
        """(trials whose newest try neither completed nor was pruned, those of them that failed
        for good)."""
        left = [t for t in latest(self.trials()) if t.state not in DONE]
        return len(left), sum(bool(t.user_attrs.get("permanent")) for t in left)

    @stored
    def publish(self):
        """out_dir/sweep.json (every trial, the best) and out_dir/best, a link to the best trial's
        folder, both replaced whole. Returns the best trial's folder (None while none is
        complete)."""
        with self.lock:
            data = to_json(self.study, self.given)
            text = json.dumps(data, indent=1)
            atomic_write(os.path.join(self.out_dir, "sweep.json"), lambda f: f.write(text.encode()))
            folder = next((t["out_dir"] for t in data["trials"] if t["number"] == data["best"]),
                          None)
            link = os.path.join(self.out_dir, "best")
            now = os.readlink(link) if os.path.islink(link) else None
            if os.path.lexists(link) and now is None:  # not our link: a user's file, left alone
                raise RunError(f"{link} is not the sweep's link to its best trial: move it away")
            if folder and now != os.path.basename(folder):
                tmp = temp_name(link)
                os.symlink(os.path.basename(folder), tmp)
                os.replace(tmp, link)
            return folder

    @stored
    def summary(self):
        """Where the trials stand, each counted once (its newest try)."""
        trials = latest(self.trials())
        counts = {s: sum(t.state == s for t in trials) for s in TrialState}
        return (f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                f"{counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} waiting"
                + (f", {counts[TrialState.FAIL]} failed" if counts[TrialState.FAIL] else ""))


def origin(trial):
    """The number a trial's tries share: its out_dir's (a copy keeps the first try's)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def latest(trials):
    """The newest try of each trial: what its row in the table shows."""
    by = {}
    for t in trials:
        if not t.user_attrs.get("duplicate"):
            by[origin(t)] = t
    return [by[k] for k in sorted(by)]


def record(trial, out_dir):
    """A trial (its newest try) as sweep.json holds it. state: waiting, running, complete, pruned
    or fail; ended: why the last try did not finish."""
    attrs = trial.user_attrs
    return {"number": origin(trial),
            "params": trial.params or trial.system_attrs.get("fixed_params", {}),
            "state": trial.state.name.lower(), "value": trial.value,
            "out_dir": os.path.join(out_dir, attrs["out_dir"]) if "out_dir" in attrs else None,
            **{k: attrs.get(k) for k in ("iters", "best_val_loss", "scores", "seconds", "ended")}}


def to_json(study, out_dir):
    trials = [record(t, out_dir) for t in latest(study.get_trials(deepcopy=False))]
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(done, key=lambda t: t["value"]) if done else None
    return {"study": study.study_name,
            "objective": study.user_attrs.get(FINGERPRINT, {}).get("objective"),
            "direction": study.direction.name.lower(), "trials": trials,
            "best": best["number"] if best else None}

