"""
The GPT language model (GPT-2 shape), plus the few helpers every script needs to run it:
device and dtype choice, the peak FLOP/s that MFU is measured against, and OpenAI's GPT-2
weights in (load_gpt2) and out (to_hf) through Hugging Face transformers.
"""
import inspect
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import fail
from metrics import say


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, as GPT-2; False is a bit better and faster


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # generation: attend to every position stored so far, this one included
            k, v = cache.extend(layer, k, v)
        # the fused kernel (flash attention on GPU) is faster than a manual softmax on CPU too.
        # One new query after cached positions sees them all: no mask (a causal mask would be
        # aligned to the top-left corner and hide them)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection are one matrix.
        # state_dict() still lists both names, which is what GPT-2 files and nanoGPT expect.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters counted once (tied weights too); position embeddings left out by default, as in papers."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache=None):
        """Logits (and the loss with targets). With a KVCache (generation), idx continues the
        positions the cache holds: the whole window into an empty cache, then one token at a time."""
        b, t = idx.size()
        start = 0 if cache is None else cache.length
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of length {start + t} is longer than block_size {self.config.block_size}")
        if start and t > 1:
            raise ValueError("after the first window, a KVCache takes one token at a time")
        pos = torch.arange(start, start + t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += t
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # at inference only the last position is needed: saves a (T, vocab) matmul
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. GPT-2's 1024 to 256) by cutting the position embeddings."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay matrices (matmul weights, embeddings), not biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel does the whole update in one pass; on CPU it measured faster than
        # the default foreach path too (see README, Performance), so it is used wherever it exists.
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), the PaLM appendix B estimate."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, **kw):
        """idx (B, T) followed by max_new_tokens new tokens; call under model.eval(). See tokens()."""
        return torch.cat([idx, *self.tokens(idx, max_new_tokens, temperature, top_k, **kw)], dim=1)

    @torch.no_grad()
    def tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, keep=None, generators=None, n_vocab=None,
               use_cache=True):
        """Yield the next token of each row of idx (B, T), a (B, 1) tensor per step.

        temperature 0 is greedy (the most likely token); top_k None or 0 samples from the whole
        vocab; n_vocab leaves ids at or above it out (a padded vocab's unused rows). With a
        torch.Generator per row, row i draws only from generators[i], so a sample is the same
        whatever else is in its batch.

        The model sees at most block_size positions. The window of the newest tokens grows until
        it is full; the next token then cuts it to its newest `keep` tokens (None: block_size,
        i.e. it slides by one token, as nanoGPT does). With absolute position embeddings a cut
        re-bases every position, so the cut window is run through the model afresh: keep=block_size
        costs that full pass for every token past block_size, a smaller keep once per
        block_size - keep tokens. Between cuts, the KV cache makes a token cost one position's
        forward pass. use_cache=False computes the same tokens the slow way (the reference)."""
        T = self.config.block_size
        keep = T if keep is None else keep
        if not 1 <= keep <= T:
            raise ValueError(f"keep={keep} must be between 1 and block_size {T}")
        window = idx[:, -T:]
        cache = KVCache(self.config.n_layer, min(T, window.size(1) + max_new_tokens)) if use_cache else None
        logits, _ = self(window, cache=cache)
        for step in range(max_new_tokens):
            nxt = pick(logits[:, -1, :n_vocab], temperature, top_k, generators)
            yield nxt
            if step == max_new_tokens - 1:
                return
            if window.size(1) == T:  # full: cut, re-base the positions, run the window afresh
                window = torch.cat((window[:, T - keep + 1:], nxt), dim=1)
                if cache is not None:
                    cache.length = 0
                logits, _ = self(window, cache=cache)
            else:
                window = torch.cat((window, nxt), dim=1)
                logits, _ = self(nxt, cache=cache) if cache is not None else self(window)


class KVCache:
    """Each layer's keys and values of the positions seen so far, so that generating a token costs
    one position's forward pass instead of the whole window's. Buffers are allocated on first use,
    in the dtype attention computes in (bf16 under autocast), for `size` positions."""

    def __init__(self, n_layer, size):
        self.kv = [None] * n_layer
        self.size = size
        self.length = 0  # positions filled, the same in every layer; GPT.forward advances it

    def extend(self, layer, k, v):
        """Store k and v (B, n_head, T, head_size) at the next T positions; all positions so far."""
        if self.kv[layer] is None:
            B, H, _, D = k.shape
            self.kv[layer] = torch.empty((2, B, H, self.size, D), dtype=k.dtype, device=k.device)
        kv, end = self.kv[layer], self.length + k.size(2)
        kv[0, :, :, self.length:end] = k
        kv[1, :, :, self.length:end] = v
        return kv[0, :, :, :end], kv[1, :, :, :end]


