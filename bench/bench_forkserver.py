"""What the test suite's fork server (tests/forkserver.py, docs/design.md#tests) saves per script:
`train.py --max_iters=0` on the suite's tiny model (start, config, data, model, exit), a fresh
interpreter (A) and a child forked by the server (B), interleaved A B A B. From the project root:

    .venv/bin/python bench/bench_forkserver.py [rounds]
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import conftest  # noqa: E402  (the suite's own run() and its fork server)

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
with tempfile.TemporaryDirectory() as out:
    args = [*conftest.TINY, f"--out_dir={out}", "--max_iters=0"]
    conftest.run("train.py", *args)  # starts the server, outside the timing
    times = {"fresh interpreter": [], "forked": []}
    for _ in range(rounds):
        for kind, times_of in times.items():
            t = time.perf_counter()
            if kind == "forked":
                conftest.run("train.py", *args)
            else:
                subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                               env=conftest.ENV, capture_output=True, check=True)
            times_of.append(time.perf_counter() - t)
for kind, v in times.items():
    print(f"{kind:>17}: median {statistics.median(v):.2f} s of {' '.join(f'{x:.2f}' for x in v)}")
print("ratio: "
      f"{statistics.median(times['fresh interpreter']) / statistics.median(times['forked']):.1f}x")
