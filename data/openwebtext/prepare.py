"""
OpenWebText in GPT-2 BPE tokens, for training GPT-2 124M from scratch (config/train_gpt2.py): writes
train.bin (~9B tokens, ~17 GB) and val.bin (~4M tokens, ~8.5 MB) as uint16 token ids, each document
followed by <|endoftext|>. The split is nanoGPT's (test_size 0.0005, seed 2357), so losses compare.

    pip install datasets        # not in requirements.txt: only this script needs it
    python data/openwebtext/prepare.py

The download is ~54 GB in the Hugging Face cache (HF_HOME); expect an hour or more on 8 cores.
"""
import os
import sys

import numpy as np
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for tokenizer.py
from tokenizer import gpt2_encoding  # noqa: E402

EOT = 50256  # <|endoftext|>
num_proc = max(1, os.cpu_count() or 1)  # download processes and tokenizer threads
batch_docs = 4096  # documents per shard: tokenized together on all cores, then written at once


def write_bin(batches, path, total=None):
    """Tokenize shards of documents (each a list of str), every document followed by <|endoftext|>,
    and write all their ids to path as one uint16 array, shard after shard with a progress bar.
    Appending needs no first pass to count the tokens (nanoGPT's memmap does), the ids of a 17 GB
    split are never all in memory, and tiktoken's threads encode a shard on every core. A crash
    leaves no half-written path behind: the file gets its name only when it is complete."""
    enc = gpt2_encoding()
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for texts in tqdm(batches, total=total, desc=f"writing {os.path.basename(path)}"):
            ids = enc.encode_ordinary_batch(list(texts), num_threads=num_proc)
            chunk = np.concatenate([np.array(doc + [EOT], dtype=np.uint16) for doc in ids])
            chunk.tofile(f)
            n += len(chunk)
    os.replace(tmp, path)
    return n


if __name__ == "__main__":
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: this script needs Hugging Face datasets: pip install datasets")
    dataset = load_dataset("openwebtext", num_proc=num_proc)  # 8,013,769 documents, one 'train' split
    split = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    for name, docs in (("train", split["train"]), ("val", split["test"])):
        shards = (b["text"] for b in docs.iter(batch_size=batch_docs))
        n = write_bin(shards, os.path.join(HERE, f"{name}.bin"), total=-(-len(docs) // batch_docs))
        print(f"{name} has {n:,} tokens")