def pick(logits, temperature, top_k, generators=None):
    """One token per row of logits (B, vocab): the argmax at temperature 0, else a draw from the
    softmax of logits / temperature over the top_k most likely (all when top_k is None or 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    if generators is None:
        return torch.multinomial(probs, num_samples=1)
    return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


# ----------------------------------------------------------------------------------------------
# device, dtype and peak FLOP/s: shared by train.py, sample.py and bench.py

def pick_device(device):
    """'auto' -> cuda > mps > cpu; anything else is taken as given (cuda:1, cpu, ...) once it is
    known to exist here."""
    if device != "auto":
        try:
            d = torch.device(device)
        except RuntimeError:
            fail(f"device={device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
        if d.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: device={device!r} but no CUDA GPU is visible; use --device=cpu or --device=auto")
        if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
            raise SystemExit(f"error: device={device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        if d.type == "mps" and not torch.backends.mps.is_available():
            raise SystemExit(f"error: device={device!r} but MPS is not available here; use --device=auto")
        if d.type not in ("cpu", "cuda", "mps"):
            fail(f"device={device!r}: this project runs on cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype, device):
    """'auto' -> bfloat16 on CUDA that has it, else float16 on CUDA, float32 elsewhere.
    bf16 autocast on a CPU was 20-40x slower than fp32 on AVX2 and no faster on AVX-512: CPUs get fp32."""
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    dtype = names.get(dtype, dtype)
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"error: dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    return dtype


def check_fits(model_args, device, shards=1):
    """A model whose training state (fp32 weights, gradients and AdamW's two moments: 16 bytes per
    parameter, split `shards` ways under FSDP) is larger than the device's whole memory can never
    train: say so before building it."""
    d, L, V, T = model_args["n_embd"], model_args["n_layer"], model_args["vocab_size"], model_args["block_size"]
    params = 12 * L * d * d + (V + T) * d
    if device.startswith("cuda"):
        total = torch.cuda.mem_get_info(device)[1]
    elif device == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if 16 * params / shards > total:
        fail(f"n_layer={L}, n_embd={d}, block_size={T}, vocab {V}: {params / 1e9:.1f}B parameters need "
             f"{16 * params / shards / 2**30:.0f} GiB to train (weights, gradients, AdamW"
             f"{f', sharded {shards} ways' if shards > 1 else ''}), more than this {device}'s "
             f"{total / 2**30:.0f} GiB; make the model smaller" + ("" if shards > 1 else " or use --parallelism=fsdp "
                                                                    "on several GPUs"))


def one_line_out_of_memory(advice="lower batch_size (raising gradient_accumulation_steps keeps the global "
                                   "batch), block_size or the model's size"):
    """Running out of memory anywhere (a batch or model too big for the device) ends the process
    with one error line and exit 1 instead of a traceback; checkpoints already written are intact."""
    previous = sys.excepthook

    def hook(kind, e, tb):
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e):
            say(f"error: out of memory ({_first_line(e)[:160]}); {advice}", err=True)
        else:
            previous(kind, e, tb)
    sys.excepthook = hook


def autocast_context(device, dtype):
    """Mixed precision for the forward pass; fp32 runs without autocast."""
    if dtype == "float32":
        return nullcontext()
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops_for(device, dtype, configured=0.0):
    """The FLOP/s MFU is measured against: the configured figure if set, a data-sheet peak for
    known GPUs, else (CPUs, unknown GPUs) a measured fp32 matmul rate, so MFU is never against
    a pretend A100."""
    if configured:
        return float(configured)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak if dtype != "float32" else peak / 2  # tf32 runs at about half the bf16 rate
    return measure_matmul_flops(device)


def measure_matmul_flops(device, n=1024, reps=5, rounds=5):
    """The device's fp32 matmul rate: the best of several short rounds, so that a moment of
    contention from another process does not pass for the peak (and MFU then for over 100%)."""
    # constant inputs: drawing random ones would move the global RNG and break exact resume
    a = torch.full((n, n), 0.5, device=device)
    b = torch.full((n, n), 0.25, device=device)
    for _ in range(2):
        a @ b  # warm up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------
# GPT-2 weights in (load_gpt2) and out (to_hf), through Hugging Face transformers. It is imported
# inside these functions only, so training from scratch never pays its few seconds of import.
# Both models name their tensors alike (transformer.h.0.attn.c_attn.weight, ...); the differences
# are HF's Conv1D, which stores (in, out) where nn.Linear stores (out, in), and its biases.

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M parameters
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_state_dict(config, state_dict):
    """A GPT that takes state_dict's tensors as its parameters: built on the meta device, so there
    is no random init to wait for and no second copy of the weights in memory."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state_dict, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # assign gave the tied pair two Parameters
    return model


