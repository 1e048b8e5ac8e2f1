"""
What a run reports. The console lines go through say(), which a closed or broken stdout or stderr
(a `| tee` or `| head` that died, a closed terminal, a dropped ssh session) can never turn into an
exception: a run that cannot print goes on training and checkpointing, silently.
"""
import os
import sys


def _silence(stream):
    """Point a broken stream's file descriptor at /dev/null: later writes, and the flush Python does
    at exit (a failed one turns exit code 0 into 120), then succeed quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def say(*parts, err=False):
    """print(), flushed (so `| tee` shows each line as it comes), and never raising."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(*parts, file=stream, flush=True)
    except (OSError, ValueError):  # EPIPE, EIO from a vanished terminal, a closed file
        _silence(stream)
