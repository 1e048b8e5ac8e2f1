"""
Sampling speed, side by side (docs/performance.md). Run from the project root:

    # ours vs nanoGPT's sample.py: 6 layers, 384 wide, block 256, vocab 65
    python bench/bench_sample.py char
    # ours vs nanoGPT's sample.py: GPT-2 124M's shape, random weights
    python bench/bench_sample.py gpt2
    # ours: 10 samples in one batch vs the same 10 one after another
    python bench/bench_sample.py char --batch
    python bench/bench_sample.py gpt2 --batch
    # ours sliding the window by one token, as nanoGPT
    python bench/bench_sample.py char --ours=--window_keep=1.0
    # greedy, within the window (prompt + 240 < 256)
    python bench/bench_sample.py char --new=240 --top_k=1
    # static-cache decode step: eager vs torch.compile
    python bench/bench_sample.py gpt2 --compile --new=200

Without --batch it also prints the memory bound of batch 1: the bytes of weights one token reads,
over a copy bandwidth measured in the same process, and each script's tokens/s as a share of it.

nanoGPT is the unmodified copy in ../shared/reference/nanogpt (a benchmark reference only). Both
scripts sample the same checkpoint with the same prompt, one sample of --new tokens, fp32 on the
CPU; ours reads the GPT-2 model from a local HF folder (as users do), nanoGPT from a ckpt.pt of the
same weights. The runs alternate A B A B. A run's generation time is its wall time minus the wall
time of the same command with --max_new_tokens=1 (start-up and loading), so tokens/s count
generation only. The ratio is the median over the pairs.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, above bench/
sys.path.insert(0, ROOT)  # its modules, when run as python bench/bench_sample.py
NANOGPT = os.path.join(ROOT, "..", "shared", "reference", "nanogpt")
PROMPT = "\n"  # both scripts' default


def wall(cmd, cwd, env=None):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def char_checkpoint(tmp):
    """ckpt.pt of the char shape, from two iterations of our train.py (weights barely trained:
    the speed does not depend on them), readable by both sample.py scripts."""
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare_char", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    out = os.path.join(tmp, "char")
    subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                    "--compile=False", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                    "--eval_iters=1", "--batch_size=1", "--always_save_checkpoint=True"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    return ["--out_dir=" + out], ["--out_dir=" + out]


def gpt2_checkpoint(tmp):
    """GPT-2 124M's shape with random weights: an HF folder for ours, the same weights as a
    nanoGPT ckpt.pt (no dataset in its config: nanoGPT then decodes with tiktoken's gpt2)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from gpt2 import load_gpt2
    torch.manual_seed(0)
    folder = os.path.join(tmp, "hf-gpt2")
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    model = load_gpt2(folder)
    c = model.config
    os.makedirs(os.path.join(tmp, "ng-gpt2"))
    torch.save({"model": model.state_dict(), "config": {},
                "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                   block_size=c.block_size, bias=c.bias, vocab_size=c.vocab_size,
                                   dropout=0.0)},
               os.path.join(tmp, "ng-gpt2", "ckpt.pt"))
    return ["--init_from=" + folder], ["--out_dir=" + os.path.join(tmp, "ng-gpt2")]


def tiktoken_cache(tmp):
    """nanoGPT calls tiktoken.get_encoding('gpt2'), which downloads two files. Offline, put the
    project's copies (byte-identical, hashes checked by tiktoken) where its cache looks for them."""
    import tiktoken.load
    from tiktoken_ext.openai_public import gpt2
    from tokenizer import BPE_DIR
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=os.path.join(tmp, "tiktoken-cache"))
    fetch, saved = tiktoken.load.read_file, os.environ.copy()
    # tiktoken fills its cache from what read_file returns: the shipped file of the same name
    tiktoken.load.read_file = lambda blobpath: open(
        os.path.join(BPE_DIR, os.path.basename(blobpath)), "rb").read()
    os.environ.update(env)
    try:
        gpt2()
    finally:
        tiktoken.load.read_file = fetch
        os.environ.clear()
        os.environ.update(saved)
    return env


