"""
Log-likelihoods of multiple-choice answers, computed as lm-evaluation-harness 0.4's hf model
computes them, so that acc and acc_norm equal its scores:

- a (context, continuation) pair is tokenized whole: the context's trailing whitespace moves to
  the continuation, the continuation's tokens are what follows the context's own tokens;
- the input is cut from the left to the model's block_size (the last block_size + 1 tokens, less
  the last one), and the continuation's log-probabilities are summed in fp32.

What is ours is the speed: the choices of one example share their context, which runs once into
a KV cache; the choices then run as one batch on top of it.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed
from console import RunError
from model import KVCache


def encode_pair(encode, context, continuation):
    """(context ids, continuation ids), as lm-eval splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head):]


def windows(pairs, block_size):
    """[(input ids, target ids of the continuation, where they start in the input)] of each pair,
    cut from the left as lm-eval cuts them."""
    out = []
    for head, tail in pairs:
        full = (head + tail)[-(block_size + 1):]
        n = min(len(tail), block_size)  # (lm-eval refuses a longer one: its last block_size tokens)
        out.append((full[:-1], full[-n:], len(full) - 1 - n))
    return out


def shared(inputs, starts):
    """How many leading tokens every input has in common, up to the first scored position: the
    part that runs once."""
    n = min(starts)
    first = inputs[0]
    for other in inputs[1:]:
        n = min(n, len(other))
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


@torch.no_grad()
def loglikelihoods(model, pairs, device, ctx):
    """[(summed log-probability of the continuation, whether it is the greedy one)] of each
    (context ids, continuation ids) pair of one example, the pairs' shared start run once. Always
    two forward passes, whatever the pairs (FSDP's ranks must run the same ones)."""
    cut = windows(pairs, model.config.block_size)
    inputs, starts = [w[0] for w in cut], [w[2] for w in cut]
    p = max(1, shared(inputs, starts))  # (a first token in common always, unless cut differently)
    same = all(len(i) >= p and i[:p] == inputs[0][:p] for i in inputs)
    head = inputs[0][:p] if same else inputs[0][:1]
    cache = KVCache(model.config.n_layer, model.config.block_size)
    with ctx:
        model(torch.tensor([head], device=device), cache=cache)
    if not same:  # no common start: the whole inputs, the cache left unused
        p, cache = 0, None
    rest = [i[p:] for i in inputs]
    width = max(len(r) for r in rest)
    batch = torch.zeros((len(rest), width), dtype=torch.long, device=device)
    for row, r in enumerate(rest):
        batch[row, :len(r)] = torch.tensor(r, dtype=torch.long)
    if cache is not None:
        cache.expand(len(rest))
    with ctx:
        logits, _ = model(batch, cache=cache, every=True)
    logits = logits.float()
    out = []
    for row, (inp, target, start) in enumerate(cut):
        span = logits[row, start - p:start - p + len(target)]
        logp = F.log_softmax(span, dim=-1)
        t = torch.tensor(target, device=logp.device)
        out.append((logp.gather(1, t[:, None]).sum().item(), bool((logp.argmax(-1) == t).all())))
    return out


def check_vocab(codec, name, examples):
    """RunError naming the characters a character-level vocab cannot encode in a task's text."""
    text = "".join(c + k for e in examples for c, k in e.pairs)
    missing = sorted({ch for ch in set(text) if not codec.has(ch)})
    if missing:
        more = len(missing) - 20
        shown = "".join(missing[:20]) + (f" and {more} more" if more > 0 else "")
        raise RunError(f"the model's character vocab cannot encode task {name}: it lacks {shown!r} "
                       f"(a char-level model scores only text made of its own characters)")


def score_task(model, codec, examples, device, ctx, stopping=lambda: False, progress=None,
               samples=None):
    """{"acc", "acc_norm" (tasks that report it), "n"} of the model on examples, every rank
    scoring its share (example k on rank k % world size; a rank past its share runs the first
    example again and drops it, as FSDP's ranks must all run forward). None if stopping() turns
    true on any rank meanwhile. progress(n): called with the examples done on this rank.
    samples: a list that gets each of this rank's examples as a dict (lm-eval's --log_samples)."""
    rank, world = distributed.rank(), distributed.world()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # right, right by acc_norm, n
    for j in range(math.ceil(len(examples) / world)):
        if distributed.any_rank([stopping()], device)[0]:
            return None
        k = j * world + rank
        e = examples[k if k < len(examples) else 0]
        pairs = [encode_pair(codec.encode, c, t) for c, t in e.pairs]
        lls = [ll for ll, _ in loglikelihoods(model, pairs, device, ctx)]
        if k >= len(examples):
            continue
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # the first of equals, as argmax
        normed = [ll / n for ll, n in zip(lls, e.lengths)]
        pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        counts += torch.tensor([pred == e.label, pred_norm == e.label, 1.0], dtype=torch.float64,
                               device=device)
        if samples is not None:
            samples.append(dict(index=k, label=e.label, loglikelihoods=lls, pred=pred,
                                pred_norm=pred_norm))
        if progress is not None:
            progress(1)
    if dist.is_initialized():
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return dict(acc=right / n, acc_norm=right_norm / n, n=int(n))
