"""
One owner for every save of a run (docs/checkpoints.md). train.py makes one Checkpointer and, on
every rank, at one safe point of each iteration, asks it whether a save is due, hands it the state
and lets it finish what is in flight; at the end it waits for it. The Checkpointer owns:

- the writers: a checkpoint file written in the foreground, or in the background by one persistent
  thread from a snapshot in host buffers that are kept from one save to the next (pinned on CUDA);
  under FSDP, checkpoint folders that every rank writes with DCP (folders.ShardedSaver);
- what is on disk: this run's checkpoints are known in memory (the start reads each header once; a
  file this process wrote is known good, another is CRC-checked once, when retention first counts
  it);
- retention (keep_last, keep_every), only ever after a newer checkpoint is durable;
- the checkpoint_minutes clock, kept by rank 0 (the only one that knows when a file is durable) and
  shared through train.py's per-iteration all-reduce, so every rank takes the same decision;
- the console lines and metrics.jsonl events: "writing X" when a background save starts, "saved X"
  only once X is durable (fsynced and renamed in);
- the failure policy: a failed save is one warning line, training goes on, and it is retried at the
  next due checkpoint or after a pause (RETRY, doubling); a failed final save is an error (train.py
  exits 1); nothing in a save path ends the run with a traceback.

At most one write is in flight. A save that comes due while one is still being written waits for
it: every due checkpoint is written, and a disk slower than the interval shows as a training stall
rather than as missing files.
"""
import os
import subprocess
import time

import torch

import distributed
from console import first_line, say
from keep.files import BEST, FORMAT_VERSION, KEPT_INTACT, CheckpointError, os_error, periodic_name
from keep.files import save as write_file
from keep.folders import ShardedSaver, full_state
from keep.lock import claim_on_every_rank
from keep.remote import Remote
from keep.rng import capture_rng
from keep.store import keep_others_best, own_periodic, retain
from keep.uploader import Uploader
from keep.worker import Backoff, Worker, snapshot, yield_to_training


RETRY = (5.0, 300.0)  # seconds before a failed save is tried again: first pause, longest pause


