"""
The fault sweep (docs/checkpoints.md): as SQLite fails its Nth I/O call for every N, every
failure point of a short training run's save and load paths is tried, one at a time, and what is
left on disk is checked after each. From the project root:

    # every point of every scenario (hours: see --sample)
    python bench/fault_sweep.py
    # at most 40 points a scenario, spread over syscalls and kinds
    python bench/fault_sweep.py --sample=40
    python bench/fault_sweep.py --scenarios=folders --syscalls=rename,fsync --kinds=kill
    # the points of each scenario, without running them
    python bench/fault_sweep.py --list
    # one point again, its output shown (a failure's repro)
    python bench/fault_sweep.py --point=files/fsync/eio/3
    # the remote tier
    python bench/fault_sweep.py --scenarios=remote-file,remote-s3 --sample=20

Scenarios: train.py on tests/conftest.py's TINY model, 6 iterations, a checkpoint every 2, an eval
every 3, keep_last=2. 'files' writes ckpt-*.pt and ckpt.pt; 'folders' is FSDP on 2 gloo ranks under
torchrun (checkpoint folders); 'resume' continues a finished 4-iteration run to 8 (the load path);
'files-async' and 'folders-async' are the first two with --async_save=True (a background thread
writes). 'fsize' cuts the Kth checkpoint file short with RLIMIT_FSIZE (FSIZE_HOOK: torch raises
RuntimeError, not OSError), one point per checkpoint file of the clean run. 'remote-file' and
'remote-s3' are 'files' with a remote_dir (file://<point>/remote; a prefix of one SeaweedFS bucket,
tests/s3server.py, one server for the sweep): their points are the uploader's calls on the remote
folder, or its sends (sendto) of requests to S3; after each, every checkpoint the remote's listing
calls complete must verify (checkpoint.py verify: objects read back, CRCs checked) and none be
incomplete, and after the run without faults the newest complete one must be the final checkpoint,
with no upload of that run's own left without a commit object. strace counts when=N per thread, so
in these new scenarios a point whose Nth call in another thread is on a file elsewhere (the main
thread's imports at start-up) is skipped ('stray'): the uploader's and the async writer's openat
points are mostly not tried.

1. The clean run, under `strace -f`: every call of fsync, fdatasync, rename(at,at2), link(at),
   unlink(at), rmdir, mkdir(at), ftruncate, openat, write and pwrite64 on a path under out_dir
   (out_dir itself included) is a point. strace counts `when=N` per syscall and per thread (its
   "tracee"), so a point is (syscall, N): the Nth call of that syscall in some thread of the process
   (one rank's process under torchrun: strace runs inside torchrun, so the launcher is never hit).
2. Each point, in a fresh out_dir, is the same command under
   `strace -f -e trace=S -e inject=S:error=EIO:when=N` (ENOSPC for write and pwrite64, which are
   sampled: --writes) and separately `...:signal=KILL:when=N`. Then it checks:
   - no Traceback in the output (not counted: torchrun's own report of a failed worker, and torch's
     traceback of a rank whose peer was killed, "Connection closed by peer");
   - exit 0, or 1 with exactly one `error:` line (under torchrun, when one rank alone met the error,
     its `rank N: error: ...` line); a kill: killed (-9, 137; torchrun exits 1);
   - every file or folder under a checkpoint's name loads (store.load);
   - the newest periodic checkpoint, and ckpt.pt, announced ("saved ...") before the faulted call in
     the clean run still exist (unless keep_last newer ones replaced the periodic one);
   - the same command without faults then exits 0, leaves no temporary behind, and its final
     checkpoint's model, optimizer and torch RNG are bitwise those of the clean run.
At most two points run at a time (--jobs), every process with OMP_NUM_THREADS=1. The summary counts
points tried and survived per scenario, syscall and kind; each failure is listed with its reasons
and the command that reproduces it (its work folder is kept).
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
sys.path.insert(0, ROOT)  # its modules (store.load), when run as python bench/fault_sweep.py

# tests/conftest.py's TINY: a training step takes milliseconds on a CPU
TINY = ["--device=cpu", "--compile=False", "--dataset=shakespeare_char", "--n_layer=2",
        "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=5", "--lr_decay_iters=100", "--learning_rate=1e-3", "--peak_flops=1e11"]
RUN = ["--checkpoint_interval=2", "--eval_interval=3", "--keep_last=2"]
KEEP_LAST = 2
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

# EIO and kill at every call
FAULTED = ["fsync", "fdatasync", "rename", "renameat", "renameat2", "link", "linkat", "unlink",
           "unlinkat", "rmdir", "mkdir", "mkdirat", "ftruncate", "openat"]
WRITES = ["write", "pwrite64"]  # ENOSPC and kill at a sample of the calls (there are hundreds)
# remote-s3: a request's bytes going out (EIO: botocore retries), sampled as writes
SENDS = ["sendto", "sendmsg"]
KINDS = ("eio", "enospc", "kill", "fsize")
# names that are a checkpoint's (NAMES): files, folders, ckpt.pt, another branch's kept best
NAMES = re.compile(r"ckpt(\.pt|-best-b\d+-\d{8}\.pt|-\d{8}(-b\d+)?(\.pt)?)$")
# keep/atomic.py's '.<name>.tmp-<pid>' and '.<name>.old-<pid>'
TEMPORARY = re.compile(r"^\..*\.(tmp|old)-")


@dataclass
class Scenario:
    name: str
    args: list
    final: int  # the iteration of the last checkpoint
    torchrun: bool = False
    # a run made once before (not faulted): every point starts from a copy of its out_dir
    setup: list = None
    # 'file' or 's3': each out_dir gets a remote_dir of its own, and the points are its calls
    remote: str = ""
    # the points are RLIMIT_FSIZE cutting one checkpoint's write short (fsize_points)
    fsize: bool = False
    pure: bool = True  # points whose Nth call, in another thread, is elsewhere are skipped (stray)

    def final_name(self):
        return f"ckpt-{self.final:08d}" + ("" if self.torchrun else ".pt")

    def command(self, out, strace=None, rank=None, trace=None, logs=None):
        """The train.py command into `out`; strace: its arguments (less -o) to run it under, on one
        rank (`rank`) or every rank (None) under torchrun; trace: strace's output file (.<rank>
        added)."""
        train = [sys.executable, os.path.join(ROOT, "train.py"), *self.args, f"--out_dir={out}"]
        if self.remote:
            train.append(f"--remote_dir={remote_url(self, out)}")
        if not self.torchrun:
            return [*(["strace", *strace, "-o", trace] if strace else []), *train]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2"]
        if logs:  # each rank's output in a file of its own, apart from the launcher's report
            launch += ["--redirects=3", f"--log-dir={logs}"]
        if not strace:
            return [*launch, *train[1:]]
        script = (f'if [ -z "{"" if rank is None else rank}" ] || [ "$LOCAL_RANK" = "{rank}" ]; '
                  f'then exec {shlex.join(["strace", *strace])} -o '
                  f'{shlex.quote(trace)}."$LOCAL_RANK" "$@"; fi; exec "$@"')
        return [*launch, "--no-python", "sh", "-c", script, "sh", *train]


SCENARIOS = {
    "files": Scenario("files", [*TINY, *RUN, "--max_iters=6"], final=6, pure=False),
    "folders": Scenario("folders", [*TINY, "--gradient_accumulation_steps=2", "--parallelism=fsdp",
                                    *RUN, "--max_iters=6"], final=6, torchrun=True, pure=False),
    "resume": Scenario("resume", [*TINY, *RUN, "--max_iters=8"], final=8,
                       setup=[*TINY, *RUN, "--max_iters=4"], pure=False),
    # the same saves written by the background thread (--async_save): its calls are counted apart
    "files-async": Scenario("files-async", [*TINY, *RUN, "--max_iters=6", "--async_save=True"],
                            final=6),
    "folders-async": Scenario("folders-async", [*TINY, "--gradient_accumulation_steps=2",
                                                "--parallelism=fsdp", *RUN, "--max_iters=6",
                                                "--async_save=True"], final=6, torchrun=True),
    # a short write: torch raises RuntimeError (not OSError) when the file size limit cuts it
    "fsize": Scenario("fsize", [*TINY, *RUN, "--max_iters=6"], final=6, fsize=True),
    # the remote tier: the points are the uploader's calls on remote_dir (remote_wait: the end waits
    # for it)
    "remote-file": Scenario("remote-file", [*TINY, *RUN, "--max_iters=6", "--remote_wait=30"],
                            final=6, remote="file"),
    "remote-s3": Scenario("remote-s3", [*TINY, *RUN, "--max_iters=6", "--remote_wait=30"], final=6,
                          remote="s3"),
}
S3_BUCKET = "sweep"
# the one SeaweedFS server of the whole sweep (start_s3), started by the first remote-s3 run
_s3 = {}


def remote_url(scenario, out):
    """The remote_dir of an out_dir: <its folder>/remote, or a prefix of its own in the sweep's
    bucket."""
    folder = os.path.dirname(out)
    if scenario.remote == "file":
        return "file://" + os.path.join(folder, "remote")
    return (f"s3://{S3_BUCKET}/{os.path.basename(os.path.dirname(folder))}/"
            f"{os.path.basename(folder)}")


def start_s3(work):
    """tests/s3server.py's SeaweedFS on loopback, its credentials in ENV (every run and
    checkpoint.py gets them); killed when the sweep ends."""
    if not _s3:
        import atexit
        import importlib.util
        spec = importlib.util.spec_from_file_location("s3server",
                                                      os.path.join(ROOT, "tests", "s3server.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        server = module.S3Server(os.path.join(work, "s3"))
        atexit.register(server.kill)
        server.bucket(S3_BUCKET)
        ENV.update(server.env())
        _s3["server"], _s3["port"] = server, server.ports[0]
    return _s3["server"]


# ---------------------------------------------------------------------------------------------
# reading strace's output (-f -y -ttt): 'TID TIME name(args) = ret', possibly split by other threads
# into 'name(args <unfinished ...>' and '<... name resumed>) = ret'

CALL = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)$")
RESUMED = re.compile(r"^(\d+)\s+\d+\.\d+\s+<\.\.\. (\w+) resumed>(.*)$")
RESULT = re.compile(r"\)\s+=\s+(-?\d+|\?)(?: (\w+))?")
TOKEN = re.compile(r'(\d+|AT_FDCWD)<((?:[^>\\]|\\.)*)>|"((?:[^"\\]|\\.)*)"')
PATH_ARGS = {"openat", "rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat",
             "rmdir", "mkdir", "mkdirat"}


@dataclass
class Call:
    tid: int
    ts: float
    name: str
    n: int  # this is the thread's n-th call of `name` (what strace's when=N counts)
    paths: list
    text: str
    ret: str = None  # '0', '-1 EIO', '?' (never returned: killed)
    injected: bool = False

    def ok(self):
        return self.ret is not None and not self.ret.startswith(("-", "?"))

    def __repr__(self):
        return f"<{self.name} #{self.n} of thread {self.tid}: {self.ret}>"


def _unescape(s):
    return (s.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace")
            if "\\" in s else s)


def _paths(name, args):
    """The paths a call touches: an fd's (shown by -y), and for path calls each name, joined to the
    directory fd before it."""
    paths, folder = [], None
    for fd, fd_path, string in TOKEN.findall(args):
        if fd:
            folder = _unescape(fd_path).removesuffix(" (deleted)")
            if name not in PATH_ARGS and not paths:
                paths.append(folder)
        elif name in PATH_ARGS:
            s = _unescape(string)
            paths.append(os.path.normpath(os.path.join(folder or ROOT, s)))
    return paths


def read_trace(path):
    """Every call in one strace output file, in order."""
    calls, counts, open_calls = [], defaultdict(int), {}
    with open(path, errors="replace") as f:
        for line in f:
            m = CALL.match(line)
            if m:
                tid, ts, name, rest = int(m[1]), float(m[2]), m[3], m[4]
                counts[tid, name] += 1
                call = Call(tid, ts, name, counts[tid, name], _paths(name, rest),
                            f"{name}({rest.strip()}")
                calls.append(call)
                if rest.rstrip().endswith("<unfinished ...>"):
                    open_calls[tid] = call
                else:
                    _finish(call, rest)
                continue
            m = RESUMED.match(line)
            if m and int(m[1]) in open_calls:
                _finish(open_calls.pop(int(m[1])), m[3])
    return calls


def _finish(call, rest):
    m = RESULT.search(rest)
    if m:
        call.ret = m[1] + (f" {m[2]}" if m[2] else "")
    call.injected = "(INJECTED)" in rest


def under(path, out):
    return path == out or path.startswith(out + os.sep)


def remote_folder(out):
    return os.path.join(os.path.dirname(out), "remote")  # a file:// remote_dir (remote_url)


# the sockets ('socket:[inode]', as strace -y shows them) that requests to S3 went out on
HTTP = set()


def find_http(calls):
    """Note the sockets of calls that send a request to the sweep's S3 server."""
    HTTP.update(c.paths[0] for c in calls if c.paths and "port" in _s3 and
                f"HTTP/1.1\\r\\nHost: 127.0.0.1:{_s3['port']}" in c.text)
    return calls


