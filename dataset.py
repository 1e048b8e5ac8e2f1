"""
Token data: data/<dataset>/{train,val}.bin (uint16, from prepare.py) read through np.memmap,
and batches drawn as a pure function of (seed, iteration).

Why a pure function: the global batch of iteration t is drawn by a generator seeded with
(seed, t), and each rank takes its own slice of it. Resuming at iteration t then needs no loader
state, and 1 rank or 8 ranks (same global batch) see exactly the same sequences. Evaluation draws
from its own fixed seeds, so it never disturbs training and every eval sees the same batches.
"""
import os

import numpy as np
import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep training and evaluation generators apart


class TokenData:
    def __init__(self, dataset, data_dir=DATA_DIR):
        self.name = dataset
        self.dir = os.path.join(data_dir, dataset)
        prepare = os.path.join(os.path.relpath(self.dir), "prepare.py")
        self.bins = {}
        for split in ("train", "val"):
            path = os.path.join(self.dir, f"{split}.bin")
            if not os.path.exists(path):
                what = "does not exist" if not os.path.isdir(self.dir) else f"has no {split}.bin"
                ready = sorted(d for d in os.listdir(data_dir) if os.path.exists(os.path.join(data_dir, d, "val.bin")))
                hint = f"run: python {prepare}" if os.path.exists(prepare) else \
                    f"prepare it first (see README); prepared here: {', '.join(ready) or 'none'}"
                raise SystemExit(f"error: dataset {dataset!r} ({self.dir}) {what}; {hint}")
            # memmap keeps a 9 GB openwebtext bin on disk; opened once, not per batch
            self.bins[split] = np.memmap(path, dtype=np.uint16, mode="r")
        meta = os.path.join(self.dir, "meta.pkl")
        self.meta_path = meta if os.path.exists(meta) else None

    def tokens(self):
        """{split: number of tokens}, for checking block_size against the data up front."""
        return {split: len(b) for split, b in self.bins.items()}

    def vocab_size(self):
        """The char vocab's size from meta.pkl, or None for GPT-2 BPE data."""
        if self.meta_path is None:
            return None
        from tokenizer import load_meta
        return load_meta(self.meta_path)["vocab_size"]

    def _rows(self, split, offsets, block_size):
        data = self.bins[split]  # configurator.check_data made sure it is longer than block_size
        chunk = data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def _offsets(self, split, stream, seed, step, count, block_size):
        rng = np.random.default_rng([seed, stream, step])
        return rng.integers(0, len(self.bins[split]) - block_size, size=count)

    def train_batch(self, seed, it, micro_step, batch_size, block_size, accum_per_rank, rank=0, world_size=1):
        """One rank's rows of iteration `it` for one micro-step. The whole global batch
        (batch_size * accum_per_rank * world_size rows) is drawn and sliced, so it does not
        depend on how the rows are split between ranks and micro-steps."""
        first = (rank * accum_per_rank + micro_step) * batch_size
        offsets = self._offsets("train", TRAIN_STREAM, seed, it, batch_size * accum_per_rank * world_size, block_size)
        return self._rows("train", offsets[first:first + batch_size], block_size)

    def eval_batch(self, split, seed, k, batch_size, block_size):
        """The k-th evaluation batch of a split: the same at every evaluation."""
        stream = EVAL_STREAM + (split == "val")
        return self._rows(split, self._offsets(split, stream, seed, k, batch_size, block_size), block_size)
