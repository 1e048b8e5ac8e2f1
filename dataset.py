"""
Token data: data/<dataset>/{train,val}.bin read through np.memmap, and batches drawn as a pure
function of (seed, iteration).

The format, one for every dataset: train.bin and val.bin are flat arrays of token ids, native
(little-endian) unsigned ints with no header, documents one after another (GPT-2 BPE puts
<|endoftext|> after each). The ids are uint16 unless meta.pkl says otherwise. meta.pkl, when
present, is a pickled dict of plain data (read without running any pickled code):
    vocab_size  every id in the bins is below it
    dtype       "uint16" or "uint32": uint32 when a vocab has more than 65,536 ids (absent: uint16)
    tokenizer   "char" or "gpt2" (absent: "char" when itos is there)
    itos, stoi  the character vocab ({id: char}, {char: id}), for tokenizer "char"
    and, from data/prepare.py, documents/tokens per split and where the data came from.
No meta.pkl means uint16 GPT-2 BPE (data/shakespeare, data/openwebtext as nanoGPT wrote them).

Why a pure function: the global batch of iteration t is drawn by a generator seeded with
(seed, t), and each rank takes its own slice of it. Resuming at iteration t then needs no loader
state, and 1 rank or 8 ranks (same global batch) see exactly the same sequences. Evaluation draws
from its own fixed seeds, so it never disturbs training and every eval sees the same batches.
"""
import hashlib
import os
import pickle

import numpy as np

from atomicfile import atomic_write
from configurator import RunError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # keep training and evaluation generators apart
META = "meta.pkl"
FINGERPRINT_READS = 64


class _PlainUnpickler(pickle.Unpickler):
    # meta.pkl holds only dicts, lists, str and int, which unpickle without find_class;
    # anything that names a class or function is refused, so a planted file runs nothing.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl may hold plain data only")


def load_meta(path):
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def save_meta(path, meta):
    atomic_write(path, lambda f: pickle.dump(meta, f))


def write_bin(path, ids):
    """A whole split's ids to path, whole or not at all. Written through Python's file object:
    ndarray.tofile's stdio buffer can lose the error of a write that failed (a full disk) and leave
    a short file with no word said."""
    atomic_write(path, lambda f: f.write(np.ascontiguousarray(ids).data))


def bin_dtype(vocab_size):
    """The narrowest id type the format allows for a vocab: ids 0..65535 fit in uint16."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def meta_dtype(meta):
    """The bins' dtype a meta dict records (uint16 when it says nothing)."""
    name = (meta or {}).get("dtype", "uint16")
    if name not in ("uint16", "uint32"):
        raise ValueError(f"dtype {name!r} is not uint16 or uint32")
    return np.dtype(name)


class TokenData:
    def __init__(self, dataset, data_dir=DATA_DIR):
        self.name = dataset
        self.dir = os.path.join(data_dir, dataset)
        prepare = os.path.join(os.path.relpath(self.dir), "prepare.py")
        meta = os.path.join(self.dir, META)
        self.meta_path = meta if os.path.exists(meta) else None
        try:
            self.meta = load_meta(meta) if self.meta_path else {}
            dtype = meta_dtype(self.meta)
            import tokenizer  # here: tokenizer imports this module
            self.record = tokenizer.of_meta(self.meta)  # what checkpoints store of this data's tokenizer
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
            raise RunError(f"{meta} cannot be read ({e}); prepare dataset {dataset!r} again")
        self.bins = {}
        for split in ("train", "val"):
            path = os.path.join(self.dir, f"{split}.bin")
            if not os.path.exists(path):
                what = "does not exist" if not os.path.isdir(self.dir) else f"has no {split}.bin"
                ready = sorted(d for d in os.listdir(data_dir) if os.path.exists(os.path.join(data_dir, d, "val.bin")))
                hint = f"run: python {prepare}" if os.path.exists(prepare) else \
                    f"prepare it first (docs/data.md); prepared here: {', '.join(ready) or 'none'}"
                raise RunError(f"dataset {dataset!r} ({self.dir}) {what}; {hint}")
            # memmap keeps a 9 GB openwebtext bin on disk; opened once, not per batch
            if os.path.getsize(path) % dtype.itemsize:
                raise RunError(f"{path} is not a whole number of {dtype} ids; "
                               f"prepare dataset {dataset!r} again")
            # (an empty file cannot be mapped; check_data then says it is too short)
            self.bins[split] = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)

    def fingerprint(self):
        """{split: [size in bytes, a hash]} of the bins, cheap at any size: the hash is of FINGERPRINT_READS
        pieces of 4 KB spread over each file (a changed corpus changes the size or, almost always, some
        piece), not of a full read of a 54 GB openwebtext. Checkpoints store it; a resume compares."""
        out = {}
        for split in ("train", "val"):
            path = os.path.join(self.dir, f"{split}.bin")
            h, size = hashlib.blake2b(digest_size=8), os.path.getsize(path)
            with open(path, "rb") as f:
                for k in range(FINGERPRINT_READS):
                    f.seek(max(0, size - 4096) * k // (FINGERPRINT_READS - 1))
                    h.update(f.read(4096))
            out[split] = [size, h.hexdigest()]
        return out

    def tokenizer(self):
        """The record of this data's tokenizer (tokenizer.py), as checkpoints store it."""
        return self.record

    def tokens(self):
        """{split: number of tokens}, for checking block_size against the data up front."""
        return {split: len(b) for split, b in self.bins.items()}

    def vocab_size(self):
        """The char vocab's size from meta.pkl, or None for GPT-2 BPE data (the model's padded
        50304 then stands)."""
        if "itos" not in self.meta and self.meta.get("tokenizer") != "char":
            return None
        return self.meta["vocab_size"]

    def _rows(self, split, offsets, block_size):
        data = self.bins[split]  # configurator.check_data made sure it is longer than block_size
        chunk = data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
        import torch  # here, not at the top: data/prepare.py uses this module's format without torch
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
