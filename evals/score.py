"""
Log-likelihoods of multiple-choice answers, computed as lm-evaluation-harness 0.4's hf model
computes them, so that acc and acc_norm equal its scores:

- a (context, continuation) pair is tokenized whole: the context's trailing whitespace moves to
  the continuation, the continuation's tokens are what follows the context's own tokens;
- the input is cut from the left to the model's block_size (the last block_size + 1 tokens, less
  the last one), and the continuation's log-probabilities are summed in fp32.

What is ours is the speed: the choices of one example share their context, which runs once into
a KV cache, and several examples of similar lengths run together: their contexts as one batch,
then all their choices as one batch on top of them, the vocab's matmul only where a token is
scored.
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
def loglikelihoods(model, examples, device, ctx):
    """[[summed log-probability of each choice's continuation]] of several examples, each given
    as its (context ids, continuation ids) pairs. Two forward passes whatever the examples (FSDP's
    ranks must run the same ones): every example's shared start (its context) as one batch into a
    KV cache, then every choice's rest as one batch on top of its own example's start, each row
    with its own positions and a mask that hides the other examples' starts and the padding."""
    cuts = [windows(pairs, model.config.block_size) for pairs in examples]
    starts = [shared([w[0] for w in cut], [w[2] for w in cut]) for cut in cuts]
    P = max(1, max(starts))  # (one token at least: the first pass always runs)
    head = torch.zeros((len(cuts), P), dtype=torch.long, device=device)
    for e, (cut, p) in enumerate(zip(cuts, starts)):
        head[e, :p] = torch.tensor(cut[0][0][:p], dtype=torch.long)
    rows = [(e, w[0][p:]) for e, (cut, p) in enumerate(zip(cuts, starts)) for w in cut]
    W = max(len(r) for _, r in rows)
    cache = KVCache(model.config.n_layer, P + W)
    with ctx:
        model(head, cache=cache)  # right-padded: causal attention keeps padding out of the starts
    cache.select(torch.tensor([e for e, _ in rows], device=device))
    batch = torch.zeros((len(rows), W), dtype=torch.long, device=device)
    pos = torch.zeros((len(rows), W), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), 1, W, P + W), dtype=torch.bool, device=device)
    at = torch.zeros((len(rows), W), dtype=torch.bool, device=device)
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
    for i, (e, r) in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        pos[i] = torch.arange(starts[e], starts[e] + W).clamp(max=model.config.block_size - 1)
        mask[i, 0, :, :starts[e]] = True  # its own example's start, not the padding after it
        mask[i, 0, :, P:] = causal
    i = 0
    for cut, p in zip(cuts, starts):
        for _, target, start in cut:
            at[i, start - p:start - p + len(target)] = True  # the scored tokens' positions
            i += 1
    with ctx:
        logits, _ = model(batch, cache=cache, pos=pos, mask=mask, at=at)
    logp = F.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([t for cut in cuts for _, target, _ in cut for t in target],
                           device=logp.device)
    picked = logp.gather(1, targets[:, None])[:, 0]
    sums = iter(torch.split(picked, [len(target) for cut in cuts for _, target, _ in cut]))
    return [[next(sums).sum().item() for _ in cut] for cut in cuts]  # (fp32 sums, as lm-eval's)


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
               samples=None, chunk=8):
    """{"acc", "acc_norm", "n"} of the model on examples (acc_norm: tasks.TASKS says whether to
    report it), every rank scoring its share: example k on rank k % world size, `chunk` examples
    of similar length at a time (a rank past its share scores the first example again and drops
    it, as FSDP's ranks must all run forward). None if stopping() turns true on any rank
    meanwhile. progress(n): called with the examples done on this rank. samples: a list that gets
    each of this rank's examples as a dict (lm-eval's --log_samples)."""
    rank, world = distributed.rank(), distributed.world()
    mine = list(range(rank, len(examples), world))
    encoded = {k: [encode_pair(codec.encode, c, t) for c, t in examples[k].pairs] for k in mine}
    # similar lengths together: the longest continuation sets a batch's width
    mine.sort(key=lambda k: (max(len(t) for _, t in encoded[k]),
                             max(len(h) for h, _ in encoded[k])))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # right, right by acc_norm, n
    for j in range(math.ceil(math.ceil(len(examples) / world) / chunk)):
        if distributed.any_rank([stopping()], device)[0]:
            return None
        some = mine[j * chunk:(j + 1) * chunk]
        pairs = [encoded[k] for k in some] or [[encode_pair(codec.encode, c, t)
                                                for c, t in examples[0].pairs]]
        for k, lls in zip(some, loglikelihoods(model, pairs, device, ctx)):
            e = examples[k]
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # the first of equals
            normed = [ll / n for ll, n in zip(lls, e.lengths)]
            pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
            counts += torch.tensor([pred == e.label, pred_norm == e.label, 1.0],
                                   dtype=torch.float64, device=device)
            if samples is not None:
                samples.append(dict(index=k, label=e.label, loglikelihoods=lls, pred=pred,
                                    pred_norm=pred_norm))
        if progress is not None and some:
            progress(len(some))
    if dist.is_initialized():
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return dict(acc=right / n, acc_norm=right_norm / n, n=int(n))
