"""
The GPT language model (GPT-2 shape) and generation: GPTConfig, GPT, KVCache and pick (one token
from logits). The machine it runs on (device, dtype, memory, MFU's peak) is devices.py; GPT-2's
weights in and out through Hugging Face are gpt2.py.
"""
import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


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
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # generation: attend to every position stored so far, this one included
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        # the fused kernel (flash attention on GPU) is faster than a manual softmax on CPU too.
        # One new query after cached positions sees them all: no mask (is_causal's mask is
        # aligned to the top-left corner and would hide them); several new ones come with the
        # mask that says what each sees (GPT.forward)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=T > 1 and mask is None)
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

    def forward(self, x, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
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

    @classmethod
    def skeleton(cls, config):
        """A GPT on the meta device: every tensor's shape, no memory and no init (to be filled with
        load_state_dict(..., assign=True), or to read shapes from)."""
        with torch.device("meta"), _NoInit():
            return cls(config)

    def get_num_params(self, non_embedding=True):
        """Parameters counted once (tied weights too); position embeddings left out by default, as
        in papers."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache=None, every=False, pos=None, mask=None, at=None):
        """Logits (and the loss with targets): of the last position only, unless targets are given
        or every=True, or at the positions that the (B, T) mask `at` picks ((N, vocab), row by
        row). With a KVCache, idx continues the positions the cache holds. pos and mask (scoring
        rows that go on from cached prefixes of other lengths): each row's positions (B, T), and
        which cached and new keys each query sees (B, 1, T, keys)."""
        b, t = idx.size()
        start = 0 if cache is None else cache.length
        if pos is None and start + t > self.config.block_size:
            raise ValueError(f"sequence of length {start + t} is longer than block_size "
                             f"{self.config.block_size}")
        if start and t > 1 and mask is None:
            raise ValueError("after the first window, a KVCache takes one token at a time, or "
                             "several with a mask")
        if pos is None:
            pos = torch.arange(start, start + t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask)
        if cache is not None:
            cache.length += t
        x = self.transformer.ln_f(x)
        if at is not None:  # scoring: only where a token is scored (the vocab's matmul is big)
            logits, loss = self.lm_head(x[at]), None
        elif targets is not None or every:
            logits = self.lm_head(x)
            loss = None if targets is None else F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # at inference only the last position is needed: saves a (T, vocab) matmul
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. GPT-2's 1024 to 256) by cutting the position embeddings."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to "
                             f"{block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay matrices (matmul weights, embeddings), not biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel does the whole update in one pass, on CUDA and on CPU alike.
        fused = ("fused" in inspect.signature(torch.optim.AdamW).parameters
                 and device_type in ("cuda", "cpu"))
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

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
        """idx (B, T) followed by max_new_tokens new tokens; call under model.eval(). See
        tokens()."""
        return torch.cat([idx, *self.tokens(idx, max_new_tokens, temperature, top_k, **kw)], dim=1)

    @torch.no_grad()
    def tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, keep=None, generators=None,
               n_vocab=None, use_cache=True):
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
        cache = (KVCache(self.config.n_layer, min(T, window.size(1) + max_new_tokens))
                 if use_cache else None)
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


def cpu_decoding_layout(model):
    """Batch-1 generation on a CPU reads every weight once per token, and the BLAS's matrix-vector
    product x @ W.T streams W faster stored transposed ((in, out) contiguous) than in nn.Linear's
    own (out, in) rows (bench/bench_sample.py gives the share of the memory bound that sampling
    reaches). So each Linear's weight gets that layout: the same shape and values, a transposed view
    of a copy. The old copy's pages, when they are a checkpoint's memory-mapped file (sample.py),
    are handed back one tensor at a time, so memory never holds both copies of the weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.stride() != (1, module.weight.size(0)):
            # (wte is lm_head's weight: the embedding reads the new layout too)
            old = module.weight.data
            module.weight.data = old.t().contiguous().t()
            _page_out(old)


def _page_out(t):
    """Ask Linux to reclaim the pages of t's storage now (MADV_PAGEOUT: a file's clean pages are
    dropped, to be read again if ever used; nothing is lost, whatever memory it is). Elsewhere, or
    on a kernel older than 5.4, nothing happens and the pages go when the mapping does."""
    if sys.platform != "linux":
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start, size, page = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), 4096
    # whole pages inside the storage only
    first, end = -(-start // page) * page, (start + size) // page * page
    if end > first:
        libc.madvise(first, end - first, 21)  # MADV_PAGEOUT


class _NoInit(torch.overrides.TorchFunctionMode):
    """Skips normal_, the random init of GPT's weights: on the meta device torch runs it in Python
    code that first imports torch._dynamo (seconds, and memory), and only the shapes are wanted."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "normal_":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


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

    def select(self, rows):
        """Row rows[i] of what is held so far becomes row i: sequences that go on from a shared
        start (the choices of one question)."""
        self.kv = [None if kv is None else kv[:, rows] for kv in self.kv]


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
