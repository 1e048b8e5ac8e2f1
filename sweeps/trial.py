"""
One trial: a real train.py run (under torchrun when it takes several processes) in its own
out_dir under the sweep's, watched until it ends.

The trial's process runs in a session of its own, so a Ctrl-C at the terminal reaches the sweep
alone, which passes each stop signal on (train.py then saves and exits); it is also sent SIGTERM
by the kernel if the sweep dies (kill -9), so a killed sweep leaves no trial training on, only
trials that saved. Its console (stdout and stderr, every start appended) goes to
OUT/<trial>/train.log. While it runs, its metrics.jsonl is read for the evals: each is reported to
the study (for the pruner and the sweep's console), and the trial's heartbeat is written.
"""
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
from optuna.trial import TrialState

from metrics import METRICS, parse_rows, reached
from console import RunError, UsageError
from sweeps.plan import TRAIN, flag, name, value_text
from sweeps.study import me, origin

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent):
    """(in the child, before train.py) SIGTERM when the sweep's thread that started it ends; and
    no start at all if the sweep already died between the fork and this call."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def gpu_slots(gpus, workers, nproc):
    """The GPUs handed out, worker w taking [w*nproc, (w+1)*nproc): a list of ids, or [] where
    each trial sees what the sweep sees (one worker of one process, or no GPU)."""
    if gpus == "auto":
        if workers * nproc == 1:
            return []
        # the GPUs this process was given (a Slurm job's, say), else all that CUDA sees
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus is None:
            import torch  # only here: a sweep of one process per trial never needs it

            gpus = ",".join(map(str, range(torch.cuda.device_count())))
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if ids and len(ids) < workers * nproc:
        raise UsageError(f"workers={workers} x nproc={nproc} needs {workers * nproc} GPUs; "
                         f"{len(ids)} are given ({','.join(ids)}): lower workers, or list more")
    return ids


def suggest(trial, plan):
    """The trial's swept knobs: a grid point fixed when it was enqueued, the rest sampled."""
    params = {k: trial.suggest_categorical(k, list(v)) for k, v in plan.grid.items()}
    for k, (low, high, scale) in plan.search.items():
        pick = trial.suggest_int if isinstance(low, int) else trial.suggest_float
        params[k] = pick(k, low, high, log=scale == "log")
    return params


