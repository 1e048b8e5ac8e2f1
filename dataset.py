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
A meta.pkl is judged before it is used (read_meta): not a dict, no vocab_size, a vocab_size without
its itos (never taken for GPT-2 BPE), an itos of another size, or ids in the bins at or past
vocab_size are each one RunError naming the file and the prepare.py to run again.

Why a pure function: the global batch of iteration t is drawn by a generator seeded with
(seed, t), and each rank takes its own slice of it. Resuming at iteration t then needs no loader
state, and 1 rank or 8 ranks (same global batch) see exactly the same sequences. Evaluation reads
fixed windows from the start of each split (window_rows), the same for every run of a dataset
whatever its seed or batch size, and never disturbs training.
"""
import hashlib
import os

import numpy as np

import tokenizer
from console import RunError
from keep.atomic import atomic_write
from tokenizer import DATA_DIR, GPT2_IDS, META, prepare_command, read_meta
TRAIN_STREAM = 0  # the training batches' generator stream
FINGERPRINT_READS = 64
# The bins' largest id is checked against the vocab when they are opened. A bin up to SCAN_ALL ids
# (256 MB of uint16, well under a second) is read whole; a bigger one (openwebtext's 9B-id train.bin
# would take a minute of reading at every start) is read in SCAN_PIECES pieces of 64K ids spread
# over it: a wrong vocab_size shows in any piece, as every id of a vocab turns up all through a
# corpus. Every batch drawn is checked too (TokenData._rows, a max over a few thousand ids), so an
# id the pieces missed still ends in the same one line, never an IndexError (or a CUDA assert) in
# the model.
SCAN_ALL, SCAN_PIECES, SCAN_PIECE = 1 << 27, 256, 1 << 16


def write_bin(path, ids):
    """A whole split's ids to path, whole or not at all. Written through Python's file object:
    ndarray.tofile's stdio buffer can lose the error of a write that failed (a full disk) and leave
    a short file with no word said."""
    atomic_write(path, lambda f: f.write(np.ascontiguousarray(ids).data))


def largest_id(ids):
    """The largest id of a bin: all of it up to SCAN_ALL ids, else SCAN_PIECES pieces spread over
    it."""
    if len(ids) <= SCAN_ALL:
        return max((int(ids[at:at + (1 << 24)].max()) for at in range(0, len(ids), 1 << 24)),
                   default=0)
    starts = np.linspace(0, len(ids) - SCAN_PIECE, SCAN_PIECES).astype(np.int64)
    return max(int(ids[a:a + SCAN_PIECE].max()) for a in starts)


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
        self.meta = read_meta(meta) if self.meta_path else {}
        dtype = meta_dtype(self.meta)
        self.limit = self.meta.get("vocab_size", GPT2_IDS)  # every id is below it
        # what checkpoints store of this data's tokenizer
        self.record = tokenizer.of_meta(self.meta)
        self.bins = {}
        for split in ("train", "val"):
            path = os.path.join(self.dir, f"{split}.bin")
            if not os.path.exists(path):
                what = "does not exist" if not os.path.isdir(self.dir) else f"has no {split}.bin"
                ready = sorted(d for d in os.listdir(data_dir)
                               if os.path.exists(os.path.join(data_dir, d, "val.bin")))
                hint = f"run: python {prepare}" if os.path.exists(prepare) else \
                    f"prepare it first (docs/data.md); prepared here: {', '.join(ready) or 'none'}"
                raise RunError(f"dataset {dataset!r} ({self.dir}) {what}; {hint}")
            # memmap keeps a 9 GB openwebtext bin on disk; opened once, not per batch
            if os.path.getsize(path) % dtype.itemsize:
                raise RunError(f"{path} is not a whole number of {dtype} ids; "
                               f"prepare dataset {dataset!r} again")
            # (an empty file cannot be mapped; check_data then says it is too short)
            self.bins[split] = (np.memmap(path, dtype=dtype, mode="r")
                                if os.path.getsize(path) else np.zeros(0, dtype))
            self._check_ids(split, largest_id(self.bins[split]))

    def _check_ids(self, split, top):
        if top >= self.limit:
            vocab = (f"the vocab of {self.limit} that {self.meta_path} records"
                     if self.meta_path else
                     f"GPT-2 BPE's {self.limit} ids (there is no meta.pkl)")
            raise RunError(f"{os.path.join(self.dir, split + '.bin')} holds id {top}, outside "
                           f"{vocab}; prepare dataset {self.name!r} again: "
                           f"{prepare_command(self.dir, self.meta)}")

    def fingerprint(self):
        """{split: [size in bytes, a hash]} of the bins, cheap at any size: the hash is of
        FINGERPRINT_READS pieces of 4 KB spread over each file (a changed corpus changes the size
        or, almost always, some piece), not of a full read of a 54 GB openwebtext. Checkpoints store
        it; a resume compares."""
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

    def windows(self, split, tokens, block_size):
        """How many eval windows the split's first `tokens` tokens make (0: the whole split),
        each of block_size scored tokens; at least one."""
        fit = (len(self.bins[split]) - 1) // block_size
        return fit if not tokens else max(1, min(fit, tokens // block_size))

    def window_rows(self, split, first, count, block_size):
        """Eval windows first .. first+count-1 of a split: window k's inputs are the tokens from
        k * block_size on, its targets the next ones. The same for every run of the dataset."""
        return self._rows(split, np.arange(first, first + count) * block_size, block_size)

    def _rows(self, split, offsets, block_size):
        data = self.bins[split]  # configurator.check_data made sure it is longer than block_size
        chunk = data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
        # what the scan's pieces of a big bin missed (SCAN_ALL)
        self._check_ids(split, int(chunk.max(initial=0)))
        # here, not at the top: data/prepare.py uses this module's format without torch
        import torch
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def _offsets(self, split, stream, seed, step, count, block_size):
        rng = np.random.default_rng([seed, stream, step])
        return rng.integers(0, len(self.bins[split]) - block_size, size=count)

    def train_batch(self, seed, it, micro_step, batch_size, block_size, accum_per_rank, rank=0,
                    world_size=1):
        """One rank's rows of iteration `it` for one micro-step. The whole global batch
        (batch_size * accum_per_rank * world_size rows) is drawn and sliced, so it does not
        depend on how the rows are split between ranks and micro-steps."""
        first = (rank * accum_per_rank + micro_step) * batch_size
        offsets = self._offsets("train", TRAIN_STREAM, seed, it,
                                batch_size * accum_per_rank * world_size, block_size)
        return self._rows("train", offsets[first:first + batch_size], block_size)
