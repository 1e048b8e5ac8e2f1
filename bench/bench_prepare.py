"""
Data-prepare speed and memory against the tokenizer's own limit (docs/performance.md). From the
project root:

    # a 200 MB corpus, 1 and 2 threads, 3 pairs each
    python bench/bench_prepare.py
    # the corpus doubled: peak memory should not move
    python bench/bench_prepare.py --mb=400 --pairs=1
    # the same documents as one .jsonl file
    python bench/bench_prepare.py --jsonl

The corpus is made once, outside the repo (--corpus, default /tmp/prepare-bench-<mb>mb): a folder
of .txt documents of 1-20 KB, each a random draw of lines of the shipped tiny Shakespeare with
numbers put in, so that no two documents are the same text. --jsonl writes the same documents,
in the same order, as one .jsonl file beside it and prepares that.

A: `python data/prepare.py --input=<corpus> --dataset=bench-prepare --num_proc=P` from scratch:
   its tokens/s over its whole wall time (start-up, counting, reading, encoding, writing, renaming)
   and its peak RSS.
B: tiktoken's own `encode_ordinary_batch(docs, num_threads=P)` on the same documents, already in
   memory, timed around that call only: the tokenizer's rate, the limit.
The runs alternate A B A B; the ratio is the median of A/B over the pairs.
"""
import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
sys.path.insert(0, ROOT)  # its modules, when run as python bench/bench_prepare.py
NAME = "bench-prepare"

REFERENCE = r"""
import os, sys, time
sys.path.insert(0, {root!r})
from tokenizer import gpt2_encoding
import json
docs = []
if {corpus!r}.endswith(".jsonl"):
    with open({corpus!r}, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
else:
    for folder, _, files in os.walk({corpus!r}):
        for name in sorted(files):
            if name.endswith(".txt"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    docs.append(f.read())
enc = gpt2_encoding()
t0 = time.perf_counter()
ids = enc.encode_ordinary_batch(docs, num_threads={procs})
seconds = time.perf_counter() - t0
print(sum(map(len, ids)) + len(ids), seconds)  # + one <|endoftext|> per document, as prepare writes
"""


def make_corpus(path, mb, seed=0):
    if os.path.exists(os.path.join(path, "done")):
        return
    shutil.rmtree(path, ignore_errors=True)
    with open(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    rng = random.Random(seed)
    total, n = 0, 0
    while total < mb * 10**6:
        size, doc = rng.randrange(1000, 20000), []
        while sum(map(len, doc)) < size:
            line = rng.choice(lines)
            if rng.random() < 0.1:
                line = line.rstrip("\n") + f" ({rng.randrange(10**6)})\n"
            doc.append(line)
        folder = os.path.join(path, f"{n // 1000:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{n:06d}.txt"), "w", encoding="utf-8") as f:
            total += f.write("".join(doc))
        n += 1
    open(os.path.join(path, "done"), "w").close()
    print(f"made {path}: {n:,} documents, {total / 1e6:.0f} MB")


def as_jsonl(folder):
    """The corpus's documents, in prepare's order, as one .jsonl file beside it."""
    path = folder.rstrip("/") + ".jsonl"
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as out:
            for sub in sorted(os.listdir(folder)):
                if os.path.isdir(os.path.join(folder, sub)):
                    for name in sorted(os.listdir(os.path.join(folder, sub))):
                        with open(os.path.join(folder, sub, name), encoding="utf-8") as f:
                            out.write(json.dumps({"text": f.read()}) + "\n")
        os.replace(path + ".tmp", path)
    return path


def child(cmd):
    """(wall seconds, stdout) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{err[-2000:]}")
    return seconds, out


def ours(corpus, procs):
    shutil.rmtree(os.path.join(ROOT, "data", NAME), ignore_errors=True)
    cmd = [sys.executable, "data/prepare.py", f"--input={corpus}", f"--dataset={NAME}",
           f"--num_proc={procs}"]
    # peak RSS: a fresh grandchild per run, so RUSAGE_CHILDREN of a wrapper is this run's alone
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys; "
               "subprocess.run(sys.argv[1:], check=True); "
               "print('rss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *cmd]
    seconds, out = child(wrapper)
    train, val = (int(x.replace(",", ""))
                  for x in re.search(r"train ([\d,]+) tokens, val ([\d,]+)", out).groups())
    rss = int(re.search(r"^rss (\d+)", out, re.M).group(1)) / 1024
    shutil.rmtree(os.path.join(ROOT, "data", NAME), ignore_errors=True)
    return (train + val) / seconds, rss


def reference(corpus, procs):
    _, out = child([sys.executable, "-c", REFERENCE.format(root=ROOT, corpus=corpus, procs=procs)])
    tokens, seconds = out.split()
    return int(tokens) / float(seconds)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--jsonl", action="store_true")
    a = ap.parse_args()
    corpus = a.corpus or f"/tmp/prepare-bench-{a.mb}mb"
    make_corpus(corpus, a.mb)
    if a.jsonl:
        corpus = as_jsonl(corpus)
    print(f"{os.cpu_count()} cores; corpus {corpus}")
    for procs in map(int, a.procs.split(",")):
        ratios = []
        for pair in range(a.pairs):
            mine, rss = ours(corpus, procs)
            limit = reference(corpus, procs)
            ratios.append(mine / limit)
            print(f"threads {procs} pair {pair + 1}: prepare {mine / 1e6:.2f}M tokens/s (peak RSS "
                  f"{rss:.0f} MB), tiktoken encode_ordinary_batch {limit / 1e6:.2f}M tokens/s: "
                  f"{mine / limit:.1%}", flush=True)
        print(f"threads {procs}: median {statistics.median(ratios):.1%} of tiktoken's rate")
