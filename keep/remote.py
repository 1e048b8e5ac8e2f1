"""
The remote copy (docs/remote.md). out_dir is the fast local tier, with every guarantee; remote_dir,
an fsspec URL (s3://bucket/run, gs://..., az://..., file:///mnt/disk/run or an absolute path on
another disk), is the durable one. Every checkpoint that is durable in out_dir is copied there in
the background (uploader.py), with metrics.jsonl; a start whose out_dir lacks remote_dir's newest
complete checkpoint downloads it first (Remote.restore), so the same command on a new machine
continues the run. Object stores have no rename: a checkpoint is complete there only once its
commit object, written after its data and naming every object's size and CRC-32, says so.

Remote is built in layers, one job each: objects.Store (bytes and keys), claims.Claims (what is
this run's), lease.Leased (one live writer), and here the checkpoints themselves.
"""
import hashlib
import json
import os
import re
import time

import distributed
from console import first_line, say
from keep.atomic import atomic_write, fsync_dir, remove_whole, replace_folder, temp_name
from keep.claims import COMMIT, INTENT, METRICS, FORMAT, new_prefix
from keep.files import BEST, KEPT_BEST, NAMES, new_run_id
from keep.lease import Leased
from keep.objects import RemoteError, damage
from keep.store import rank, scan


class Refused(RemoteError):
    """An upload that would write over what this run cannot prove its own: never tried again."""


# seconds rank 0 waits for the other ranks' shards of a folder before it tries again
OTHERS_WAIT = 600.0


def open_files(path, mine=lambda name: True):
    """[(name relative to path's folder, descriptor)] for a checkpoint file or each file of a folder
    that `mine` takes, opened now: the Uploader reads these, so local retention may delete the
    checkpoint meanwhile."""
    name = os.path.basename(path)
    if not os.path.isdir(path):
        return [(name, os.open(path, os.O_RDONLY))]
    return [(f"{name}/{f}", os.open(os.path.join(path, f), os.O_RDONLY))
            for f in sorted(os.listdir(path))
            if mine(f) and os.path.isfile(os.path.join(path, f))]


def close_files(files):
    """Close them, once: the list is emptied (a second call, after a failure, closes nothing)."""
    while files:
        os.close(files.pop()[1])


