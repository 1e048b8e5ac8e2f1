"""
What a user sees of a failure, and the console line: the one module every other imports, and
which imports nothing of the project.

Errors: library code raises UsageError (the command is wrong: exit 2) or RunError (the command is
fine but the files, the machine or the run stop it: exit 1); a script's hook (one_line_errors)
turns one that nobody caught into its one `error:` line, never a traceback. fail() is the same
for a script that decides to stop itself.

The console: say() is print() that a closed or broken stdout or stderr (a `| tee` or `| head` that
died, a closed terminal, a dropped ssh session) can never turn into an exception: a run that cannot
print goes on training and checkpointing, silently. A run's lines (rank 0's) are also appended to
out_dir/console.log (`console`), so that a re-run with `>` loses none of them.
"""
import os
import sys

CONSOLE = "console.log"


class UsageError(Exception):
    """Raised by library code when the command is wrong (a name that names nothing): exit 2."""


class RunError(Exception):
    """Raised by library code when the command is fine but the files, the machine or the run stop
    it (CheckpointError, DeviceError, GPT2Error are ones): exit 1."""


def error_line(message, err=None):
    """Prints a command's one `error:` line to err (sys.stderr), and returns err. Under torchrun
    every rank usually meets the same bad file or value: the job's log then holds one `error:` line
    (rank 0's), the others' say which rank they come from."""
    err = err or sys.stderr
    rank = os.environ.get("RANK", "0")
    # one write, newline included: ranks sharing a pipe never splice lines (print writes twice)
    line = f"{'' if rank == '0' else f'rank {rank}: '}error: {message}\n"
    err.write(line)
    console.add(line)
    return err


def exit_now(code, err):
    """os._exit, output flushed first: once a process group is up, interpreter shutdown destroys
    gloo's threads under them, which aborts some ranks at random (SIGABRT, "terminate called without
    an active exception") and turns an exit 1 or 2 into a crash in torchrun's report."""
    for stream in (sys.stdout, err):
        stream.flush()
    os._exit(code)


def fail(message, code=2):
    """The command is wrong (2) or the files or machine stop it (1): its error line, then exit."""
    err = error_line(message)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        exit_now(code, err)
    sys.exit(code)


def one_line_errors():
    """For scripts: a UsageError or RunError that nobody caught ends the process with its one
    `error:` line and exit 2 or 1, never a traceback. It installs the process's excepthook."""
    previous = sys.excepthook

    def hook(kind, e, tb):
        if not isinstance(e, (UsageError, RunError)):
            return previous(kind, e, tb)
        # the process's own stderr: torch.distributed's hook (init_process_group wraps ours) reads
        # what we write to sys.stderr into a buffer, which os._exit would drop
        err = error_line(e, sys.__stderr__ or sys.stderr)
        # a hook cannot set the exit code otherwise
        exit_now(2 if isinstance(e, UsageError) else 1, err)
    sys.excepthook = hook


def cut_line(text, limit=160):
    """The first line of text, cut at a word boundary when it is long (never mid-word)."""
    text = (text.strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def first_line(e):
    """An exception as one short line, for an error message: its type and the start of its first
    line."""
    return f"{type(e).__name__}: {cut_line(str(e))}" if str(e).strip() else type(e).__name__


def _silence(stream):
    """Point a broken stream's file descriptor at /dev/null: later writes, and the flush Python does
    at exit (a failed one turns exit code 0 into 120), then succeed quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class ConsoleCopy:
    """A copy of the console lines in out_dir/console.log: appended, never truncated. After keep(),
    lines wait in memory until open(out_dir) (a run holds its out_dir, or has made it, only after
    its first lines), which writes them, then each line as it is said, error lines included. A
    failed write is one warning on the console and the copy ends: it never stops a run."""

    def __init__(self):
        # waiting None: nothing kept (not a run, not rank 0)
        self.waiting, self.file, self.path = None, None, None

    def keep(self):
        self.waiting = []  # (error lines are console lines too: error_line adds them)

    def open(self, out_dir):
        if self.waiting is None:
            return
        self.path = os.path.join(out_dir, CONSOLE)
        try:
            self.file = open(self.path, "a", encoding="utf-8", errors="replace")
        except OSError as e:
            return self._failed(e)
        waiting, self.waiting = self.waiting, None
        self.add("".join(waiting))

    def add(self, text):
        if self.file is not None:
            try:
                self.file.write(text)
                self.file.flush()
            except (OSError, ValueError) as e:
                self._failed(e)
        elif self.waiting is not None:
            self.waiting.append(text)

    def _failed(self, e):
        self.file = self.waiting = None
        say(f"warning: {self.path} cannot be written ({getattr(e, 'strerror', None) or e}); "
            f"the run goes on without it", err=True)


console = ConsoleCopy()


def say(*parts, err=False):
    """print(), flushed (so `| tee` shows each line as it comes), and never raising; copied to
    console."""
    stream = sys.stderr if err else sys.stdout
    console.add(" ".join(map(str, parts)) + "\n")
    try:
        print(*parts, file=stream, flush=True)
    except (OSError, ValueError):  # EPIPE, EIO from a vanished terminal, a closed file
        _silence(stream)