# periodic saves that may fail in a row before the run stops (exit 1): a full disk or a dead mount
# does not mend itself while training goes on, and hours of training with nothing saved is worse
# than a stop that a scheduler or a person sees (docs/preemption.md, failed writes)
FAILURES = 5


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Checkpointer:
    @classmethod
    def build(cls, config, run, model_args, data, *, model, optimizer, scaler, metrics, remote,
              attempt, lock, device, rank, resumed_from, log=say):
        """The run's Checkpointer, from train.py's config in one call. run: the RunState that every
        checkpoint stores; model_args and data (a TokenData): with the config, the plain part that
        is the same for the whole run, so that a checkpoint alone samples and exports. remote: rank
        0's checked Remote, or None."""
        c, master, fsdp = config, rank == 0, config["parallelism"] == "fsdp"
        fixed = dict(model_args=model_args, config=config, tokenizer=data.tokenizer(),
                     data_fingerprint=data.fingerprint())
        copy = None
        if c["remote_dir"] and not c["eval_only"] and (master or fsdp):
            copy = Uploader(remote or Remote(c["remote_dir"]), c["out_dir"], run_id=run.run_id,
                            branch=run.branch, keep_last=c["keep_last"], keep_every=c["keep_every"],
                            attempt=attempt, rank=rank, log=log)
        return cls(c["out_dir"], run=run, fixed=fixed, keep_last=c["keep_last"],
                   keep_every=c["keep_every"], interval=c["checkpoint_interval"],
                   minutes=c["checkpoint_minutes"], background=c["async_save"], model=model,
                   optimizer=optimizer, scaler=scaler, metrics=metrics, log=log, master=master,
                   device=device, shards=ShardedSaver(device) if fsdp else None,
                   resumed_from=resumed_from, remote=copy, remote_wait=c["remote_wait"], lock=lock)

    def __init__(self, out_dir, *, run, fixed, keep_last, keep_every, interval, minutes, background,
                 model, optimizer, scaler, shards=None, metrics=None, log=say, master=True,
                 resumed_from=None, remote=None, remote_wait=0.0, lock=None, device="cpu"):
        """shards: a folders.ShardedSaver under FSDP (periodic checkpoints are then folders).
        remote: an uploader.Uploader (rank 0; under FSDP every rank, for its own shards), handed
        every checkpoint once it is durable here; close() waits up to remote_wait seconds for it.
        lock: out_dir's lock (claim), held by rank 0: folder_lost() compares it with the .lock in
        out_dir."""
        self.out_dir, self.run, self.fixed, self.scaler = out_dir, run, fixed, scaler
        self.run_id, self.branch = run.run_id, run.branch
        self.git_commit = git_commit() if master else None
        self.keep_last, self.keep_every, self.interval, self.period = (
            keep_last, keep_every, interval, minutes * 60)
        self.background, self.model, self.optimizer, self.shards = (
            background, model, optimizer, shards)
        self.metrics, self.log, self.master, self.resumed_from = metrics, log, master, resumed_from
        self.remote, self.remote_wait, self.lock, self.device = remote, remote_wait, lock, device
        self.writer = (Worker("checkpoint-writer", setup=yield_to_training) if background and master
                       else None)
        self.buffers = {}
        self.pending = None  # a background file write: (future, path, iteration, val_loss, t0)
        self.folder = None  # every rank's background folder write: (path, iteration, val_loss, t0)
        self.clock = time.time()  # when the state of the newest durable checkpoint was taken
        self.retry_at, self.backoff = None, Backoff(*RETRY)
        self.failures = []  # why each periodic save failed since the last good one
        # until a save has been timed: weights and AdamW's two moments, in fp32, at a slow 100 MB/s
        self.save_seconds = 3 * 4 * sum(p.numel() for p in model.parameters()) / 100e6
        self.best_claimed = False
        # this run's periodic checkpoints on disk: path -> {"path", "iter_num", "good"}
        self.known = own_periodic(out_dir, run.run_id, run.branch) if master else {}

    # -- what is due ---------------------------------------------------------------------------
    def due(self, it):
        """Whether a periodic checkpoint is due at iteration `it`. The interval and keep_every are
        the same on every rank; the clocks (checkpoint_minutes, a retry) only rank 0's, which
        train.py OR-s over the ranks with its other per-iteration flags."""
        due = ((self.interval > 0 and it % self.interval == 0)
               or (self.keep_every > 0 and it % self.keep_every == 0))
        if self.master:
            now = time.time()
            # a save in flight restarts the clock too: its state is taken, it is waited for first
            started = max([self.clock] + [w[-1] for w in (self.pending, self.folder)
                                          if w is not None])
            due = due or bool(self.period) and now - started >= self.period
            due = due or (self.retry_at is not None and now >= self.retry_at)
        return due

    def folder_lost(self):
        """Rank 0: out_dir is no longer the folder this process holds: deleted (rm -rf) or replaced,
        so its .lock is gone or is another file than the one locked. Two stats: cheap at every
        iteration."""
        if self.lock is None:
            return False
        try:
            mine, there = os.fstat(self.lock.fileno()), os.stat(os.path.join(self.out_dir, ".lock"))
        except OSError:
            return True
        return (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino)

    def rescue(self):
        """Every rank, once out_dir is lost: the saves that follow go to a new folder beside it,
        named alike on every rank and claimed like out_dir (never into a re-made out_dir, which
        another trainer may hold by now). Returns its path."""
        self.out_dir = f"{os.path.abspath(self.out_dir).rstrip(os.sep)}-rescued-{self.run_id}"
        self.known = {}  # retention never reaches back into the lost folder
        self.lock = claim_on_every_rank(self.out_dir, self.master, create=True)
        return self.out_dir

    def stop_seconds(self):
        """What a stop needs after its last step (time_limit leaves room for it): the save, and the
        copy to remote_dir up to remote_wait."""
        upload = min(self.remote.seconds, self.remote_wait) if self.remote is not None else 0.0
        return self.save_seconds + upload

    def writing(self):
        """This rank is writing a folder in the background (train.py OR-s it over ranks)."""
        return self.shards is not None and self.shards.busy()

    def path(self, it, best=False):
        return os.path.join(self.out_dir, BEST if best else
                            periodic_name(it, self.branch, folder=self.shards is not None))

    # -- saving --------------------------------------------------------------------------------
    def state(self, val_loss):
        """The plain part of a checkpoint of the run as it stands (save adds the tensors), from
        every rank (RNG states are gathered). val_loss: measured at this very iteration, else None
        (metadata never carries an older eval's loss as this one's)."""
        run = self.run
        meta = dict(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    torch_version=str(torch.__version__), world_size=distributed.world(),
                    git_commit=self.git_commit, dataset=self.fixed["config"]["dataset"],
                    **run.metadata(val_loss))
        return dict(iter_num=run.iter_num, best_val_loss=run.best_val_loss,
                    scaler=self.scaler.state_dict(), rng=distributed.every_rank(capture_rng()),
                    format_version=FORMAT_VERSION, **self.fixed, metadata=meta)

    def save(self, it, val_loss=None, best=False, final=False):
        """Write a checkpoint of iteration `it`: ckpt.pt (best=True), else a periodic one. Every
        rank calls it at the same point (FSDP gathers or shards the state; the plain part is the
        same everywhere). Returns False if it failed, True otherwise (for a background save:
        started); for a final save, the same answer on every rank, so that all of them exit alike.
        A diverged model is never saved (the run halts), so every file on disk is from before a
        divergence."""
        finite = torch.stack([distributed.local(p).isfinite().all()
                              for p in self.model.parameters()]).all()
        if distributed.any_rank([not finite], self.device)[0]:  # (under FSDP a rank sees its shard)
            self.halt(it, "diverged", "the model's weights are not finite (nan or inf)")
        ok = self._save(self.state(val_loss), it, val_loss, best, final)
        if final and self.shards is None:  # a file: only rank 0 knows how it went (folders agree)
            ok = distributed.from_rank0(ok)
        return ok

    def _save(self, state, it, val_loss, best, final):
        path = self.path(it, best)
        folder = self.shards is not None and not best
        background = self.background and not final
        self.settle()  # at most one write in flight
        t0 = time.time()
        try:
            if folder:  # every rank writes its shard
                try:
                    self.shards.save(state, path, self.model, self.optimizer, background)
                except CheckpointError as e:  # (raised on every rank alike)
                    return self._folder_done(path, it, val_loss, t0, str(e), final)
                if background:
                    self.folder = (path, it, val_loss, t0)
                    self.log(f"writing {path}")
                    return True
                return self._folder_done(path, it, val_loss, t0)
            else:  # a file, written by rank 0; under FSDP the whole state is gathered to it first
                model_sd, optim_sd = (full_state(self.model, self.optimizer)
                                      if self.shards is not None
                                      else (self.model.state_dict(), self.optimizer.state_dict()))
                if not self.master:
                    return True
                if best and not self.best_claimed:  # another branch's ckpt.pt is never written over
                    keep_others_best(self.out_dir, self.run_id, self.branch, self.resumed_from,
                                     log=self.log)
                    self.best_claimed = True  # (if keeping it failed: tried again at the next best)
                # the weights first, as nanoGPT's files have them: store.load_weights then
                # CRC-checks them alone
                full = dict(model=model_sd, optimizer=optim_sd, **state)
                on_gpu = any(p.is_cuda for p in self.model.parameters())
                if background or on_gpu:  # training changes the tensors next step: write a copy
                    full = snapshot(full, self.buffers)
                    if on_gpu:
                        torch.cuda.synchronize()
                if background:
                    self.pending = (self.writer.submit(write_file, full, path)[0],
                                    path, it, val_loss, t0)
                    self.log(f"writing {path}")
                    return True
                write_file(full, path)
        except CheckpointError as e:
            self._failed(path, str(e), final)
            return False
        except Exception as e:  # out of host memory for the snapshot, a gather that failed, ...
            self._failed(path, f"could not write {path}: {first_line(e)}", final)
            return False
        self._durable(path, it, val_loss, t0, best, time.time() - t0)
        return True

    def poll(self, folders_idle=True):
        """At the safe point of each iteration: finish a background write that has ended.
        folders_idle: no rank is still writing its shard (OR-ed over ranks by train.py), so the
        folder is committed by every rank at once."""
        if self.pending is not None and self.pending[0].done():
            self._settle_file()
        if self.folder is not None and folders_idle:
            self._settle_folder()

    def settle(self):
        """Wait for any write in flight and announce it (or its failure). Every rank calls it."""
        if self.pending is not None:
            self._settle_file()
        if self.folder is not None:
            self._settle_folder()

    def close(self, interrupted=lambda: False):
        """At the end: the write in flight reaches the disk before the process goes, and the copy to
        remote_dir gets up to remote_wait seconds (less once interrupted() is true: a stop signal);
        one line says whether the newest one reached it."""
        if self.pending is not None or self.folder is not None:
            self.log("waiting for the background checkpoint write to finish")
        self.settle()
        for worker in (self.writer, self.shards and self.shards.writer):  # gone before the exit
            if worker is not None:
                worker.close()
        if self.remote is not None:
            ok, line = self.remote.finish(self.remote_wait, interrupted)
            if line:
                self.log(line) if ok else say(line, err=True)

    def _settle_file(self):
        future, path, it, val_loss, t0 = self.pending
        self.pending = None
        try:
            future.outcome()
        except CheckpointError as e:
            self._failed(path, str(e), False)
            return
        except Exception as e:
            self._failed(path, f"could not write {path}: {first_line(e)}", False)
            return
        self._durable(path, it, val_loss, t0, os.path.basename(path) == BEST, time.time() - t0)

    def _settle_folder(self):
        path, it, val_loss, t0 = self.folder
        self.folder = None
        try:
            self.shards.finish()  # every rank; raises on every rank if any rank's write failed
        except CheckpointError as e:
            self._folder_done(path, it, val_loss, t0, str(e))
            return
        self._folder_done(path, it, val_loss, t0)

    def _folder_done(self, path, it, val_loss, t0, problem=None, final=False):
        """Every rank at once, when a folder's write has ended (problem: why it failed, on every
        rank). With remote_dir, every rank hands its own shard files to its Uploader, all under one
        data prefix that rank 0 picks; rank 0 adds the rest and writes the commit. Returns
        success."""
        prefix = None
        if self.remote is not None:
            prefix = distributed.from_rank0(self.remote.new_prefix(it) if problem is None else None,
                                            self.shards.group)
        if problem is not None:
            if self.master:  # (one line for the job)
                self._failed(path, problem, final)
            return False
        if prefix is not None:
            self._push(path, it, val_loss, False, prefix)
        if self.master:
            self._durable(path, it, val_loss, t0, False, time.time() - t0, pushed=True)
        return True

    def _push(self, path, it, val_loss, best, prefix=None):
        """Hand a durable checkpoint to the Uploader, before retention can delete it (it opens the
        files)."""
        try:
            self.remote.push(path, dict(iter_num=it, run_id=self.run_id, branch=self.branch,
                                        kind="best" if best else "periodic", val_loss=val_loss),
                             prefix)
        except Exception as e:
            # an OSError opening it, a CheckpointError reading its state.pt: the copy is skipped
            say(f"warning: could not open {path} to copy it to remote_dir ({os_error(e)})",
                err=True)

    def _durable(self, path, it, val_loss, t0, best, seconds, pushed=False):
        """The checkpoint is on disk: announce it, restart the clock, apply retention."""
        self.save_seconds = seconds
        self.log(f"saved {path}"
                 + (f" (val loss {val_loss:.4f})" if best and val_loss is not None else ""))
        if self.metrics is not None:
            self.metrics.event(it, "checkpoint", path=path, val_loss=val_loss)
        if self.remote is not None and not pushed:
            self._push(path, it, val_loss, best)
        if best:
            return
        self.clock, self.retry_at, self.failures = t0, None, []
        self.backoff.reset()
        self.known[path] = {"path": path, "iter_num": it, "good": True}
        retain(self.known, self.keep_last, self.keep_every)  # only after a newer one is durable

    def _failed(self, path, why, final):
        if final:
            say(f"error: {why}; older checkpoints are intact, and the same command resumes from "
                "the newest", err=True)
        else:
            say(f"warning: {why}; {KEPT_INTACT}", err=True)
            if not os.path.basename(path) == BEST:
                self.retry_at = time.time() + self.backoff.next()
                self.failures.append(why)

    def halt(self, it, event, what):
        """Stop every rank (each takes the same decision) with rank 0's one error line; exit 1."""
        self.close()  # what is in flight reaches the disk
        self.metrics.event(it, event, reason=what)
        if self.master:
            say(f"error: {self.halt_line(it, event, what)}", err=True)
        distributed.teardown(exit_code=1)

    def halt_line(self, it, event, what):
        """Rank 0's error line for a run stopped at `it`: its saves keep failing, or it diverged."""
        if event == "saves_failed":
            return self.give_up(it)
        fix = "lower --learning_rate (or raise --warmup_iters)"
        return f"{what} at iteration {it}: training diverged. " + (
            f"No checkpoint of it was written, so the newest one on disk is from before; {fix} "
            f"and run again to continue from it" if self.known or self.resumed_from
            else f"Nothing was saved; {fix} and start again")

    def rescued_line(self, lost, failed):
        """The error line of a run whose out_dir (`lost`) went away while it trained (rescue)."""
        return (f"out_dir {lost} was deleted or replaced while this run trained (rm -rf, or "
                f"another process); "
                + (f"its state could not be saved in {self.out_dir} either" if failed else
                   f"its state at iteration {self.run.iter_num} is in {self.out_dir}: "
                   f"continue it with --out_dir={self.out_dir}"))

    def given_up(self):
        """Rank 0: FAILURES periodic saves in a row have failed (train.py OR-s this over ranks, then
        stops the run with give_up's line)."""
        return len(self.failures) >= FAILURES

    def give_up(self, it):
        newest = max(self.known, key=lambda p: self.known[p]["iter_num"], default=None)
        return (f"{len(self.failures)} checkpoints in a row could not be written (the last: "
                f"{self.failures[-1]}); stopping at iteration {it} rather than train on with "
                f"nothing saved. " + (f"The newest checkpoint is {newest}. " if newest else "")
                + "Fix the disk (free space), then run the same command: it continues from the "
                  "newest checkpoint")