class Remote(Leased):

    def upload(self, files, header, attempt, prefix=None, others=None, abandon=lambda: False):
        """Copy one checkpoint ([(relative name, open descriptor)], see open_files) under a new data
        prefix (or `prefix`), check each object's size there, then write its commit object (header:
        iter_num, run_id, branch, kind, val_loss). others: {relative name: [size, crc]} of objects
        other ranks upload under the same prefix (a folder's shards): the commit waits until they
        are all there, unless abandon() says a newer checkpoint is waiting. A commit it replaces is
        this run's and branch's (its data is then deleted), or another branch's ckpt.pt (kept under
        KEPT_BEST's name); anything else is refused. Returns the commit. Raises what the backend
        raises; nothing is visible until the commit is written."""
        name = files[0][0].split("/")[0]
        old = self._replaced(name, header)  # before any data goes up: a refusal costs no upload
        prefix = prefix or new_prefix(header["iter_num"])
        self.intent(prefix, header["run_id"], attempt)
        objects = self.put_objects(files, prefix)
        deadline = time.time() + OTHERS_WAIT
        for rel, (size, crc) in (others or {}).items():
            while True:
                try:
                    if self.fs.info(self.key(prefix, rel), refresh=True)["size"] == size:
                        break
                except FileNotFoundError:
                    pass
                if abandon() or time.time() > deadline:
                    raise OSError(f"{rel}, another rank's part, did not arrive")
                time.sleep(0.5)
            objects[rel] = [size, crc]
        if old is not None and old["branch"] != header["branch"] and name == BEST:
            kept = KEPT_BEST.format(old["branch"], old["iter_num"])
            self._replaced(kept, header)  # absent, or this run's own
            self._put_small(kept + COMMIT, json.dumps(dict(old, name=kept, kind="kept")).encode())
            old = None  # its data is named by the kept commit now
        commit = dict(format=FORMAT, name=name, data=prefix, objects=objects,
                      written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      **{k: header.get(k)
                         for k in ("iter_num", "run_id", "branch", "kind", "val_loss")})
        # once replaced, only an intent proves its data ours
        if old is not None and old["data"] != prefix:
            self.intent(old["data"], header["run_id"], attempt)
        self._put_small(name + COMMIT, json.dumps(commit).encode())
        # the commit proves the data ours from now on (names known: no listing needed); what is left
        # after a failure here is a leftover the run's next start cleans: a warning, not a failed
        # copy
        ranks = {0} | {int(m.group(1))
                       for rel in (others or {}) if (m := re.search(r"/__(\d+)_", rel))}
        try:
            for r in ranks:
                try:
                    self.fs.rm_file(self.key(f"{prefix}.{r}{INTENT}"))
                except FileNotFoundError:
                    pass
            if old is not None and old["data"] != prefix:
                self.drop(old["data"])
        except Exception as e:
            say(f"warning: {name} is in remote_dir, but cleaning up after it failed "
                f"({self.why(e)}); the run's next start finishes it", err=True)
        return commit

    def _replaced(self, name, header):
        """The commit that writing `name` would replace: None, or one of this run's (its run id).
        Anything else (another run's, one without a run id, another format's) raises Refused: it is
        never written over."""
        try:
            old = self.read_commit(name)
        except FileNotFoundError:
            return None
        except ValueError:
            raise Refused(f"remote_dir's {name}{COMMIT} is not a commit of this run's format; it "
                          f"is left as it is and {name} is not copied") from None
        if header["run_id"] is None or old["run_id"] != header["run_id"]:
            raise Refused(f"remote_dir's {name} belongs to run {old['run_id']}, not this run "
                          f"({header['run_id']}); it is not written over")
        return old

    def copy_metrics(self, out_dir):
        """metrics.jsonl up to its last whole line (a row may be half-written while it is read)."""
        try:
            with open(os.path.join(out_dir, METRICS), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        self._put_small(METRICS, data[:data.rfind(b"\n") + 1])

    # -- reading -----------------------------------------------------------------------------------
    def download(self, commit, dest_dir):
        """The checkpoint of `commit` into dest_dir under its name, each object's size and CRC
        checked first: whole, or not there at all. Returns its path. Raises RemoteError."""
        name = commit["name"]
        final = os.path.join(dest_dir, name)
        # a temporary: never read, removed at the next start (atomic.recover)
        tmp = temp_name(final)
        folder = any("/" in rel for rel in commit["objects"])
        try:
            for rel, (size, crc) in commit["objects"].items():
                local = os.path.join(tmp, rel.split("/", 1)[1]) if folder else tmp
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    got = self._get(self.key(commit["data"], rel), fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if got != (size, crc):
                    raise RemoteError(damage(rel, got, size, crc))
            if folder:
                fsync_dir(tmp)
                replace_folder(tmp, final)
            else:
                os.replace(tmp, final)
                fsync_dir(dest_dir)
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"could not download {name} from remote_dir: {self.why(e)}") from None
        finally:
            try:
                if os.path.lexists(tmp):
                    remove_whole(tmp)
            except OSError:
                pass  # a temp name: never read, and removed at the next start (atomic.recover)
        return final

    def restore(self, out_dir, log=say):
        """At start, out_dir held (lock.claim): remote_dir judged first (RemoteError when it
        holds another run than out_dir, several runs, or only things that are no run's); then, when
        its newest complete checkpoint is newer than anything readable in out_dir, or out_dir has
        none, download it (metrics.jsonl too, when out_dir has none), so the resume that follows
        continues from it. A damaged one is skipped with one line, and the previous complete one
        tried. Returns the path downloaded, or None."""
        listing = self.checkpoints()
        heads, _ = scan(out_dir)
        local = heads[0] if heads else None
        problem = self.owner_problem(listing, local["run_id"] if local else None)
        if problem:
            raise RemoteError(problem)
        if self.hold is not None:  # before anything is downloaded: a second live run stops here
            self.take_lease(local["run_id"] if local else next(iter(listing.runs), None),
                            *self.hold, log=log)
        for name, why in listing.bad:
            say(f"warning: remote_dir's {name} is not complete ({why}); not used", err=True)
        good = listing.good
        for i, c in enumerate(good):
            if local is not None and rank(c) <= rank(local):
                return None
            t0 = time.time()
            try:
                path = self.download(c, out_dir)
            except RemoteError as e:
                nxt = (f"trying {good[i + 1]['name']}" if i + 1 < len(good)
                       else "no older complete one left")
                say(f"warning: skipping remote_dir's {c['name']}: {e}; {nxt}", err=True)
                continue
            mb = sum(size for size, _ in c["objects"].values()) / 2**20
            log(f"downloaded {c['name']} (iteration {c['iter_num']}, {mb:.1f} MB in "
                f"{time.time() - t0:.1f}s) from "
                f"{self.url}: " + ("out_dir had no checkpoint" if local is None else
                                   f"newer than out_dir's {os.path.basename(local['path'])}"))
            if not os.path.exists(os.path.join(out_dir, METRICS)):
                try:  # whole or absent, as every file in out_dir
                    data = self.fs.cat_file(self.key(METRICS))
                    atomic_write(os.path.join(out_dir, METRICS), lambda f: f.write(data))
                except FileNotFoundError:
                    pass
                except Exception as e:  # the checkpoint is what matters; the curve starts afresh
                    say(f"warning: could not download remote_dir's {METRICS} ({self.why(e)})",
                        err=True)
            return path
        return None

    def fetch(self, which="best", log=say):
        """A local folder holding one checkpoint of remote_dir, for sample.py and export.py: ckpt.pt
        (which='best', or the newest complete one when there is none), the newest complete one
        ('latest'), or the one of that name. Kept in a cache folder (XDG_CACHE_HOME or ~/.cache) and
        downloaded only when remote_dir's commit differs from the cached one. Raises RemoteError."""
        self.probe_read()
        listing = self.checkpoints()
        good, bad = listing.good, listing.bad
        if not good:
            why = f" ({bad[0][0]}: {bad[0][1]})" if bad else ""
            raise RemoteError(f"no complete checkpoint in remote_dir {self.url}{why}")
        if which in ("best", "latest"):
            best = [c for c in good if c["name"] == BEST]
            pick = best[0] if which == "best" and best else good[0]
        else:
            pick = next((c for c in good if c["name"] == which), None)
            if pick is None:
                raise RemoteError(f"remote_dir {self.url} has no complete checkpoint named "
                                  f"{which!r}")
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "nanogpt-remote",
                             hashlib.blake2b(self.url.encode(), digest_size=8).hexdigest())
        try:
            os.makedirs(cache, exist_ok=True)
            marker = os.path.join(cache, pick["name"] + COMMIT)
            try:
                with open(marker) as f:
                    marked = json.load(f)
                fresh = isinstance(marked, dict) and marked.get("data") == pick["data"] and \
                    os.path.exists(os.path.join(cache, pick["name"]))
            except (OSError, ValueError):
                fresh = False
            for other in os.listdir(cache):  # one checkpoint in the folder: the one asked for
                if other != pick["name"] and NAMES.match(other):
                    remove_whole(os.path.join(cache, other))
            if not fresh:
                log(f"downloading {pick['name']} (iteration {pick['iter_num']}) from {self.url} "
                    f"into {cache}")
                self.download(pick, cache)
                atomic_write(marker, lambda f: f.write(json.dumps(pick).encode()))
        except OSError as e:
            raise RemoteError(f"cannot use the cache folder {cache} ({first_line(e)}): set "
                              "XDG_CACHE_HOME to a writable folder") from None
        return cache