def is_s3(path):
    return path in HTTP


def describe(call, out):
    """A call in words that do not change from run to run: paths relative to out_dir (or 'remote:'
    and relative to a file:// remote_dir), pids as PID, upload prefixes as XXXXXXXX, a socket to S3
    as 's3'."""
    rem = remote_folder(out)
    rel = [("." if p == out else os.path.relpath(p, out)) if under(p, out) else
           "remote:" + os.path.relpath(p, rem) if under(p, rem) else "s3" if is_s3(p) else p
           for p in call.paths]
    # a request's first bytes: what it asks
    request = REQUEST.search(call.text) if rel == ["s3"] else None
    rel += [f"{request[1]} {request[3] or '.'}{request[4] or ''}"] if request else []
    rel = [re.sub(r"(data/\.?\d{8}-)[0-9a-f]{8}", r"\1XXXXXXXX",
                  re.sub(r"(\.(tmp|old)-)\d+", r"\1PID", p)) for p in rel]
    return f"{call.name} " + " -> ".join(rel)


# 'PUT /sweep/remote-s3/<folder>/<key>?uploads HTTP/1.1': the method, the key below remote_dir, a
# query's name
REQUEST = re.compile(rf'"([A-Z]+) /{S3_BUCKET}/[^/ ?]+/[^/ ?]+(/([^ ?]*))?(\?[a-zA-Z-]+)?')


