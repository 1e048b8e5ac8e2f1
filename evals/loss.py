"""The loss eval of a training run: the mean loss over eval_iters fixed batches of each split,
shared out between the ranks."""
import math

import torch
import torch.distributed as dist

import distributed


@torch.no_grad()
def estimate_loss(model, data, ctx, device, *, eval_iters, batch_size, block_size, seed,
                  stopping=lambda: False):
    """{"train": loss, "val": loss}, or None if stopping() (a signal, time_limit) turns true on any
    rank meanwhile: the eval is abandoned so that the checkpoint comes quickly."""
    rank, world_size = distributed.rank(), distributed.world()
    out = {}
    model.eval()
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters, device=device)
        for j in range(math.ceil(eval_iters / world_size)):  # as many rounds on every rank
            if distributed.any_rank([stopping()], device)[0]:
                model.train()
                return None
            k = j * world_size + rank
            # past eval_iters a rank still runs a batch (and drops it): FSDP's ranks all run forward
            X, Y = data.eval_batch(split, seed, k % eval_iters, batch_size, block_size)
            with ctx:
                _, loss = model(X.to(device), Y.to(device))
            if k < eval_iters:
                losses[k] = loss.float()
        if dist.is_initialized():
            dist.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train()
    return out
