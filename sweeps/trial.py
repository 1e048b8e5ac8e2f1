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
import json
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
from optuna.trial import TrialState

from metrics import METRICS
from console import UsageError
from sweeps.plan import TRAIN, flag, name, value_text
from sweeps.study import me

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent():
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def gpu_slots(gpus, workers, nproc):
    """The GPUs handed out, worker w taking [w*nproc, (w+1)*nproc): a list of ids, or [] where
    each trial sees what the sweep sees (one worker of one process, or no GPU)."""
    if gpus == "auto":
        if workers * nproc == 1:
            return []
        import torch  # only here: a sweep of one process per trial on one GPU never needs it

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
        for line in whole.decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("superseded"):
                continue
            if row.get("kind") == "eval":
                self.evals[row["iter"]] = row
            elif row.get("kind") == "event":
                self.events.append(row)
        return self.evals

    def finished(self, max_iters):
        """Whether the run reached max_iters (an 'end' event or a checkpoint there)."""
        self.read()
        return any(r.get("event") in ("end", "checkpoint") and r["iter"] >= max_iters
                   for r in self.events)


def best(rows, objective, maximize):
    values = [r[objective] for r in rows.values() if isinstance(r.get(objective), (int, float))]
    return (max if maximize else min)(values) if values else None


class Runner:
    """What every trial of this sweep process shares: the plan, the sweep's knobs, the stop."""

    def __init__(self, plan, sweep, study, say, deadline=None, gpus=None):
        self.plan, self.sweep, self.study, self.say = plan, sweep, study, say
        self.deadline, self.gpus = deadline, gpus or []
        self.live = {}  # number: its Popen
        self.signum = None
        self.lock = threading.Lock()
        self.maximize = study.study.direction == optuna.study.StudyDirection.MAXIMIZE

    def stop(self, signum):
        """Pass a stop signal on to every trial process (they save and exit); start no more."""
        self.signum = signum
        with self.lock:
            for proc in self.live.values():
                try:
                    proc.send_signal(signum)
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
        """Run one trial to its end (study: the worker's view of the study); tells the study how it
        ended: 'complete', 'pruned', 'failed' or 'interrupted'."""
        storage = study.storage
        params = suggest(trial, self.plan)
        frozen = storage.get_trial(trial._trial_id)
        number = frozen.system_attrs.get("failed_trial", trial.number)
        folder = name(params, number)
        out = os.path.join(self.sweep["out_dir"], folder)
        knobs = self.plan.knobs(params)
        trial.set_user_attr("out_dir", folder)
        pruning = self.sweep["prune"] and not frozen.system_attrs.get("continues")
        cmd, env = self.command(knobs, out, slot)
        os.makedirs(out, exist_ok=True)
        what = ", ".join(f"{k}={value_text(v)}" for k, v in params.items())
        again = " (continuing it)" if number != trial.number else ""
        with open(os.path.join(out, "train.log"), "ab") as log:
            log.write(f"--- sweep: trial {number}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(cmd[1:])}\n".encode())
            log.flush()
            with self.lock:
                if self.signum is not None:
                    study.fail(trial.number, "the sweep was stopped")
                    return "interrupted"
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)
                self.live[trial.number] = proc
        storage.set_trial_system_attr(trial._trial_id, "child", me(proc.pid))
        self.say(f"trial {number} started{again}: {what} -> {out}")
        evals, seen, beat, pruned = Evals(out), set(), time.time(), False
        before = set(evals.read())  # a continued trial's evals: reported again, not printed
        started, spent = time.time(), frozen.user_attrs.get("seconds", 0)
        while True:
            alive = proc.poll() is None
            if alive and time.time() - beat >= self.sweep["heartbeat"]:
                storage.record_heartbeat(trial._trial_id)
                trial.set_user_attr("seconds", round(spent + time.time() - started, 1))
                beat = time.time()
            for it, row in sorted(evals.read().items()):
                value = row.get(self.plan.objective)
                if it in seen or not isinstance(value, (int, float)):
                    continue
                seen.add(it)
                if it not in before:
                    self.say(f"trial {number} at iteration {it}: {self.plan.objective} "
                             f"{value:.4f}")
                trial.report(value, it)
                if pruning and not pruned and alive and trial.should_prune():
                    pruned = True
                    self.say(f"trial {number} pruned at iteration {it}: behind the median of "
                             "the others; it saves its checkpoint")
                    proc.send_signal(signal.SIGTERM)
            if not alive:
                break
            time.sleep(0.5)
        with self.lock:
            del self.live[trial.number]
        rows = evals.read()
        value = best(rows, self.plan.objective, self.maximize)
        iters = max([r["iter"] for r in evals.events if r.get("event") in ("end", "checkpoint")]
                    or [0])
        trial.set_user_attr("iters", iters)
        trial.set_user_attr("best_val_loss", best(rows, "val_loss", False))
        last = rows[max(rows)] if rows else {}
        trial.set_user_attr("scores", {k: v for k, v in last.items() if k.endswith(
            ("_acc", "_acc_norm", "_bpb"))})
        trial.set_user_attr("seconds", round(spent + time.time() - started, 1))
        done = evals.finished(knobs.get("max_iters", self.plan.base["max_iters"]))
        code = proc.returncode
        if code == 0 and pruned:
            study.study.tell(trial, state=TrialState.PRUNED)
            return "pruned"
        if code == 0 and done and value is not None:
            study.study.tell(trial, value)
            self.say(f"trial {number} complete: {self.plan.objective} {value:.4f}, "
                     f"{iters} iterations")
            return "complete"
        if code == 0 and done:
            why = f"no eval gave {self.plan.objective} (is eval_interval above max_iters?)"
        elif self.signum is not None or code == 0:
            why = "stopped before its end (it saved a checkpoint and continues from it)"
        elif code < 0:
            why = f"killed by {signal.Signals(-code).name}"
        else:
            why = f"exit {code}: {last_error(out)}"
        study.fail(trial.number, why)
        study.skip.add(number)
        self.say(f"trial {number} {why}; see {os.path.join(out, 'train.log')}")
        return "interrupted" if self.signum is not None else "failed"


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

