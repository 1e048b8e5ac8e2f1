"""The test suite's fork server: a process that has imported torch once and forks a child for each
script a test runs.

Every train.py a test starts spends about two seconds importing torch and torch._dynamo (which
AdamW's constructor imports) before its first step, more than a tiny run trains, and most tests
start several. Here that import is paid once per test worker, and each script runs in a forked
child: a process of its own (its own pid, signals, files, exit status) running the real script as
__main__, with the test's arguments, environment, working directory and stdin/stdout/stderr. Nothing
of the project is imported here, so a script run from a copy of the project imports that copy's
modules.

conftest.py talks to it and falls back to a fresh interpreter wherever a fork could differ from one
(a command prefix such as strace, torchrun, a preexec_fn, environment variables that torch or Python
read at start); TEST_EXEC=1 runs every script in a fresh interpreter.

Protocol, one connection per script (AF_UNIX, SOCK_SEQPACKET): the test sends a JSON request
{script, args, cwd, env} with its fds 0, 1, 2 attached; the server answers the child's pid, then,
when the child has ended, its exit code as subprocess reports it (-N for a signal).
"""
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading


def serve(path):
    """Answers requests until stdin closes (the test worker has gone); returns a request in each
    forked child, with the child's fds already in place."""
    import numpy  # noqa: F401  (what every script imports, paid once)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    # What is imported lives as long as the process: out of the collector's sight, a child's
    # collections (its exit's among them) neither walk it nor copy every page they touch
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # a child's end wakes the select below
    signal.signal(signal.SIGCHLD, lambda *_: None)
    jobs = {}  # pid -> the connection that waits for its exit code
    print("ready", flush=True)
    while True:
        ready = select.select([listener, wake_r, 0], [], [])[0]
        if 0 in ready and not os.read(0, 1):
            sys.exit(0)
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):  # drained: the children are reaped below
                    pass
            except BlockingIOError:
                pass
        if listener in ready:
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for sock in (listener, conn, *jobs.values()):
                    sock.close()
                os.close(wake_r)
                os.close(wake_w)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                for fd in set(fds) - {0, 1, 2}:
                    os.close(fd)
                return json.loads(msg)
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            jobs[pid] = conn
        while jobs:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = jobs.pop(pid)
            try:
                conn.send(str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:
                pass  # the test stopped waiting
            conn.close()


class Server:
    """The test worker's side: starts the server (env: its environment, that of every child unless
    a request says otherwise) and forks scripts from it."""

    def __init__(self, env):
        self.folder = tempfile.mkdtemp(prefix="forkserver-")
        self.path = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path],
                                     env=env, cwd=self.folder, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline() != "ready\n":
            raise RuntimeError(f"the fork server did not start (exit code {self.proc.wait()})")

    def close(self):
        self.proc.stdin.close()  # the server's cue to exit
        self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def popen(self, script, args, cwd, env, stdout=None, stderr=None, text=False):
        return Forked(self.path, script, args, cwd, env, stdout, stderr, text)


class Forked:
    """What subprocess.Popen gives (pid, stdout, stderr, returncode, poll, wait, communicate,
    send_signal, terminate, kill), for a script forked by the server at path."""

    def __init__(self, path, script, args, cwd, env, stdout, stderr, text):
        self.args = [sys.executable, script, *args]
        self.returncode, self.stdout, self.stderr = None, None, None
        self._readers, self._output = None, {}  # communicate()'s threads and what they read
        ours = []  # fds opened here for the child, closed once sent

        def fd_for(spec, inherit, name):
            if spec is None:
                return inherit
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                setattr(self, name, open(r, "r" if text else "rb"))
                ours.append(w)
                return w
            if spec == subprocess.DEVNULL:
                ours.append(os.open(os.devnull, os.O_RDWR))
                return ours[-1]
            return spec if isinstance(spec, int) else spec.fileno()

        out = fd_for(stdout, 1, "stdout")
        err = out if stderr == subprocess.STDOUT else fd_for(stderr, 2, "stderr")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.connect(path)
        request = {"script": script, "args": list(args), "cwd": cwd, "env": env}
        socket.send_fds(self._sock, [json.dumps(request).encode()], [0, out, err])
        for fd in ours:
            os.close(fd)
        self.pid = int(self._sock.recv(64))

    def wait(self, timeout=None):
        if self.returncode is None:
            self._sock.settimeout(timeout)
            try:
                answer = self._sock.recv(64)
            except (TimeoutError, BlockingIOError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not answer:
                raise RuntimeError("the fork server went away before its child ended")
            self.returncode = int(answer)
            self._sock.close()
        return self.returncode

    def poll(self):
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def communicate(self, timeout=None):
        """Reads stdout and stderr to their ends (in threads, as a child may fill either pipe),
        then waits; a timeout leaves the reading going for the next call, as Popen's does."""
        if self._readers is None:
            self._readers = [
                threading.Thread(target=lambda n=n, f=f: self._output.__setitem__(n, f.read()),
                                 daemon=True)
                for n, f in (("stdout", self.stdout), ("stderr", self.stderr)) if f]
            for t in self._readers:
                t.start()
        for t in self._readers:
            t.join(timeout)
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        for f in (self.stdout, self.stderr):
            if f:
                f.close()
        self.wait(timeout)
        return self._output.get("stdout"), self._output.get("stderr")

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    request = serve(sys.argv[1])
    # from here on this is the child: it becomes the script, as `python script args` would run it
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(request["script"])
    if "numpy.random" in sys.modules:  # a fresh process seeds numpy's global generator afresh
        sys.modules["numpy.random"].seed()  # (Python's random reseeds itself after a fork)
    import runpy
    runpy.run_path(request["script"], run_name="__main__")
