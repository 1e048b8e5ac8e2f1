"""
The one shape of background work in a run: a thread that takes jobs from a queue in order and
stops at a None sentinel, and from which no failure escapes. A job's outcome (what it returned, or
the exception it raised) stays on the job for its owner, who warns and goes on; an owner that wants
a failed job tried again says after what pause (Backoff). The local checkpoint writer, the FSDP
folder writer and the remote uploader (one per rank) are each one Worker.

A writer's thread outlives a main thread that ends without closing it (a traceback): the job in
flight and those queued still reach the disk, then the thread ends, as concurrent.futures' threads
do. The uploader's is a daemon (daemon=True): a copy to an unreachable store never holds up an
exit, and a run's end waits for it only up to remote_wait (uploader.finish). The Checkpointer
closes its writers at its end, so a normal exit never waits on them (under torchrun, a rank slow to
exit after another has ended is one the agent stops with a signal). snapshot is the host copy of a
state that a background write reads while training changes the original.
"""
import os
import threading
import time

import torch


class Job:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args
        self.value = self.error = None
        self.finished = threading.Event()

    def done(self):
        return self.finished.is_set()

    def outcome(self):
        """Wait for the job; its value, or the exception it raised, raised again here."""
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Backoff:
    """Pauses between tries of what failed: `first` seconds, doubling up to `longest`; reset() after
    a success."""

    def __init__(self, first, longest):
        self.first, self.longest, self.pause = first, longest, first

    def next(self):
        pause, self.pause = self.pause, min(2 * self.pause, self.longest)
        return pause

    def reset(self):
        self.pause = self.first


class Worker:
    """One background thread. failed(job, error), called with the lock held when a job raised,
    returns None (the job is done, its error kept on it) or a pause in seconds: the owner has put
    the job back in `waiting` (or dropped it, and then it is the owner's) and the thread waits that
    long, or until a new job comes.
    setup() runs first in the thread (its priority: the writers yield to training)."""

    def __init__(self, name, setup=lambda: None, failed=lambda job, error: None, daemon=False):
        self.cv = threading.Condition()
        self.waiting, self.current, self.failed = [], None, failed
        self.thread = threading.Thread(target=self._run, args=(setup,), name=name, daemon=daemon)
        self.thread.start()

    def submit(self, fn, *args, replaces=lambda job: False):
        """Queue fn(*args); waiting jobs that `replaces` takes are dropped (returned with the
        job)."""
        job = Job(fn, args)
        with self.cv:
            dropped = [j for j in self.waiting if replaces(j)]
            self.waiting = [j for j in self.waiting if j not in dropped] + [job]
            for j in dropped:  # never run: done, with nothing to show
                j.finished.set()
            self.cv.notify_all()
        return job, dropped

    def busy(self):
        with self.cv:
            return bool(self.waiting) or self.current is not None

    def wait(self, deadline, interrupted=lambda: False):
        """Until nothing is waiting or running, `deadline` (time.time()) or interrupted(); True if
        idle."""
        with self.cv:
            while ((self.waiting or self.current is not None) and time.time() < deadline
                    and not interrupted()):
                self.cv.wait(timeout=max(0.01, min(0.5, deadline - time.time())))
            return not self.waiting and self.current is None

    def close(self):
        """Finish what is queued, then end the thread (once: a second call does nothing)."""
        if not self.thread.is_alive():
            return
        with self.cv:
            self.waiting.append(None)
            self.cv.notify_all()
        self.thread.join()

    def _run(self, setup):
        setup()
        while True:
            with self.cv:
                while not self.waiting:
                    # the process is ending: nothing more comes
                    if not threading.main_thread().is_alive():
                        return
                    self.cv.wait(timeout=0.5)
                job = self.current = self.waiting.pop(0)
            if job is None:
                return
            pause = None
            try:
                job.value, job.error = job.fn(*job.args), None
            except BaseException as e:
                # (DCP's CheckpointException is one): the owner still hears of it
                job.error = e
            with self.cv:
                if job.error is not None:
                    try:
                        pause = self.failed(job, job.error)
                    except Exception:
                        # (a dead thread would leave `current` set and every wait to its end)
                        pause = None
                if pause is None:
                    job.finished.set()
                self.current = None
                self.cv.notify_all()
                if pause:
                    self.cv.wait(timeout=pause)


def snapshot(obj, buffers, memo=None, key=()):
    """A copy of a nested state whose tensors live in `buffers` ({position in the state: host
    tensor}), allocated at the first save and reused by every later one. Tensors that share storage
    (the tied wte/lm_head weight) share one buffer, so the file stores them once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        seen = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and seen in memo:
            return memo[seen]
        buf = buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        buf.copy_(t, non_blocking=t.is_cuda)
        memo[seen] = buf
        return buf
    if isinstance(obj, dict):
        return {k: snapshot(v, buffers, memo, key + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, buffers, memo, key + (i,)) for i, v in enumerate(obj))
    return obj


def yield_to_training():
    """The background writer runs at the lowest CPU priority (Linux's SCHED_IDLE, which applies per
    thread): where training keeps every core busy (a CPU run), the write takes the time training
    leaves idle instead of slowing every thread of the step (docs/checkpoints.md;
    bench/bench_checkpoint.py)."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the writer runs at training's priority
        pass
