"""
The loss eval of a training run, on text that every run of a dataset shares: the first
eval_tokens tokens of each split (0: all of val, and as many of train), read as windows of
block_size tokens, each token scored once, whatever the run's seed or batch size. block_size
changes how much context each token is scored with, not which tokens are scored (up to the last
partial window). The val loss is also given in bits per byte of the text it scores (nanochat's
bpb), which compares runs whose tokenizers differ: a char run and a BPE run of the same text.
"""
import math

import numpy as np
import torch
import torch.distributed as dist

import distributed

SPLITS = ("train", "val")


def token_bytes(codec, vocab_size):
    """Each token id's length in bytes (0 past the tokenizer's own ids: a padded vocab's rows)."""
    return np.array([len(codec.token_bytes(i)) if i < codec.size else 0 for i in range(vocab_size)],
                    dtype=np.int64)


class LossEval:
    def __init__(self, data, codec, vocab_size, *, tokens, block_size, batch_size, device, ctx):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.device, self.ctx = device, ctx
        val = data.windows("val", tokens, block_size)
        # (0 scores the whole val split, and as many train tokens: not a whole corpus each time)
        self.windows = {"train": min(data.windows("train", tokens, block_size), val), "val": val}
        scored = data.bins["val"][1:1 + self.windows["val"] * block_size].astype(np.int64)
        self.val_bytes = int(token_bytes(codec, vocab_size)[scored].sum())

    def tokens(self, split):
        return self.windows[split] * self.block_size

    @torch.no_grad()
    def __call__(self, model, stopping=lambda: False):
        """{"train": loss, "val": loss, "val_bpb": bits per byte}, or None if stopping() (a signal,
        time_limit) turns true on any rank meanwhile: the eval is abandoned so that the checkpoint
        comes quickly. Batches of windows are shared out between the ranks; every rank runs as many
        forward passes (FSDP's ranks all must), a rank past the last batch scoring window 0 again
        and dropping it."""
        rank, world = distributed.rank(), distributed.world()
        out = {}
        model.eval()
        for split in SPLITS:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)  # nats, tokens
            batches = math.ceil(self.windows[split] / self.batch_size)
            for j in range(math.ceil(batches / world)):
                if distributed.any_rank([stopping()], self.device)[0]:
                    model.train()
                    return None
                first = (j * world + rank) * self.batch_size
                count = min(self.batch_size, self.windows[split] - first)
                X, Y = self.data.window_rows(split, first if count > 0 else 0, max(count, 1),
                                             self.block_size)
                with self.ctx:
                    _, loss = model(X.to(self.device), Y.to(self.device))
                if count > 0:
                    total += torch.stack([loss.double() * Y.numel(),
                                          torch.tensor(Y.numel(), dtype=torch.float64,
                                                       device=self.device)])
            if dist.is_initialized():
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
            if split == "val":
                out["val_bpb"] = total[0].item() / math.log(2) / self.val_bytes
        model.train()
        return out