def watched(scenario, out, call):
    """Whether a call is one the scenario's points are made of: on out_dir, or on the remote_dir."""
    if scenario.remote == "s3":
        return any(is_s3(p) for p in call.paths)
    top = remote_folder(out) if scenario.remote else out
    return any(under(p, top) for p in call.paths)


def stray(scenario, out, call):
    """A call that a point's injection must not hit: strace counts when=N in every thread, so the
    Nth openat of a background thread (the async writer, the uploader) is also the main thread's
    Nth, an import at start-up. The new scenarios skip a point whose Nth call, in some thread, is
    on a file outside the point's folder (pipes and sockets are fine: stdout survives EIO)."""
    if scenario.pure and call.name in SENDS and not any(is_s3(p) for p in call.paths):
        # asyncio's wake-up byte: its EIO is swallowed, the wake-up lost and fsspec's sync() waits
        # forever
        return True
    return (scenario.pure
            and any(p.startswith("/") and not under(p, os.path.dirname(out)) for p in call.paths))


ANNOUNCED = re.compile(r'"saved (\S+?)(?:\\n| \()')


def announced(calls):
    """(time, path) of each 'saved PATH' the run printed: a checkpoint it says is on disk."""
    return [(c.ts, m[1]) for c in calls if c.name == "write" for m in ANNOUNCED.finditer(c.text)]


