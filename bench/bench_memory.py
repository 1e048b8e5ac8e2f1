"""
Peak memory of reading a checkpoint (docs/sampling.md): sample.py, export.py and checkpoint.py
read only the weights, memory-mapped, never the optimizer and RNG. From the project root:

    python bench/bench_memory.py  # a 57M-parameter char model (8 x 768), and gpt2-medium's shape
    python bench/bench_memory.py --shapes=57m

For each shape a training checkpoint (weights, AdamW's two moments after one step, the plain part)
is written to a temp folder; then each command runs in a fresh process under /usr/bin/time, which
reports its peak RSS. The baseline is `import torch, model` in the same interpreter, measured in
the same run; a figure is (peak RSS - baseline) / the bytes of the fp32 weights (target <= 1.5).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the 57M model
SHAPES = {"57m": dict(n_layer=8, n_head=8, n_embd=768, block_size=256, vocab_size=65),
          "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024,
                              vocab_size=50304)}


def peak_rss(cmd):
    """Peak RSS in bytes of cmd (a python command line), from GNU time's %M (KB)."""
    p = subprocess.run(["/usr/bin/time", "-f", "PEAK %M", sys.executable, *cmd], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return int(re.findall(r"PEAK (\d+)", p.stderr)[-1]) * 1024


def checkpoint_of(shape, folder):
    """out_dir/ckpt.pt: a training state of this shape, with its tokenizer record."""
    from keep.files import BEST
    from keep import store
    from keep import rng
    import tokenizer
    from bench_checkpoint import training_state
    state = training_state(shape)
    state["tokenizer"] = \
        tokenizer.of_file(os.path.join(ROOT, "data", "shakespeare_char", "meta.pkl")) \
        if shape["vocab_size"] < 50257 else tokenizer.GPT2
    state["config"] = dict(dataset="bench-memory", init_from="scratch")
    state["rng"] = [rng.capture_rng()]
    # train.py's order
    state = dict(model=state.pop("model"), optimizer=state.pop("optimizer"), **state)
    out = os.path.join(folder, "out")
    os.makedirs(out)
    store.save(state, os.path.join(out, BEST))
    weights = sum(t.numel() * t.element_size() for k, t in state["model"].items()
                  if k != "lm_head.weight")
    del state
    return out, weights


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shapes", default="57m,gpt2-medium")
    args = ap.parse_args()
    baseline = peak_rss(["-c", "import torch, model"])
    print(f"baseline (import torch, model): {baseline / 2**20:.0f} MB", flush=True)
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            out, weights = checkpoint_of(SHAPES[name], tmp)
            size = os.path.getsize(os.path.join(out, "ckpt.pt"))
            print(f"{name}: {weights / 2**20:.0f} MB of fp32 weights, a {size / 2**20:.0f} MB "
                  "checkpoint", flush=True)
            for what, cmd in (("sample.py, 20 tokens",
                               ["sample.py", f"--out_dir={out}", "--num_samples=1",
                                "--max_new_tokens=20", "--device=cpu"]),
                              ("export.py --format=hf",
                               ["export.py", f"--out_dir={out}", f"--to={tmp}/hf"]),
                              ("checkpoint.py FILE",
                               ["checkpoint.py", os.path.join(out, "ckpt.pt")]),
                              ("checkpoint.py verify FILE",
                               ["checkpoint.py", "verify", os.path.join(out, "ckpt.pt")])):
                rss = peak_rss(cmd)
                print(f"  {what:<28} peak RSS {rss / 2**20:6.0f} MB: baseline + "
                      f"{(rss - baseline) / 2**20:5.0f} MB = {(rss - baseline) / weights:.2f}x the "
                      "weights (target <= 1.5)", flush=True)


if __name__ == "__main__":
    main()
