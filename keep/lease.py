"""
The lease (remote_dir's lease.json) keeps a second live writer out of a remote_dir: rank 0 takes it
before anything is downloaded or written, and rewrites it every quarter of remote_lease while the
run lives. A fresh lease of another process is refused with one line; one of a process of this host
that has ended is taken over at once, one of another host after remote_lease seconds without a
refresh (a lost machine). Its age is read on the store's clock, never on the machines'.
"""
import json
import os
import threading
import time

from console import say
from keep.claims import FORMAT, HOST, LEASE, Claims, lease_problem
from keep.objects import RemoteError


LOST = threading.Lock()


def lease_record(run_id, attempt, bound):
    """The lease's bytes: who holds remote_dir, and after how long without a refresh it lapses."""
    return json.dumps(dict(format=FORMAT, run_id=run_id, attempt=attempt, host=HOST,
                           pid=os.getpid(), bound=bound,
                           written=time.strftime("%Y-%m-%dT%H:%M:%S%z"))).encode()


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # another user's process, or no pid: taken as alive
    return True


class Leased(Claims):
    """The store, what in it is this run's, and its lease."""

    hold = None  # (attempt, bound): restore() takes the lease with these (connect)
    held = None  # (run_id, attempt, bound) once this process holds the lease
    lost = None  # who took the lease from this process: it copies nothing more

    def take_lease(self, run_id, attempt, bound, log=say):
        """Hold remote_dir for this process: refuse it (RemoteError) when it holds another run, or
        while another live process holds it. A lease of this host's process that has ended is taken
        over at once; another host's after its bound without a refresh (a lost machine), waiting for
        that when it is this very run (a re-queued job on a new machine). Once held, a thread
        rewrites it every bound/4 seconds (again with this run id, when a new run learns its
        own)."""
        mine = lease_record(run_id, attempt, bound)
        try:
            waited = False
            while True:
                listing = self.checkpoints()
                problem = self.owner_problem(listing, run_id)
                if problem:
                    raise RemoteError(problem)
                if LEASE in listing.foreign:  # never written over: it may be someone else's file
                    raise RemoteError(f"remote_dir {self.url} holds a {LEASE} that is not a lease "
                                      "of this format; remove it if nothing uses it, or give this "
                                      "run its own remote_dir")
                lease = listing.lease  # (judged: claims.lease_problem)
                if lease is None or lease["attempt"] == attempt:
                    break
                age = self.now() - lease["mtime"]
                lapse = lease["bound"]  # the holder's
                who = (f"run {lease.get('run_id')} (host {lease.get('host')}, pid "
                       f"{lease.get('pid')}, refreshed {age:.0f}s ago)")
                if age > lapse:
                    log(f"note: taking over remote_dir's lease of {who}: not refreshed for longer "
                        f"than its remote_lease={lapse:g}s, so its machine is taken for lost")
                    break
                if lease.get("host") == HOST and not alive(lease.get("pid")):
                    break  # a process of this host that has ended (killed): nothing else writes
                if lease.get("run_id") != run_id or waited:
                    raise RemoteError(f"remote_dir {self.url} is in use by {who}: one live run "
                                      "writes to a remote_dir; stop that one, or give this run its "
                                      "own remote_dir"
                                      + (" (a lost machine's lease lapses remote_lease seconds "
                                         "after its last refresh)" if lease.get("run_id") == run_id
                                         else ""))
                log(f"note: remote_dir is held by this run's process on host {lease.get('host')} "
                    f"(pid {lease.get('pid')}, refreshed {age:.0f}s ago); waiting up to "
                    f"{lapse - age + 1:.0f}s for it to lapse, as a lost machine's does")
                seen = lease["mtime"]
                deadline = time.time() + lapse - age + 1
                while time.time() < deadline:
                    time.sleep(min(2.0, lapse / 8))
                    now = self.checkpoints().lease
                    if now is None or now["mtime"] != seen:
                        break
                waited = True
            self._put_small(LEASE, mine)
            first, self.held = self.held is None, (run_id, attempt, bound)
            if first:
                threading.Thread(target=self._keep_lease, name="remote-lease", daemon=True).start()
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"cannot take remote_dir's lease ({self.url}): "
                              f"{self.why(e)}") from None

    def check_lease(self):
        """Who took the lease from this process (one line, said once as a warning), or None while it
        holds it (or holds none). Raises what the backend raises."""
        held = self.held
        if held is None or self.lost is not None:
            return self.lost
        try:
            lease = self._read_json(LEASE)
            if lease_problem(lease):
                lease = f"an object that is not a lease ({lease_problem(lease)})"
        except FileNotFoundError:
            lease = "nobody (its lease.json was deleted)"
        except ValueError:  # (JSON's decode errors are ValueErrors)
            lease = "an object that is not a lease (not JSON)"
        with LOST:  # (the uploader and the lease's thread both ask)
            if (self.lost is not None
                    or (isinstance(lease, dict) and lease.get("attempt") == held[1])):
                return self.lost
            self.lost = (f"run {lease.get('run_id')} on host {lease.get('host')} (pid "
                         f"{lease.get('pid')})"
                         if isinstance(lease, dict) else str(lease))
            say(f"warning: remote_dir {self.url} was taken over by {self.lost}: this process "
                "copies nothing more there (its checkpoints stay in out_dir)", err=True)
            return self.lost

    def _keep_lease(self):
        """Rewrite the lease every quarter of its bound while this process holds it. A store that
        cannot be reached is the uploader's outage to report; tried again next round."""
        while self.held is not None and self.lost is None:
            time.sleep(self.held[2] / 4)
            try:
                if self.held is not None and self.check_lease() is None:
                    self._put_small(LEASE, lease_record(*self.held))
            except Exception:
                pass

    def release(self, reachable=True):
        """Give the lease up at the end of the run (only while it is still this process's). A
        failure, or a store known unreachable, costs nothing: the lease lapses by itself after its
        bound."""
        held, self.held = self.held, None
        if held is None or not reachable or self.lost is not None:
            return
        try:
            lease = self._read_json(LEASE)
            if isinstance(lease, dict) and lease.get("attempt") == held[1]:
                self.fs.rm_file(self.key(LEASE))
        except Exception:
            pass