def deleted(calls):
    """(time, path) of each checkpoint name that a successful call took away."""
    gone = []
    for c in calls:
        if (c.ok() and c.paths
                and (c.name in ("unlink", "unlinkat", "rmdir") or c.name.startswith("rename"))):
            gone.append((c.ts, c.paths[0]))
    return [(t, p) for t, p in gone if NAMES.fullmatch(os.path.basename(p))]


# ---------------------------------------------------------------------------------------------
# points

@dataclass
class Point:
    scenario: str
    rank: int  # the rank whose process is faulted (0 without torchrun)
    syscall: str
    kind: str
    n: int
    # the calls of the clean run that it hits (the n-th of its thread), touching out_dir
    targets: list
    torchrun: bool = False

    @property
    def id(self):
        return "/".join([self.scenario, *([f"r{self.rank}"] if self.torchrun else []), self.syscall,
                         self.kind, str(self.n)])

    def inject(self):
        if self.kind == "fsize":
            return f"rlimit:fsize:at the {self.n}th checkpoint file"
        if self.kind == "kill":
            return f"{self.syscall}:signal=KILL:when={self.n}"
        return f"{self.syscall}:error={'ENOSPC' if self.kind == 'enospc' else 'EIO'}:when={self.n}"


@dataclass(repr=False)
class Clean:
    """The clean (unfaulted) run of a scenario: its calls per rank, what it announced and
    deleted."""
    scenario: Scenario
    out: str
    template: str  # the out_dir every point starts from ('' for an empty one)
    calls: dict  # rank -> [Call]
    points: list = field(default_factory=list)


def strace_args(syscalls, inject=None):
    # --seccomp-bpf: the process stops only at the traced syscalls, not at every one (several times
    # faster); strace 6.1 silently drops a signal= injection with it, so a kill goes without
    fast = [] if inject and "signal=" in inject else ["--seccomp-bpf"]
    args = [*fast, "-f", "-qq", "-y", "-ttt", "-s", "300", "-e", "trace=" + ",".join(syscalls)]
    return args + (["-e", "inject=" + inject] if inject else [])


def spread(items, m):
    """m of the items, evenly spaced from the first to the last (the middle one for m=1)."""
    if m >= len(items):
        return list(items)
    if m == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (m - 1))] for i in range(m)]


def make_points(clean, writes=12):
    """Every (syscall, N) of the clean run whose call touches out_dir, as EIO and kill points; for
    write and pwrite64, ENOSPC and kill at `writes` of them spread over each rank's."""
    if clean.scenario.fsize:
        clean.points = fsize_points(clean)
        return clean.points
    points, sc = [], clean.scenario
    for rank, calls in sorted(clean.calls.items()):
        hits, seen, skip = defaultdict(list), set(), set()  # (syscall, n) -> calls
        for c in calls:
            if watched(sc, clean.out, c):
                seen.add((c.name, c.n))
            if stray(sc, clean.out, c):
                skip.add((c.name, c.n))
            elif (watched(sc, clean.out, c) or sc.pure
                    and any(under(p, os.path.dirname(clean.out)) for p in c.paths)):
                hits[c.name, c.n].append(c)  # also hit: the fault's time is the first's
        for name in [*FAULTED, *WRITES, *SENDS]:
            ns = sorted(n for s, n in seen if s == name and (s, n) not in skip)
            for n in spread(ns, writes) if name in WRITES + SENDS else ns:
                for kind in ("enospc", "kill") if name in WRITES else ("eio", "kill"):
                    points.append(Point(clean.scenario.name, rank, name, kind, n, hits[name, n],
                                        clean.scenario.torchrun))
    clean.points = points
    return points


def sample(points, k):
    """At most k points: each (rank, syscall, kind) group gets a share in turn, spread over the
    group."""
    if k is None or len(points) <= k:
        return points
    groups = defaultdict(list)
    for p in points:
        groups[p.rank, p.syscall, p.kind].append(p)
    share, total = defaultdict(int), 0
    while total < k:
        for g in groups:
            if share[g] < len(groups[g]) and total < k:
                share[g] += 1
                total += 1
    return [p for g, m in share.items() for p in spread(groups[g], m)]