def connect(url, out_dir, attempt, bound):
    """A checked Remote for train.py (probe), or RemoteError: a backend that is not installed, a
    wrong bucket, credentials, permission or endpoint, or remote_dir being out_dir itself. attempt,
    bound: this start's token and remote_lease, for the lease that restore() takes."""
    remote = Remote(url)
    remote.hold = (attempt, bound)
    if remote.local and os.path.realpath(remote.root) == os.path.realpath(out_dir):
        raise RemoteError(f"remote_dir {url!r} is out_dir itself: the durable copy must be "
                          "elsewhere")
    remote.probe()
    # (out_dir's run is judged once it is held)
    problem = remote.owner_problem(remote.checkpoints(), None)
    if problem:
        raise RemoteError(problem)
    return remote


def join(url, out_dir, bound, master):
    """Every rank of a start that writes: (rank 0's connected Remote, None on the others; this
    start's token, the same on every rank), or (None, None) without remote_dir."""
    if not url:
        return None, None
    attempt = distributed.from_rank0(new_run_id() if master else None)
    return distributed.on_rank0(lambda: connect(url, out_dir, attempt, bound), master), attempt


def describe(url, verify=False):
    """checkpoint.py's listing of a remote_dir: one line per checkpoint, complete or not and why,
    the leftovers of killed uploads and what is not a run's. verify: every object of the complete
    ones read back and its CRC checked. Returns (lines, whether every checkpoint is complete and
    sound)."""
    remote = Remote(url)
    remote.probe_read()
    listing = remote.checkpoints()
    if not listing.good and not listing.bad and not listing.leftovers and not listing.foreign:
        raise RemoteError(f"no checkpoint in remote_dir {url!r}")
    ok = not listing.bad
    lines = [f"{'checkpoint (newest first)':<26} {'branch':>6} {'iter':>8} {'val loss':>9} "
             f"{'size':>12}  {'written':<24}  status"]
    for c in listing.good:
        val = f"{c['val_loss']:.4f}" if isinstance(c.get("val_loss"), float) else "-"
        mb = sum(size for size, _ in c["objects"].values()) / 2**20
        status = "complete"
        if verify:
            try:
                problem = remote.verify(c)
            except Exception as e:
                problem = f"cannot be read ({remote.why(e)})"
            status = f"BAD: {problem}" if problem else "complete, every CRC checked"
            ok = ok and problem is None
        lines.append(f"{c['name']:<26} {c['branch']:>6} {c['iter_num']:>8} {val:>9} {mb:9.1f} MB  "
                     f"{str(c.get('written', '?')):<24}  {status}")
    for name, why in listing.bad:
        lines.append(f"{name:<26} {'-':>6} {'-':>8} {'-':>9} {'-':>12}  {'-':<24}  INCOMPLETE: "
                     f"{why}")
    for prefix, size in sorted(listing.leftovers.items()):
        lines.append(f"{prefix:<26} {'-':>6} {'-':>8} {'-':>9} {size / 2**20:9.1f} MB  {'-':<24}  "
                     "no commit object: an upload in progress or killed (removed by the run's next "
                     "start)")
    for key in sorted(listing.foreign)[:20]:
        lines.append(f"{key:<26} {'-':>6} {'-':>8} {'-':>9} {'-':>12}  {'-':<24}  not ours: never "
                     "touched")
    if len(listing.foreign) > 20:
        lines.append(f"... and {len(listing.foreign) - 20} more objects that are not ours")
    return lines, ok