class Evals:
    """A run's eval and event rows as its metrics.jsonl grows, read on from where the last read
    stopped; a resume rewrites the file (marking redone rows superseded), which is then read
    whole again."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, METRICS)
        self.at, self.inode, self.evals, self.events = 0, None, {}, []

    def read(self):
        """{iter: row} of the evals so far (superseded ones left out)."""
        try:
            st = os.stat(self.path)
            if st.st_ino != self.inode or st.st_size < self.at:
                self.at, self.inode, self.evals, self.events = 0, st.st_ino, {}, []
            if st.st_size == self.at:
                return self.evals
            with open(self.path, "rb") as f:
                f.seek(self.at)
                text = f.read()
        except OSError:
            return self.evals
        whole = text[:text.rfind(b"\n") + 1]  # a line being written is read next time
        self.at += len(whole)
        for row in parse_rows(whole.decode(errors="replace")):
            if row.get("superseded"):
                continue
            if row["kind"] == "eval":
                self.evals[row["iter"]] = row
            elif row["kind"] == "event":
                self.events.append(row)
        return self.evals

    def finished(self, max_iters):
        self.read()
        return reached(self.events, max_iters)


def best(rows, objective, maximize):
    values = [r[objective] for r in rows.values() if isinstance(r.get(objective), (int, float))]
    return (max if maximize else min)(values) if values else None


class Runner:
    """What every trial of this sweep process shares: the plan, the sweep's knobs, the stop."""

    def __init__(self, plan, sweep, study, say, deadline=None, gpus=None):
        self.plan, self.sweep, self.study, self.say = plan, sweep, study, say
        self.deadline, self.gpus = deadline, gpus or []
        self.live = {}  # trial id: its Popen
        self.signum = None  # the stop signal passed on
        self.out_of_time = False  # a trial stopped for the sweep's time_limit: start no more
        self.lock = threading.RLock()  # (a second signal may come while the handler holds it)
        self.maximize = study.study.direction == optuna.study.StudyDirection.MAXIMIZE

    def stop(self, signum):
        """Pass a stop signal on to every trial process (they save and exit); start no more.
        torchrun passes on only SIGTERM, SIGINT and SIGHUP (others would kill it and orphan its
        workers): it gets SIGTERM for the others."""
        self.signum = signum
        sig = signum if self.sweep["nproc"] == 1 or signum in (
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP) else signal.SIGTERM
        with self.lock:
            for proc in self.live.values():
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def command(self, knobs, out, slot):
        remote = self.sweep["remote_dir"]
        argv = [*self.plan.base_argv, *(flag(k, v) for k, v in knobs.items()), flag("out_dir", out)]
        if remote:
            argv.append(flag("remote_dir", remote.rstrip("/") + "/" + os.path.basename(out)))
        if self.deadline is not None:
            argv.append(flag("time_limit", f"{max(1.0, self.deadline - time.time()):.0f}"))
        nproc = self.sweep["nproc"]
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"]
        env = dict(os.environ)
        share = self.sweep["workers"] * nproc  # processes at once on this machine's cores
        if share > 1 and "OMP_NUM_THREADS" not in env:  # not each one thread per core: 10x slower
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // share))
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[slot * nproc:(slot + 1) * nproc])
        return [*launcher, TRAIN, *argv], env

    def run(self, trial, slot, study):
        """Run one trial to its end (study: the worker's view of the study) and tell the study how
        it ended."""
        storage = study.storage
        frozen = storage.get_trial(trial._trial_id)
        number = origin(frozen)
        try:
            params = suggest(trial, self.plan)
            knobs = self.plan.knobs(params)  # (a searched value inside a range may be refused)
        except UsageError as e:
            study.fail(trial._trial_id, f"its knobs are refused: {e}", permanent=True)
            self.say(f"trial {number} failed for good: its knobs are refused: {e}")
            return
        folder = name(params, number)
        out = os.path.join(self.sweep["out_dir"], folder)
        trial.set_user_attr("out_dir", folder)
        cmd, env = self.command(knobs, out, slot)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train.log"), "ab") as log:
            log.write(f"--- sweep: trial {number}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(cmd[1:])}\n".encode())
            log.flush()
            with self.lock:
                if self.signum is not None:
                    study.fail(trial._trial_id, "the sweep was stopped before it started",
                               again=True)
                    return
                parent = os.getpid()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=lambda: _die_with_parent(parent))
                self.live[trial._trial_id] = proc
        try:
            storage.set_trial_system_attr(trial._trial_id, "child", me(proc.pid))
            what = ", ".join(f"{k}={value_text(v)}" for k, v in params.items())
            again = " (continuing it)" if number != trial.number else ""
            self.say(f"trial {number} started{again}: {what} -> {out}")
            self._watch(trial, frozen, number, proc, out, knobs, study)
        finally:  # whatever happened here, the trial's process is stopped (it saves) and waited for
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait()
            with self.lock:
                self.live.pop(trial._trial_id, None)

    def _watch(self, trial, frozen, number, proc, out, knobs, study):
        """Until the trial's process ends: its heartbeat, its evals (to the pruner and the
        console), and whether another worker took it over; then its end, told."""
        pruning = self.sweep["prune"] and not frozen.system_attrs.get("continues")
        evals, seen, beat, pruned, lost = Evals(out), set(), time.time(), False, None
        failing = None  # since when the storage fails
        before = set(evals.read())  # a continued trial's evals: reported again, not printed
        started, spent = time.time(), frozen.user_attrs.get("seconds", 0)
        while True:
            alive = proc.poll() is None
            try:
                if alive and time.time() - beat >= self.sweep["heartbeat"]:
                    beat = time.time()
                    if study.storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                        lost = "another worker took it over (its heartbeat had lapsed)"
                        proc.send_signal(signal.SIGTERM)
                    else:
                        study.storage.record_heartbeat(trial._trial_id)
                        trial.set_user_attr("seconds", round(spent + time.time() - started, 1))
                for it, row in sorted(evals.read().items()):
                    value = row.get(self.plan.objective)
                    if it in seen or not isinstance(value, (int, float)) or lost:
                        continue
                    seen.add(it)
                    if it not in before:
                        self.say(f"trial {number} at iteration {it}: {self.plan.objective} "
                                 f"{value:.4f}")
                    trial.report(value, it)
                    if pruning and not pruned and alive and trial.should_prune():
                        pruned = True
                        self.say(f"trial {number} pruned at iteration {it}: behind the median "
                                 "of the others; it saves its checkpoint")
                        proc.send_signal(signal.SIGTERM)
                failing = None
            except Exception as e:  # the storage unreachable for a while: the trial goes on
                text = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if failing is None:
                    failing = time.time()
                    self.say(f"warning: trial {number}: the storage failed ({text}); retrying")
                elif time.time() - failing > 4 * self.sweep["heartbeat"]:  # others took it over
                    raise RunError(f"the storage has failed for {time.time() - failing:.0f} s "
                                   f"({text})") from None
            if not alive:
                break
            time.sleep(0.5)
        if lost:
            self.say(f"trial {number}: {lost}; this copy stopped")
            return
        rows = evals.read()
        value = best(rows, self.plan.objective, self.maximize)
        iters = max([r["iter"] for r in evals.events if r.get("event") in ("end", "checkpoint")]
                    or [0])
        last = rows[max(rows)] if rows else {}
        for key, v in (("iters", iters), ("best_val_loss", best(rows, "val_loss", False)),
                       ("scores", {k: x for k, x in last.items()
                                   if k.endswith(("_acc", "_acc_norm", "_bpb"))}),
                       ("seconds", round(spent + time.time() - started, 1))):
            trial.set_user_attr(key, v)
        done = evals.finished(knobs.get("max_iters", self.plan.base["max_iters"]))
        code = proc.returncode
        if code == 0 and pruned:
            self._tell(study, trial, number, state=TrialState.PRUNED)
            return
        if code == 0 and done and value is not None:
            trial.set_user_attr("ended", None)
            if self._tell(study, trial, number, values=value):
                self.say(f"trial {number} complete: {self.plan.objective} {value:.4f}, "
                         f"{iters} iterations")
            return
        error = last_error(out)
        timed = self.deadline is not None and self.signum is None and (
            code == 0 or "leaves no time" in error)  # (train.py's own time_limit, or too little)
        self.out_of_time = self.out_of_time or timed
        permanent = code == 2 or (code == 0 and done)  # a refused knob, no eval: never better
        if code == 0 and done:
            why = f"no eval gave {self.plan.objective} (is eval_interval above max_iters?)"
        elif self.signum is not None or code == 0 or timed:
            why = "stopped before its end (it saved a checkpoint and continues from it)"
        elif code < 0:
            why = f"killed by {signal.Signals(-code).name}"
        else:
            why = f"exit {code}: {error}"
        if study.fail(trial._trial_id, why, permanent, again=self.signum is not None or timed):
            self.say(f"trial {number} {why}; see {os.path.join(out, 'train.log')}")


    def _tell(self, study, trial, number, **how):
        try:
            study.study.tell(trial, **how)
            return True
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # no longer running
            self.say(f"trial {number}: another worker took it over (its heartbeat had lapsed); "
                     "its end here is not counted")
            return False


def last_error(out):
    """The trial's `error:` line (its last), or its log's last line."""
    try:
        with open(os.path.join(out, "train.log"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "no train.log"
    errors = [line for line in lines if line.lstrip().startswith("error:")]
    return (errors or lines or ["no output"])[-1].strip()[:200]