# python -c FSIZE_HOOK K LIMIT train.py ARGS: train.py with the file size limit at LIMIT bytes from
# the Kth checkpoint file it opens for writing to the next one (an audit hook on open: no race with
# the run), so that the Kth save alone is cut short. Python ignores SIGXFSZ: the write past the
# limit is short, the next one EFBIG, and torch's writer raises RuntimeError.
FSIZE_HOOK = """
import os, re, resource, runpy, sys
k, limit = int(sys.argv[1]), int(sys.argv[2])
sys.argv, count, hard = sys.argv[3:], 0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]
def hook(event, args):
    global count
    if event == "open" and isinstance(args[0], str) \
            and re.match(r"[.]ckpt.*[.]tmp-", os.path.basename(args[0])) \
            and ("w" in (args[1] or "") or (args[2] or 0) & os.O_CREAT):
        count += 1
        if count in (k, k + 1):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit if count == k else hard, hard))
        if count == k:
            print(f"fault_sweep: the file size limit is {limit} bytes for {args[0]}",
                  file=sys.stderr, flush=True)
sys.addaudithook(hook)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fsize_points(clean):
    """One point per checkpoint file the clean run wrote (openat of a temporary with O_CREAT), in
    order: its limit is half the size of the clean run's checkpoint files."""
    opens = sorted((c for c in clean.calls[0] if c.name == "openat" and "O_CREAT" in c.text
                    and c.paths and under(c.paths[0], clean.out)
                    and TEMPORARY.match(os.path.basename(c.paths[0]))
                    and NAMES.fullmatch(os.path.basename(c.paths[0])[1:].split(".tmp-")[0])),
                   key=lambda c: c.ts)
    return [Point(clean.scenario.name, 0, "save", "fsize", k, [c]) for k, c in enumerate(opens, 1)]


def fsize_limit(clean):
    return min(os.path.getsize(os.path.join(clean.out, n))
               for n in checkpoint_names(clean.out)) // 2


FAMILIES = {"rename": ("rename", "renameat", "renameat2"),
            "unlink": ("unlink", "unlinkat", "rmdir"),
            "mkdir": ("mkdir", "mkdirat"), "fsync": ("fsync", "fdatasync"),
            "write": ("write", "pwrite64"), "link": ("link", "linkat")}


def pick(clean, family, kind, target, rank=0, which=0):
    """The point whose syscall is of `family` (rename: rename, renameat, renameat2; unlink: unlink,
    unlinkat, rmdir; ...), of `kind`, on `rank`, and whose first target's description (describe())
    matches the regex `target`; `which`: the index among the matches (0 the first, -1 the last).
    Raises LookupError naming the calls of that family that there are."""
    names = FAMILIES.get(family, (family,))
    ps = [p for p in clean.points if p.syscall in names and p.kind == kind and p.rank == rank]
    matches = [p for p in ps if any(re.search(target, describe(c, clean.out)) for c in p.targets)]
    if not matches:
        seen = sorted({describe(c, clean.out) for p in ps for c in p.targets})
        raise LookupError(f"no {family} call on rank {rank} matches {target!r} in the clean "
                          f"{clean.scenario.name} run; its {family} calls: {seen}")
    return matches[which]


# ---------------------------------------------------------------------------------------------
# running

