"""
The background copy of every checkpoint made durable in out_dir to remote_dir (remote.py), one
Worker per process (worker.py): on rank 0, and under FSDP on every rank for its own shards.
"""
import os
import threading
import time

from fsspec.asyn import sync

from console import first_line, say
from keep.claims import METRICS, new_prefix
from keep.folders import folder_files
from keep.objects import RemoteError
from keep.remote import Refused, close_files, open_files
from keep.store import rank, retained, scan
from keep.worker import Backoff, Worker


RETRY = (2.0, 60.0)  # seconds before a failed upload is tried again: first pause, longest pause


def lower_priority():
    """This thread at nice 19 (Linux's niceness applies per thread): it takes a small share of a CPU
    that training keeps busy, so the copy keeps up without slowing training. Not SCHED_IDLE, as the
    local writer uses: a CPU run leaves no idle time, and the remote copy would never get there."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class Uploader:
    """One background thread that copies every checkpoint made durable in out_dir to remote_dir,
    oldest first; a newer checkpoint of the same kind waiting behind it replaces an older one still
    waiting (keep_every's are all copied). A failure is one warning line for the whole outage, then
    retries with backoff (RETRY) while training goes on; the first success after it says so. After
    each periodic commit, remote retention: this run's and branch's periodic checkpoints beyond the
    newest keep_last (and not kept by keep_every) are deleted. Runs on rank 0, and under FSDP on
    every rank: a folder's shards go up from the rank that wrote them (rank r: __r_*.distcp), under
    the prefix rank 0 picked, and rank 0 writes the commit once they are all there.

    attempt: this start's token, the same on every rank (intents carry it, so that the leftovers of
    an earlier start are told from this start's uploads in flight). On rank 0 the remote holds the
    lease (Remote.take_lease): one found taken stops this process's copying with one line."""

    def __init__(self, remote, out_dir, *, run_id, branch, keep_last, keep_every, attempt, rank=0,
                 log=say):
        self.remote, self.out_dir, self.run_id, self.branch = remote, out_dir, run_id, branch
        self.keep_last, self.keep_every, self.rank, self.log = keep_last, keep_every, rank, log
        self.attempt = attempt
        self.newest = None  # header of the newest checkpoint handed over
        self.done = None  # header of the newest checkpoint complete in remote_dir
        self.outage, self.backoff = None, Backoff(*RETRY)
        self.warned = set()  # retention and metrics warnings said once each
        self.seconds = 0.0  # the last upload's duration: time_limit leaves room for one
        self.first = True  # the first upload cleans an earlier start's leftovers first
        self.refused = None  # why the last refused copy was not made
        if not remote.local:  # fsspec's I/O thread (the requests) at the same low priority
            async def low():
                lower_priority()
            sync(remote.fs.loop, low)
        self.worker = Worker("remote-upload", setup=lower_priority, failed=self._failed,
                             daemon=True)

    def new_prefix(self, it):
        return new_prefix(it)

    def push(self, path, header, prefix=None):
        """Hand over a checkpoint just made durable (its files are opened now). prefix: a folder's
        data prefix, the same on every rank, each rank copying its own files of it."""
        header = dict(header, name=os.path.basename(path))
        others = None
        if prefix is None:
            files = open_files(path)
        else:
            def mine(f):
                return (f.startswith(f"__{self.rank}_")
                        or (self.rank == 0 and not f.startswith("__")))
            files = open_files(path, mine)
            try:
                if self.rank == 0:  # state.pt names every rank's file with its size and CRC
                    others = {f"{header['name']}/{f}": list(v)
                              for f, v in folder_files(path).items()
                              if not mine(f)}
            except BaseException:
                close_files(files)
                raise
        job = dict(header=header, files=files, prefix=prefix, others=others)
        _, dropped = self.worker.submit(self._copy, job,
                                        replaces=lambda j: self._replaces(job, j.args[0]))
        for old in dropped:
            close_files(old.args[0]["files"])
        with self.worker.cv:
            if self.newest is None or rank(header) >= rank(self.newest):
                self.newest = header

    def _replaces(self, new, old):
        a, b = new["header"], old["header"]
        if a["kind"] != b["kind"]:
            return False
        kept = self.keep_every and b["kind"] == "periodic" and b["iter_num"] % self.keep_every == 0
        return not kept

    def _copy(self, job):
        """One checkpoint up (the Worker's job); a failure is _failed's."""
        t0 = time.time()
        if self.rank:  # a folder's shards of this rank; rank 0 commits them
            self.remote.intent(job["prefix"], self.run_id, self.attempt, self.rank)
            self.remote.put_objects(job["files"], job["prefix"])
        else:
            if self.remote.check_lease() is not None:
                raise RemoteError(f"remote_dir was taken over by {self.remote.lost}")
            if self.first:  # an earlier start's leftovers, once, before the first new data
                self.first = False
                try:
                    self.remote.clean(self.remote.checkpoints(), self.run_id, self.attempt)
                except Exception as e:  # they stay for the next start; the copy goes on
                    say(f"warning: could not clean remote_dir {self.remote.url} "
                        f"({self.remote.why(e)}); the next start tries again", err=True)
            self.remote.upload(job["files"], job["header"], self.attempt, job["prefix"],
                               job["others"],
                               abandon=lambda: any(self._replaces(j.args[0], job)
                                                   for j in self.worker.waiting))
        self.seconds = time.time() - t0
        close_files(job["files"])
        with self.worker.cv:
            if self.outage is not None:
                self.log(f"remote_dir reachable again: {job['header']['name']} copied")
            self.outage = None
            self.backoff.reset()
            if self.done is None or rank(job["header"]) >= rank(self.done):
                self.done = job["header"]
        # the copy is complete: what follows is housekeeping, its failure a warning
        if not self.rank:
            self._after(job["header"])

    def _failed(self, wjob, e):
        """A copy failed (the Worker's lock held): one warning for the whole outage, then the job
        goes back to the front of the queue, unless a newer one replaces it, and is tried again
        after a pause (RETRY, doubling). Once the lease is lost, every job is dropped; a refusal
        (what it would write over is not this run's) drops this job, with one warning."""
        job = wjob.args[0]
        if isinstance(e, Refused):
            self.refused = first_line(e)
            say(f"warning: {e}", err=True)
            close_files(job["files"])
            return None
        if self.remote.lost is not None:  # nothing more is copied
            for j in [wjob] + self.worker.waiting:
                close_files(j.args[0]["files"])
            self.worker.waiting.clear()
            return None
        if self.outage is None:
            self.outage = first_line(e) if isinstance(e, RemoteError) else self.remote.why(e)
            say(f"warning: could not copy {job['header']['name']} to remote_dir {self.remote.url} "
                f"({self.outage}); training goes on, retrying in the background (said once until "
                "it works)", err=True)
        if any(self._replaces(j.args[0], job) for j in self.worker.waiting):
            close_files(job["files"])  # a newer one is waiting: copy that instead
        else:
            self.worker.waiting.insert(0, wjob)
        return self.backoff.next()

    def _after(self, header):
        """Remote retention and metrics.jsonl after a commit. A failure is one warning (said once
        per kind) and is tried again after the next commit; it never makes the checkpoint go up
        again."""
        for what, step in (("apply keep_last in", lambda: self._retain(header)),
                           (f"copy {METRICS} to", lambda: self.remote.copy_metrics(self.out_dir))):
            try:
                step()
            except Exception as e:
                if what not in self.warned:
                    self.warned.add(what)
                    say(f"warning: could not {what} remote_dir {self.remote.url} "
                        f"({self.remote.why(e)}); tried again after the next copy", err=True)

    def _retain(self, newest):
        # (a commit without an id proves nothing)
        if newest["kind"] != "periodic" or self.run_id is None:
            return
        mine = [c for c in self.remote.checkpoints().good if c["kind"] == "periodic" and
                c["run_id"] == self.run_id and c["branch"] == self.branch]
        for c in retained(mine, self.keep_last, self.keep_every):
            if rank(c) < rank(newest):
                self.remote.delete(c, self.attempt)

    def finish(self, bound, interrupted=lambda: False):
        """At the end of a run or at a stop: wait up to `bound` seconds for what is waiting or in
        flight (less if interrupted() turns true: a stop signal), then give the lease up. Returns
        (True, line) when the newest checkpoint handed over is complete in remote_dir, else (False,
        line) saying what is lost if this machine is."""
        if self.worker.busy():
            self.log(f"waiting up to {bound:g}s (remote_wait) for the copy to remote_dir")
        cut = not self.worker.wait(time.time() + bound, interrupted) and interrupted()
        with self.worker.cv:
            newest, done = self.newest, self.done
        if not self.rank:
            self.remote.release(reachable=self.outage is None)
        if newest is None:
            return True, None
        if done is not None and rank(done) >= rank(newest):
            return (True, f"remote_dir {self.remote.url} holds the newest checkpoint "
                          f"({newest['name']}, iteration {newest['iter_num']})")
        why = f" ({self.outage or self.refused})" if self.outage or self.refused else \
            f" (taken over by {self.remote.lost})" if self.remote.lost else ""
        has = f"its newest complete one is {done['name']} (iteration {done['iter_num']})" \
            if done else "it has nothing of this process's"
        when = "the wait was cut short by a signal" if cut else f"within remote_wait={bound:g}s"
        return False, (f"warning: {newest['name']} (iteration {newest['iter_num']}) did not reach "
                       f"remote_dir {self.remote.url} {when}{why}; it is in out_dir only, and "
                       f"{has}")


def catch_up(remote, out_dir, *, run_id, branch, attempt, keep_last, keep_every, wait, log=say):
    """A run found complete at its start (train.py exits before it builds an Uploader): its newest
    periodic checkpoint and ckpt.pt, durable in out_dir, may never have reached remote_dir (a kill
    during their upload). Copy those the remote lacks (an earlier start's leftovers are cleaned
    first, as at every start), wait up to `wait` seconds, say so, and give the lease up."""
    up = Uploader(remote, out_dir, run_id=run_id, branch=branch, keep_last=keep_last,
                  keep_every=keep_every,
                  attempt=attempt, log=log)
    have = {c["name"]: c for c in remote.checkpoints().good}
    heads = [h for h in scan(out_dir)[0] if h["run_id"] in (run_id, None) and h["branch"] == branch]
    for kind in ("periodic", "best"):
        h = next((h for h in heads if h["kind"] == kind), None)  # (newest first)
        name = h and os.path.basename(h["path"])
        if h is not None and (name not in have or rank(have[name]) < rank(h)):
            up.push(h["path"], dict(iter_num=h["iter_num"], run_id=run_id, branch=branch, kind=kind,
                                    val_loss=h["val_loss"]))
    if up.newest is None:  # nothing to copy: the leftovers are still this start's to clean
        try:
            remote.clean(remote.checkpoints(), run_id, attempt)
        except Exception as e:
            say(f"warning: could not clean remote_dir {remote.url} ({remote.why(e)})", err=True)
    ok, line = up.finish(wait)
    if line:
        log(line) if ok else say(line, err=True)
