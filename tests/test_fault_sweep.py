"""A sample of the fault sweep (bench/fault_sweep.py; docs/checkpoints.md): a short training run
with checkpoints, its Nth fsync, rename, unlink, openat, write or mkdir on a checkpoint path failing
(EIO, ENOSPC) or the process killed there (strace -e inject), then: no traceback; exit 0, or 1 with
one error line; everything under a checkpoint's name loads; what was saved before the fault is still
there; the same command without faults ends bitwise where the uninterrupted run did. The same for
background saves, a write cut short by RLIMIT_FSIZE (torch's RuntimeError), and the remote tier
(a file:// remote_dir, SeaweedFS's S3), whose complete checkpoints must then verify.

Points are picked by the call they hit (the sweep's describe(): paths relative to out_dir, pids as
PID), not by their number, so that they follow the code when its calls move. The whole sweep, every
point: python bench/fault_sweep.py."""
import importlib.util
import os

import pytest

from conftest import ROOT


def _load_sweep():
    """bench/fault_sweep.py as a module (bench/ is not a package, and must not go on sys.path: its
    checkpoint.py would hide the project's)."""
    spec = importlib.util.spec_from_file_location("fault_sweep",
                                                  os.path.join(ROOT, "bench", "fault_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()

# (scenario, rank, syscall family, kind, the call it hits: a regex, which match (0 the first), why).
# Points that a test of their own already holds are left to it: a write failing midway
# (test_faults.py::test_failed_writes_efbig), retention that cannot delete
# (test_checkpointer.py::test_an_undeletable_old_file_is_a_warning), a kill in the middle of a
# folder's delete (test_checkpointer.py::test_kill_in_the_middle_of_a_folder_delete)
POINTS = [
    ("files", 0, "rename", "kill", r"-> ckpt\.pt$", 0, "killed as ckpt.pt is replaced"),
    ("files", 0, "rename", "eio", r"-> ckpt-00000006\.pt$", 0, "the final save's commit fails"),
    ("files", 0, "rename", "kill", r"-> ckpt-00000006\.pt$", 0,
     "killed at the final save's commit"),
    ("files", 0, "unlink", "kill", r"ckpt-00000002\.pt$", 0, "killed as retention deletes"),
    ("resume", 0, "openat", "eio", r"^openat \.$", 0, "out_dir cannot be read at the start"),
    ("folders", 1, "fsync", "eio", r"__1_0\.distcp$", 0, "rank 1 cannot write its shard"),
    # rank 0's error line used to vanish (torch's excepthook buffers stderr; os._exit dropped it)
    # and rank 1 died in a collective with a traceback (found by the full sweep)
    ("folders", 0, "openat", "eio", r"^openat \.$", 3,
     "out_dir cannot be listed as the checkpointer starts"),
    # background saves (--async_save): the writer thread's calls
    ("files-async", 0, "write", "kill", r"^write \.ckpt-00000004\.pt\.tmp-PID$", 0,
     "an async save killed mid-write"),
    ("folders-async", 1, "fsync", "eio", r"__1_0\.distcp$", 0,
     "rank 1 cannot write its shard in the background"),
    # RLIMIT_FSIZE cuts the write short: torch raises RuntimeError, not OSError
    ("fsize", 0, "save", "fsize", r"\.ckpt-00000006\.pt\.tmp-PID$", 0, "the final save cut short"),
    # the remote tier: the uploader's calls on a file:// remote_dir, its requests to SeaweedFS
    ("remote-file", 0, "rename", "kill", r"-> remote:ckpt-00000002\.pt\.commit$", 0,
     "killed at a commit objects rename"),
    ("remote-file", 0, "write", "enospc", r"remote:data/00000002-X+/\.ckpt-00000002\.pt\.tmp-PID",
     0, "a data objects write fails"),
    # (only fsspec's I/O thread sends, so its Nth send is the same call in the clean and faulted
    # runs; which checkpoints go up depends on timing, so the first data object's, whichever it is)
    ("remote-s3", 0, "sendto", "kill", r"PUT data/\d{8}-X+/ckpt-\d{8}\.pt$", 0,
     "killed as a data object goes up"),
]


def _values(p):
    return p.values[0] if hasattr(p, "values") else p  # a pytest.param's own


def _id(p):
    scenario, rank, family, kind, _, _, why = _values(p)
    return f"{scenario}-r{rank}-{family}-{kind}-" + why.replace(" ", "_").replace("'", "")


@pytest.fixture(scope="module")
def results(shakespeare_char, tmp_path_factory):
    """Every point above, two at a time, after one clean run of each scenario: {id: Result or the
    LookupError of a call that the clean run never made}."""
    work = str(tmp_path_factory.mktemp("sweep"))
    # the longest first; every write and send a point (the sweep samples them)
    cleans = sweep.clean_runs(["folders", "folders-async", "remote-s3", "remote-file", "files",
                               "files-async", "fsize", "resume"], work, writes=10**6)
    found, items = {}, []
    for p in POINTS:
        scenario, rank, family, kind, target, which, _ = _values(p)
        try:
            items.append((_id(p), cleans[scenario],
                          sweep.pick(cleans[scenario], family, kind, target, rank, which)))
        except LookupError as e:
            found[_id(p)] = e
    items.sort(key=lambda item: not item[1].scenario.torchrun)  # the long torchrun points first
    # rerun=False: a faulted run that ended well is checked without running it again
    done = sweep.sweep([(c, point) for _, c, point in items], work, jobs=2, rerun=False)
    found.update({i: r for (i, _, _), r in zip(items, done)})
    return found, cleans


@pytest.mark.parametrize("point", POINTS, ids=_id)
def test_fault_point(results, point):
    found, cleans = results
    r = found[_id(point)]
    if isinstance(r, LookupError):
        pytest.fail(str(r))
    assert r.ok, (f"{r.point.id} ({point[-1]}): " + "; ".join(r.reasons) + f"\n{r.command}\n"
                  + sweep.summary([r], cleans) + "\n" + r.output[-4000:])