def descendants(pid):
    kids = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    kids[int(f.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        found += kids[todo[0]]
        todo += kids[todo.pop(0)]
    return found


def run(cmd, timeout, pids=None):
    """(exit code, stdout and stderr) of a command from the project root; None for the code when it
    ran past `timeout` (then it and every process under it are killed: torchrun's workers lead
    sessions of their own). pids: a list its pid is appended to."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    if pids is not None:
        pids.append(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        return None, out + f"\n(killed after {timeout}s)"


def rank_logs(logs):
    """{rank: its stdout + stderr} from torchrun's --log-dir (--redirects=3)."""
    found = defaultdict(str)
    for folder, _, files in os.walk(logs):
        rank = os.path.basename(folder)
        for name in ("stdout.log", "stderr.log"):
            if rank.isdigit() and name in files:
                with open(os.path.join(folder, name), errors="replace") as f:
                    found[int(rank)] += f.read()
    return dict(found)


def fresh_out(clean, folder):
    out = os.path.join(folder, "out")
    if clean.template:
        shutil.copytree(clean.template, out, symlinks=True)
    return out


def clean_run(scenario, work, timeout=600):
    """The scenario's clean run under strace (every syscall that points are made of), in
    work/<scenario>/clean; a scenario with a setup run makes it first, into
    work/<scenario>/template."""
    folder = os.path.join(work, scenario.name)
    os.makedirs(folder, exist_ok=True)
    template = ""
    if scenario.setup:
        template = os.path.join(folder, "template")
        code, output = run(Scenario("setup", scenario.setup, 0,
                                    scenario.torchrun).command(template), timeout)
        if code != 0:
            raise RuntimeError(f"the {scenario.name} setup run failed (exit "
                               f"{code}):\n{output[-3000:]}")
    if scenario.remote == "s3":
        start_s3(work)
    clean = Clean(scenario, "", template, {})
    clean.out = fresh_out(clean, os.path.join(folder, "clean"))
    trace = os.path.join(folder, "clean", "trace")
    os.makedirs(os.path.dirname(trace), exist_ok=True)
    cmd = scenario.command(clean.out, strace_args([*FAULTED, *WRITES,
                                                   *(SENDS if scenario.remote == "s3" else [])]),
                           trace=trace, logs=os.path.join(folder, "clean", "logs"))
    code, output = run(cmd, timeout)
    if code != 0:
        raise RuntimeError(f"the clean {scenario.name} run failed (exit {code}): "
                           f"{shlex.join(cmd)}\n{output[-3000:]}")
    if scenario.torchrun:
        clean.calls = {r: read_trace(f"{trace}.{r}") for r in (0, 1)}
    else:
        clean.calls = {0: find_http(read_trace(trace))}
    return clean


def clean_runs(names, work, jobs=2, timeout=600, writes=12):
    """{name: Clean} of the scenarios named, `jobs` at a time, their points made (make_points)."""
    with ThreadPoolExecutor(max(1, min(jobs, 2))) as pool:
        cleans = dict(zip(names, pool.map(lambda n: clean_run(SCENARIOS[n], work, timeout), names)))
    for clean in cleans.values():
        make_points(clean, writes)
    return cleans


_state_cache, _state_lock = {}, threading.Lock()


def load(path):
    """The checkpoint at path, as train.py's readers load it (the one place to adapt)."""
    from keep import store
    return store.load(path)


def reference_state(clean):
    path = os.path.join(clean.out, clean.scenario.final_name())
    with _state_lock:
        if path not in _state_cache:
            _state_cache[path] = load(path)
        return _state_cache[path]


def state_difference(a, b):
    """None if two checkpoints hold the same model, optimizer and torch RNG bit for bit, else what
    differs (tests/test_resume.py's assert_same_state)."""
    import torch
    if a["iter_num"] != b["iter_num"]:
        return f"iter_num {a['iter_num']} != {b['iter_num']}"
    if a["model"].keys() != b["model"].keys():
        return "model keys differ"
    for k in a["model"]:
        if not torch.equal(a["model"][k], b["model"][k]):
            return f"model[{k!r}] differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    if list(sa) != list(sb):
        return "optimizer state keys differ"
    for i in sa:
        if sa[i].keys() != sb[i].keys() or not all(torch.equal(sa[i][n], sb[i][n]) for n in sa[i]):
            return f"optimizer state {i!r} differs"
    if not all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"])):
        return "torch RNG state differs"
    return None


@dataclass
class Result:
    point: Point
    reasons: list  # empty: survived
    hit: list  # what the fault hit in the faulted run (describe())
    command: str
    folder: str
    output: str = ""
    seconds: float = 0.0

    @property
    def ok(self):
        return not self.reasons

    def __repr__(self):
        return f"<{self.point.id}: {'survived' if self.ok else 'failed'}>"


def checkpoint_names(out):
    return sorted(n for n in os.listdir(out) if NAMES.fullmatch(n)) if os.path.isdir(out) else []


def _iteration(name):
    m = re.match(r"ckpt-(\d{8})", name)
    return int(m[1]) if m else None


PEER_DIED = re.compile(r"Connection (closed|reset) by peer")


def try_point(clean, point, work, timeout=600, keep=False, rerun=True):
    """Run one point and check what it left; returns a Result (its work folder removed if it
    survived). rerun=False: when the faulted run itself ended well (exit 0), its final checkpoint is
    compared without running the command again (faster; the temporaries check is then skipped)."""
    scenario, t0 = clean.scenario, time.time()
    folder = tempfile.mkdtemp(prefix=point.id.replace("/", "-") + "-",
                              dir=os.path.join(work, scenario.name))
    out, trace, logs = (fresh_out(clean, folder), os.path.join(folder, "trace"),
                        os.path.join(folder, "logs"))
    if scenario.fsize:
        cmd = [sys.executable, "-c", FSIZE_HOOK, str(point.n), str(fsize_limit(clean)),
               *scenario.command(out)[1:]]
    else:
        cmd = scenario.command(out, strace_args([point.syscall], point.inject()), rank=point.rank,
                               trace=trace, logs=logs)
    code, output = run(cmd, timeout)
    # what the fault hit: the n-th call of the syscall in some thread (INJECTED for an error; for a
    # kill, the call that never returned)
    trace += f".{point.rank}" if scenario.torchrun else ""
    hit = [describe(c, out) for c in (find_http(read_trace(trace)) if os.path.exists(trace) else [])
           if c.n == point.n and (c.injected or point.kind == "kill" and c.ret in ("?", None))]
    hit += [ln for ln in output.splitlines() if ln.startswith("fault_sweep:")]
    texts = rank_logs(logs) if scenario.torchrun else {0: output}
    reasons = [*_how_it_ended(point, scenario, code, output, texts, bool(hit), timeout),
               *_unloadable(out), *_lost(clean, point, out)]
    # the one save cut short: one line says so (a warning, or the final save's error)
    if scenario.fsize and hit:
        said = [ln for ln in output.splitlines() if ln.startswith(("warning:", "error:"))]
        reasons += ([] if len(said) == 1
                    else [f"{len(said)} warning and error lines for one failed save: {said}"])
    if scenario.remote:
        reasons += _remote_problems(scenario, out)
    code2, output2, pids = 0, "(not run: the faulted run ended well)", []
    if rerun or code != 0:  # the same command without faults
        code2, output2 = run(scenario.command(out), timeout, pids)
        reasons += _rerun_problems(code2, output2, out)
    if code2 == 0:
        reasons += _final_difference(clean, out)
        if scenario.remote:
            reasons += _remote_problems(scenario, out, final=scenario.final_name(),
                                        rerun=pids[0] if pids else None)
    result = Result(point, reasons, hit, shlex.join(cmd), folder,
                    output + "".join(f"\n--- rank {r} ---\n{t}" for r, t in sorted(texts.items())
                                     if scenario.torchrun)
                    + "\n--- the same command without faults ---\n" + output2, time.time() - t0)
    if result.ok and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


RANK_ERROR = re.compile(r"^rank \d+: error: ")


def _how_it_ended(point, scenario, code, output, texts, hit, timeout):
    """No traceback; exit 0, or 1 with one error line (rank 0's, or under torchrun the line of the
    one rank that met it, 'rank N: error: ...'); killed when the kill was reached."""
    reasons = [f"hung: still running after {timeout}s"] if code is None else []
    # a rank whose peer was killed may die in a collective with torch's traceback: not counted
    mine = "".join(t for r, t in texts.items()
                   if not (point.kind == "kill" and r != point.rank and PEER_DIED.search(t)))
    if "Traceback" in mine or ("Traceback" in output and "ChildFailedError" not in output):
        reasons.append("a traceback: " + _around(mine if "Traceback" in mine else output,
                                                 "Traceback"))
    lines = [ln for t in texts.values() for ln in t.splitlines()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    # an error that one rank alone met (its own EIO) is its line, 'rank N: error: ...'
    if not errors:
        errors = [ln for ln in lines if RANK_ERROR.match(ln)][:1]
    if code is not None and point.kind == "kill" and hit:
        if code not in ((1,) if scenario.torchrun else (-9, 137)):
            reasons.append(f"exit {code} after a kill")
    elif (code is not None
            and (code not in (0, 1) or (code == 1 and len(errors) != 1) or (code == 0 and errors))):
        reasons.append(f"exit {code} with {len(errors)} error lines"
                       + (f": {errors}" if errors else ""))
    return reasons


def _unloadable(out):
    """Every file or folder under a checkpoint's name loads."""
    reasons = []
    for name in checkpoint_names(out):
        try:
            load(os.path.join(out, name))
        except Exception as e:
            reasons.append(f"{name} is under a checkpoint's name but does not load: {_one_line(e)}")
    return reasons


def _lost(clean, point, out):
    """What the clean run had announced before the faulted call is still there."""
    if not point.targets:
        return []
    at = min(c.ts for c in point.targets)
    every = [c for calls in clean.calls.values() for c in calls]
    gone = {p for t, p in deleted(every) if t < at}
    said = [os.path.basename(p) for t, p in announced(every) if t < at and p not in gone]
    names, reasons = checkpoint_names(out), []
    periodic = [n for n in said if _iteration(n) is not None]
    if periodic:
        newest = max(periodic, key=_iteration)
        newer = [n for n in names if (_iteration(n) or -1) > _iteration(newest)]
        if newest not in names and len(newer) < KEEP_LAST:
            reasons.append(f"{newest}, saved before the fault, is gone")
    if "ckpt.pt" in said and "ckpt.pt" not in names:
        reasons.append("ckpt.pt, saved before the fault, is gone")
    return reasons


# checkpoint.py verify URL's listing (remote.describe: each complete checkpoint's objects read back,
# their CRCs checked), then {prefix without a commit object: the pids its intents name} as JSON
VERIFY = """
import json, sys
from keep import remote
url = sys.argv[1]
try:
    lines, ok = remote.describe(url, verify=True)
except remote.RemoteError as e:
    lines = [f"error: {e}"]
print("\\n".join(lines))
listing = remote.Remote(url).checkpoints()
print(json.dumps({p: [i.get("pid") for i in listing.intents.get(p, [])]
                  for p in listing.leftovers}))
"""


def _remote_problems(scenario, out, final=None, rerun=None):
    """remote_dir after a run: every checkpoint its listing calls complete verifies (checkpoint.py
    verify's check), none is incomplete. final: the newest complete one must be this checkpoint;
    rerun: the pid of the run without faults, whose own uploads must leave no leftover (an earlier
    start's may remain: only a start that uploads cleans them)."""
    url = remote_url(scenario, out)
    code, output = run([sys.executable, "-c", VERIFY, url], 300)
    lines = output.strip().splitlines()
    reasons = [f"verify {url}: {ln.strip()}" for ln in lines if "BAD:" in ln or "INCOMPLETE:" in ln]
    if code != 0 or "Traceback" in output or (final and lines[0].startswith("error:")):
        return reasons + [f"verify {url} failed (exit {code}): {_tail(output)}"]
    if final is None:
        return reasons
    listed = [ln.split()[0] for ln in lines[1:-1] if "complete" in ln and "INCOMPLETE" not in ln]
    if not listed or listed[0] != final:
        reasons.append("remote_dir's newest complete checkpoint is "
                       f"{listed[0] if listed else 'none'}, not {final}")
    import json
    mine = [p for p, pids in json.loads(lines[-1]).items() if rerun in pids]
    return reasons + (["the run without faults left uploads without a commit object in remote_dir: "
                       f"{mine}"] if mine else [])


def _rerun_problems(code, output, out):
    if code != 0:
        return [f"the same command without faults exited {code}: " + _tail(output)]
    reasons = (["a traceback in the run without faults: " + _around(output, "Traceback")]
               if "Traceback" in output else [])
    left = [n for n in os.listdir(out) if TEMPORARY.match(n)]
    return reasons + ([f"temporaries left after the run without faults: {left}"] if left else [])


def _final_difference(clean, out):
    """The final periodic checkpoint is bitwise the clean run's. When only its own save failed,
    ckpt.pt of the final eval holds the same state, and a rerun rightly finds the run complete."""
    name = clean.scenario.final_name()
    final = name if os.path.lexists(os.path.join(out, name)) else "ckpt.pt"
    try:
        diff = state_difference(load(os.path.join(out, final)), reference_state(clean))
        return [f"{final} is not the clean run's {name}: {diff}"] if diff else []
    except Exception as e:
        return [f"no {name} at the end, and {final} does not load: {_one_line(e)}"]


def _one_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _around(text, word, width=600):
    i = text.find(word)
    return text[i:i + width].replace("\n", " | ")


def _tail(text, lines=6):
    return " | ".join(text.strip().splitlines()[-lines:])


def sweep(items, work, jobs=2, timeout=600, keep=False, rerun=True, progress=None):
    """Try each (Clean, Point) of items, `jobs` at a time (at most 2); returns their Results in
    order."""
    with ThreadPoolExecutor(max(1, min(jobs, 2))) as pool:
        futures = [pool.submit(try_point, clean, p, work, timeout, keep, rerun)
                   for clean, p in items]
        results = []
        for i, f in enumerate(futures):
            results.append(f.result())
            if progress:
                progress(i + 1, len(items), results[-1])
    return results


def summary(results, clean_runs):
    lines = []
    for name, clean in clean_runs.items():
        mine = [r for r in results if r.point.scenario == name]
        if not mine:
            continue
        lines.append(f"{name}: {sum(r.ok for r in mine)} of {len(mine)} points survived")
        table = defaultdict(lambda: [0, 0])
        for r in mine:
            row = table[r.point.syscall, r.point.kind]
            row[0] += 1
            row[1] += r.ok
        for (syscall, kind), (tried, survived) in sorted(table.items()):
            lines.append(f"  {syscall:>10} {kind:<6} {survived:>4} / {tried:<4}")
    failed = [r for r in results if not r.ok]
    if failed:
        lines.append(f"\n{len(failed)} failed:")
        for r in failed:
            lines += [f"- {r.point.id}: {' '.join(r.point.inject().split(':')[1:])} at "
                      f"""{'; '.join(sorted({describe(c, clean_runs[r.point.scenario].out)
                                             for c in r.point.targets}))}"""
                      + (f" (hit: {'; '.join(r.hit)})" if r.hit else " (not reached)"),
                      *[f"    {x}" for x in r.reasons],
                      f"    again: python bench/fault_sweep.py --point={r.point.id}",
                      f"    command: {r.command}", f"    folder: {r.folder}"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--syscalls", default="", help="only these syscalls (comma-separated)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--sample", type=int, default=None, help="at most this many points a scenario")
    ap.add_argument("--writes", type=int, default=12,
                    help="write calls tried, per rank and syscall")
    ap.add_argument("--point", action="append", default=[],
                    help="only this point (an id as listed); repeatable")
    ap.add_argument("--jobs", type=int, default=2, help="points at a time (at most 2)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds a run may take")
    ap.add_argument("--work", default="",
                    help="folder for the runs (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true",
                    help="keep every point's folder (failures' are always kept)")
    ap.add_argument("--list", action="store_true", help="list the points and stop")
    a = ap.parse_args()
    if shutil.which("strace") is None:
        sys.exit("error: strace is not installed (apt-get install strace)")
    unknown = set(a.scenarios.split(",")) - SCENARIOS.keys() or set(a.kinds.split(",")) - set(KINDS)
    if unknown:
        sys.exit(f"error: unknown scenario or kind {sorted(unknown)}")
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare_char", "train.bin")):
        sys.exit("error: no data/shakespeare_char/train.bin; run python "
                 "data/shakespeare_char/prepare.py first")
    work = a.work or tempfile.mkdtemp(prefix="fault-sweep-")
    os.makedirs(work, exist_ok=True)
    import torch
    torch.set_num_threads(1)
    print(f"work folder {work}", flush=True)
    t0, items = time.time(), []
    names = sorted({p.split("/")[0] for p in a.point}) if a.point else a.scenarios.split(",")
    cleans = clean_runs(names, work, a.jobs, a.timeout, a.writes)
    for name, clean in cleans.items():
        points = [p for p in clean.points if p.kind in a.kinds.split(",")
                  and (not a.syscalls or p.syscall in a.syscalls.split(","))
                  and (not a.point or p.id in a.point)]
        points = sample(points, a.sample)
        print(f"{name}: {len(points)} points", flush=True)
        if a.list:
            for p in points:
                print(f"  {p.id:<28} "
                      f"{'; '.join(sorted({describe(c, clean.out) for c in p.targets}))}")
        items += [(clean, p) for p in points]
    if a.point and len(items) < len(set(a.point)):
        sys.exit(f"error: no such point: {sorted(set(a.point) - {p.id for _, p in items})} (--list "
                 "shows them)")

    def progress(i, n, r):
        print(f"[{i}/{n}] {r.point.id}: {'ok' if r.ok else 'FAILED: ' + '; '.join(r.reasons)}"
              + ("" if r.hit else " (not reached)") + f" ({r.seconds:.0f}s)", flush=True)
        if a.point:
            print(r.output)
    results = [] if a.list else sweep(items, work, a.jobs, a.timeout, a.keep, progress=progress)
    if results:
        print(f"\n{summary(results, cleans)}\n\n{len(results)} points in {time.time() - t0:.0f}s; "
              f"work folder {work}")
    if not a.keep and all(r.ok for r in results):
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