def _first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _hf_load(load, name, **kwargs):
    """load(name) for a from_pretrained: a folder as it is; a GPT-2 name from the HF cache, else from
    the Hub unless HF_HUB_OFFLINE is set. Every failure ends in one line: what was looked for, where,
    and how to get it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    if os.path.isdir(name):
        try:
            return load(name, **kwargs)
        except Exception as e:  # no config.json, no weights, a truncated file: the same answer
            raise SystemExit(f"error: {name} is not a Hugging Face GPT-2 checkpoint folder (config.json and "
                             f"model.safetensors or pytorch_model.bin) ({_first_line(e)})")
    cache = constants.HF_HUB_CACHE
    how = (f"on a machine with internet run `hf download {name}` (`huggingface-cli download {name}` with older "
           f"huggingface_hub) and copy its cache to {cache} (or point HF_HOME at it), or pass a local folder "
           f"holding the weights as init_from")
    try:
        return load(name, local_files_only=True, **kwargs)
    except Exception:
        pass  # not in the cache (or not all of it): try the Hub
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(f"error: GPT-2 weights {name!r} are not in the Hugging Face cache {cache} "
                         f"and HF_HUB_OFFLINE is set; {how}")
    # from_pretrained retries an unreachable Hub for ~25 s; one request without retries
    # (timeout HF_HUB_ETAG_TIMEOUT, 10 s by default) tells at once
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"))
    except Exception as e:
        raise SystemExit(f"error: GPT-2 weights {name!r} are not in the Hugging Face cache {cache} and the Hub "
                         f"cannot be reached ({_first_line(e)}); {how}")
    try:
        return load(name, **kwargs)
    except Exception as e:
        raise SystemExit(f"error: downloading GPT-2 weights {name!r} into {cache} failed ({_first_line(e)}); {how}")


def load_gpt2(name_or_folder, dropout=None):
    """Our GPT with GPT-2 weights: a name in GPT2_NAMES (HF cache, or downloaded when allowed) or a
    local folder with an HF GPT-2 checkpoint of any size, vocab and context. The shape comes from
    the weights' config.json; dropout is the only setting of ours (None: 0.0, as in nanoGPT)."""
    if not os.path.isdir(name_or_folder) and name_or_folder not in GPT2_NAMES:
        fail(f"init_from={name_or_folder!r} is neither GPT-2 weights by name ({', '.join(GPT2_NAMES)}) "
             f"nor an existing folder")
    from transformers import AutoConfig
    hf_config = _hf_load(AutoConfig.from_pretrained, name_or_folder)
    if hf_config.model_type != "gpt2":
        raise SystemExit(f"error: {name_or_folder} holds a {hf_config.model_type!r} model, not GPT-2")
    c = hf_config
    unsupported = [f"{k}={getattr(c, k)!r}" for k, ok in (
        ("activation_function", c.activation_function in ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", c.n_inner in (None, 4 * c.n_embd)),
        ("layer_norm_epsilon", c.layer_norm_epsilon == 1e-5),
        ("scale_attn_weights", c.scale_attn_weights),
        ("scale_attn_by_inverse_layer_idx", not c.scale_attn_by_inverse_layer_idx),
        ("add_cross_attention", not c.add_cross_attention),
        ("tie_word_embeddings", c.tie_word_embeddings)) if not ok]
    if unsupported:
        raise SystemExit(f"error: {name_or_folder} is a GPT-2 variant this GPT does not implement: {', '.join(unsupported)}")
    config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                       n_embd=c.n_embd, dropout=0.0 if dropout is None else dropout, bias=True)
    from transformers import GPT2LMHeadModel  # imported only now: the slower half of transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its per-tensor bar is noise in a log; the callers say what is loading
    hf = _hf_load(GPT2LMHeadModel.from_pretrained, name_or_folder, config=hf_config, dtype=torch.float32)
    hf_state = hf.state_dict()
    del hf
    # HF's tensors are still mostly on disk (safetensors maps the file). Each is copied into our
    # layout and dropped, so there are never more than two copies of the weights, HF's and ours
    # (gpt2-large: peak RSS 2.07x the fp32 weights, half of it the mapped file, freed at return)
    state = {}
    for k in list(hf_state):
        t = hf_state.pop(k)
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of older HF versions; lm_head is tied to wte
        state[k] = t.t().contiguous() if k.endswith(TRANSPOSED) else t.clone()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return from_state_dict(config, state)


def to_hf(model):
    """(GPT2Config, state dict) that GPT2LMHeadModel loads and computes the same logits with.
    vocab_size is exported as trained: a padded 50304 stays 50304, so the export holds exactly
    the trained weights. The padding rows (47 of 50304) are no token of the tokenizer; training has
    taught the model never to predict them."""
    from transformers import GPT2Config
    c = model.config
    eot = 50256 if c.vocab_size > 50256 else None  # <|endoftext|> exists only in a GPT-2 BPE vocab
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                           activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=eot,
                           eos_token_id=eot, architectures=["GPT2LMHeadModel"])
    state = {}
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":  # tied to wte: HF ties it back (tie_word_embeddings)
            state[k] = v.t().contiguous() if k.endswith(TRANSPOSED) else v
    if not c.bias:
        # HF's Conv1D and LayerNorm always have a bias. A zero bias adds exactly nothing, so the
        # export computes what our bias-free model does and keeps the standard GPT-2 layout that
        # every GPT-2 tool reads (a config flag to drop biases would be ours alone)
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
                w = module.weight
                state[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return hf_config, state
