"""
Tiny Shakespeare in GPT-2 BPE tokens, for fine-tuning GPT-2 (config/finetune_shakespeare.py): writes
train.bin and val.bin (uint16 token ids; the first 90% of the text for train, the rest for val).

The text is the one data/shakespeare_char ships (run data/shakespeare_char/prepare.py if it is
missing). With it: train 301,966 tokens, val 36,059 tokens.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for tokenizer.py
from dataset import write_bin  # noqa: E402
from tokenizer import gpt2_encoding  # noqa: E402

INPUT = os.path.join(HERE, "..", "shakespeare_char", "input.txt")

if __name__ == "__main__":
    if not os.path.exists(INPUT):
        sys.exit(f"error: {os.path.normpath(INPUT)} is missing; run python "
                 "data/shakespeare_char/prepare.py (it downloads the text)")
    with open(INPUT, encoding="utf-8") as f:
        text = f.read()
    n = len(text)
    enc = gpt2_encoding()
    for split, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        # GPT-2's 50257 ids fit in 16 bits
        ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
        write_bin(os.path.join(HERE, f"{split}.bin"), ids)
        print(f"{split} has {len(ids):,} tokens")