def copy_bandwidth():
    """Bytes a memory copy moves per second (read + written), the best of 5 copies of 512 MB."""
    import torch
    src, dst = torch.ones(2**27), torch.empty(2**27)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes_per_token(shape):
    """What one token reads at batch 1 in fp32: every weight once (wte as lm_head), one row of
    wpe."""
    L, C, V = shape["n_layer"], shape["n_embd"], shape["vocab_size"]
    per_layer = 12 * C * C + 13 * C  # attention and MLP matrices with their biases, two LayerNorms
    return 4 * (L * per_layer + V * C + 2 * C + C)


SHAPES = {"char": dict(n_layer=6, n_embd=384, vocab_size=65, block_size=256),
          "gpt2": dict(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024)}


def static_step(model, token, pos, K, V):
    """One token through the model with a static KV cache of block_size positions (K, V: per layer
    (1, n_head, block_size, head_size)) and a position tensor: the same shapes at every step, which
    is what torch.compile needs to trace it once. A measurement only: sample.py's cache grows
    instead."""
    import torch
    import torch.nn.functional as F
    c, t = model.config, model.transformer
    C, H = c.n_embd, c.n_head
    x = t.wte(token) + t.wpe(pos)[None, None]
    mask = (torch.arange(c.block_size) <= pos)[None, None, None, :]
    for i, block in enumerate(t.h):
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(1, 1, H, C // H).transpose(1, 2) for z in (q, k, v))
        K[i].index_copy_(2, pos[None], k)
        V[i].index_copy_(2, pos[None], v)
        y = F.scaled_dot_product_attention(q, K[i], V[i], attn_mask=mask)
        x = x + block.attn.c_proj(y.transpose(1, 2).reshape(1, 1, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(t.ln_f(x))


def bench_compile(shape, pairs, new):
    """Whether torch.compile helps batch-1 decoding here: the static-cache step eager against the
    same step compiled (compiled once before timing; its compile time is printed), A B A B."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape], n_head=12 if shape == "gpt2" else 6, bias=True,
                          dropout=0.0)).eval()
    c = model.config
    compiled = torch.compile(static_step, dynamic=False)

    def rate(step):
        K = [torch.zeros(1, c.n_head, c.block_size, c.n_embd // c.n_head) for _ in range(c.n_layer)]
        V = [torch.zeros_like(k) for k in K]
        tokens = [torch.zeros(1, 1, dtype=torch.long)]
        t0 = time.perf_counter()
        for p in range(new):
            tokens.append(
                step(model, tokens[-1], torch.tensor(p), K, V)[:, -1].argmax(-1, keepdim=True))
        return new / (time.perf_counter() - t0), torch.cat(tokens[1:], dim=1)
    with torch.inference_mode():
        t0 = time.perf_counter()
        _, got = rate(compiled)
        print(f"compile (and one pass): {time.perf_counter() - t0:.1f} s", flush=True)
        want = torch.cat(list(model.tokens(torch.zeros(1, 1, dtype=torch.long), new, 0.0)), dim=1)
        print(f"the compiled static step gives sample.py's greedy tokens: {torch.equal(got, want)}",
              flush=True)
        ratios = []
        for i in range(pairs):
            (eager, _), (comp, _) = rate(static_step), rate(compiled)
            ratios.append(comp / eager)
            print(f"pair {i + 1}: eager {eager:.1f} tokens/s, compiled {comp:.1f} tokens/s, ratio "
                  f"{ratios[-1]:.2f}", flush=True)
    print(f"median ratio compiled/eager: {statistics.median(ratios):.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("shape", choices=("char", "gpt2"))
    ap.add_argument("--batch", action="store_true",
                    help="ours: 10 samples batched vs one after another")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--new", type=int, default=500, help="new tokens per sample")
    ap.add_argument("--top_k", type=int, default=200, help="both scripts' top_k (1: greedy)")
    ap.add_argument("--ours", default="",
                    help="more flags for our sample.py, e.g. --ours=--window_keep=1.0")
    ap.add_argument("--compile", action="store_true",
                    help="a static-cache decode step, eager vs torch.compile")
    a = ap.parse_args()
    if a.compile:
        return bench_compile(a.shape, a.pairs, min(a.new, SHAPES[a.shape]["block_size"]))
    if not os.path.isdir(NANOGPT):
        sys.exit(f"error: nanoGPT's reference copy is not at {os.path.normpath(NANOGPT)}; this "
                 "benchmark runs from a checkout beside the team's shared/ folder")
    common = ["--device=cpu", f"--start={PROMPT}", "--seed=1337", f"--top_k={a.top_k}"]
    with tempfile.TemporaryDirectory(dir=ROOT, prefix="bench-sample-") as tmp:
        ours_args, ng_args = (char_checkpoint if a.shape == "char" else gpt2_checkpoint)(tmp)
        ours = [sys.executable, os.path.join(ROOT, "sample.py"), *ours_args, *common,
                "--dtype=float32", *a.ours.split()]
        if a.batch:
            runs = {"batched": ([*ours, "--num_samples=10", "--max_batch=10"], ROOT, None, 10),
                    "one by one": ([*ours, "--num_samples=10", "--max_batch=1"], ROOT, None, 10)}
        else:
            ng = os.path.join(tmp, "nanogpt")
            shutil.copytree(NANOGPT, ng)
            # nanoGPT finds the vocab at data/<dataset>/meta.pkl under its cwd
            if a.shape == "char":
                os.makedirs(os.path.join(ng, "data", "shakespeare_char"))
                shutil.copy(os.path.join(ROOT, "data", "shakespeare_char", "meta.pkl"),
                            os.path.join(ng, "data", "shakespeare_char"))
            runs = {"project": ([*ours, "--num_samples=1"], ROOT, None, 1),
                    "nanoGPT": ([sys.executable, "sample.py", *ng_args, *common, "--num_samples=1",
                                 "--dtype=float32"],
                                ng, tiktoken_cache(tmp), 1)}
        rates = {name: [] for name in runs}
        for pair in range(1, a.pairs + 1):
            line = []
            for name, (cmd, cwd, env, samples) in runs.items():
                seconds = (wall([*cmd, f"--max_new_tokens={a.new}"], cwd, env)
                           - wall([*cmd, "--max_new_tokens=1"], cwd, env))
                rates[name].append(samples * (a.new - 1) / seconds)
                line.append(f"{name} {rates[name][-1]:.1f} tokens/s ({seconds:.2f} s)")
            print(f"pair {pair}: " + ", ".join(line), flush=True)
        (first, r1), (second, r2) = rates.items()
        ratios = [x / y for x, y in zip(r1, r2)]
        print(f"median tokens/s: {first} {statistics.median(r1):.1f}, {second} "
              f"{statistics.median(r2):.1f}; median ratio {first}/{second}: "
              f"{statistics.median(ratios):.2f}x (per pair: "
              + ", ".join(f"{r:.2f}" for r in ratios) + ")")
        if not a.batch:  # batch 1 reads every weight once per token: the memory's speed bounds it
            bandwidth, per_token = copy_bandwidth(), weight_bytes_per_token(SHAPES[a.shape])
            bound = bandwidth / per_token
            print(f"memory bound: {per_token / 2**20:.1f} MB of weights per token at a copy "
                  f"bandwidth of {bandwidth / 1e9:.1f} GB/s (read + written) = {bound:.1f} "
                  f"tokens/s; {first} reaches {statistics.median(r1) / bound:.0%} of it, {second} "
                  f"{statistics.median(r2) / bound:.0%}")


if __name__ == "__main__":
    main()
