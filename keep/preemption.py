"""
When a run must stop and save: signals and a wall-clock budget (time_limit). train.py asks between
iterations and during evaluation; handlers only set a flag (docs/preemption.md).
The bound on the work a crash can lose (checkpoint_minutes) is the Checkpointer's clock.

SIGTERM (preemption, Kubernetes, torchrun), SIGHUP (a closed terminal, a dropped ssh session),
SIGUSR1 (Slurm's --signal=USR1@secs warning) and SIGINT (Ctrl-C) all mean: stop at the next safe
point, checkpoint, exit 0 (130 for SIGINT). A second Ctrl-C leaves at once, which is safe because
no checkpoint file is ever half-written; other repeated signals are counted (a save under way
finishes), and cut short the end-of-run wait for the remote copy (train.py).
"""
import os
import re
import signal
import time

from console import UsageError


def _process_start():
    """When this process started (Linux: /proc), so time_limit counts the seconds spent importing
    torch too; elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


STARTED = _process_start()
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def parse_duration(text):
    """Seconds from '3600', '90m', '4h', '45s', 'MM:SS' or 'H:MM:SS'; '' or '0' mean no limit
    (0)."""
    text = str(text).strip()
    if text in ("", "0"):
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if m:
        return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    parts = text.split(":")
    if (2 <= len(parts) <= 3 and all(p.isdigit() for p in parts)
            and all(int(p) < 60 for p in parts[1:])):
        seconds = 0
        for p in parts:
            seconds = seconds * 60 + int(p)
        return float(seconds)
    raise UsageError(f"time_limit={text!r} is not a duration: give seconds (3600), 90m, 4h, or "
                     f"H:MM:SS (3:50:00, minutes and seconds below 60)")


def too_short(time_limit):
    """The error line of a time_limit that let no iteration run: a job that requeues itself would
    loop without progress."""
    return f"time_limit={time_limit!r} leaves no time for one iteration and a checkpoint; raise it"


class Stopper:
    def __init__(self, time_limit=0.0):
        self.signum = None  # the first stop signal
        self.last = None  # the newest one
        self.count = 0
        self.time_limit = time_limit
        for s in SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        self.count += 1
        self.last = signum
        if self.signum is not None:
            if signum == signal.SIGINT:  # the second Ctrl-C: leave now, even from inside a save
                try:
                    os.write(2, b"second SIGINT: exiting now without saving\n")
                except OSError:
                    pass
                os._exit(130)
            return
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self):
        return 130 if self.last == signal.SIGINT else 0

    def out_of_time(self, step_seconds, save_seconds):
        """True when one more step and a save (with room to spare) would overrun time_limit."""
        if not self.time_limit:
            return False
        needed = step_seconds + 1.5 * save_seconds + 2.0  # 2 s: exit and teardown
        return time.time() - STARTED + needed >= self.time_limit

    def stopping(self, step_seconds, save_seconds):
        """A stop signal came, or time_limit leaves room for no more than a save."""
        return self.signum is not None or self.out_of_time(step_seconds, save_seconds)

    def why(self, lost, step_seconds, save_seconds):
        """What stops the run, for its console line and metrics event."""
        if self.name:
            return f"{self.name} received"
        if lost:
            return "out_dir was deleted or replaced"
        if self.out_of_time(step_seconds, save_seconds):
            return "time_limit nearly reached"
        return "another rank is stopping"
