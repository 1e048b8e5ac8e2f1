"""The suite's fork server (tests/forkserver.py) must run a script as `python script args` does, or
every test that goes through it proves less than it says: the same argv, __name__, __file__,
sys.path[0], working directory, environment, output, exit status, signal death, thread joins and
atexit handlers at the end, and a fresh numpy seed. Each case runs a probe script both ways."""
import json
import os
import subprocess
import sys

import pytest

import forkserver
from conftest import ENV, ROOT, popen

pytestmark = pytest.mark.skipif(os.environ.get("TEST_EXEC") == "1",
                                reason="TEST_EXEC=1: nothing is forked")

PROBE = """
import atexit, json, os, sys, threading, time
import numpy as np
print(json.dumps({"argv": sys.argv, "name": __name__, "file": __file__, "path0": sys.path[0],
                  "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                  "home": "HOME" in os.environ}))
print("on stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(3)
if how == "raise":
    raise ValueError("boom")
if how == "kill":
    os.kill(os.getpid(), 9)
if how == "thread":  # the interpreter waits for a non-daemon thread before it exits
    threading.Thread(target=lambda: (time.sleep(0.2), print("thread done", flush=True))).start()
if how == "atexit":
    atexit.register(print, "at exit")
if how == "seed":
    print(np.random.randint(1 << 30))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return str(path)


def both(probe, how):
    """(forked, exec'd): each a (returncode, stdout, stderr)."""
    env = {"PROBE": "seen"}
    forked = popen(probe, [how], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = forked.communicate(timeout=60)
    fresh = subprocess.run([sys.executable, probe, how], cwd=ROOT, env=dict(ENV, **env),
                           capture_output=True, text=True, timeout=60)
    assert isinstance(forked, forkserver.Forked), "the probe was not forked"
    return (forked.returncode, out, err), (fresh.returncode, fresh.stdout, fresh.stderr)


@pytest.mark.parametrize("how", ["exit", "kill", "thread", "atexit", "none"])
def test_a_forked_script_runs_as_a_fresh_interpreter_does(probe, how):
    forked, fresh = both(probe, how)
    assert forked == fresh
    assert json.loads(forked[1].splitlines()[0])["probe"] == "seen"


def test_an_uncaught_exception_exits_1_with_its_traceback(probe):
    (code, out, err), (fresh_code, fresh_out, fresh_err) = both(probe, "raise")
    assert code == fresh_code == 1 and out == fresh_out
    # the traceback holds two more frames (the server's runpy call); its start and end are the same
    assert (err.splitlines()[:2] == fresh_err.splitlines()[:2]
            and err.splitlines()[-1] == "ValueError: boom")
    assert fresh_err.splitlines()[-1] == "ValueError: boom"


def test_each_child_draws_its_own_numpy_seed(probe):
    jobs = [popen(probe, ["seed"], None, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                  text=True)
            for _ in range(3)]
    draws = {job.communicate(timeout=60)[0].splitlines()[-1] for job in jobs}
    assert len(draws) == 3


def test_a_child_is_a_process_of_its_own(probe):
    """Its own pid, which a signal reaches; wait() times out as Popen's does."""
    job = popen(probe, ["thread"], None, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)
    assert job.pid not in (os.getpid(), os.getppid())
    with open(f"/proc/{job.pid}/cmdline", "rb") as f:
        assert f.read()  # alive, in /proc
    job.kill()
    assert job.wait(timeout=60) == -9
    with pytest.raises(subprocess.TimeoutExpired):
        popen(probe, ["thread"], None, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL).wait(timeout=0.01)
