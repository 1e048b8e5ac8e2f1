"""
Tiny Shakespeare at the character level: writes train.bin and val.bin (uint16 token ids, the
first 90% of the text for train, the rest for val) and meta.pkl (vocab_size, itos, stoi).

input.txt ships with the project so this runs offline; it is downloaded only if missing.
With the shipped file: vocab 65, train 1,003,854 tokens, val 111,540 tokens.
"""
import hashlib
import os
import sys

import numpy as np

# the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dataset import write_bin  # noqa: E402
from tokenizer import save_meta  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def fetch(path):
    """The shipped input.txt, or a download of it when it is missing; its hash is checked."""
    if not os.path.exists(path):
        import requests
        print(f"downloading {URL}")
        try:
            r = requests.get(URL, timeout=30)
            r.raise_for_status()
        except requests.RequestException as e:
            sys.exit(f"error: {path} is missing and the download failed ({e}); copy input.txt "
                     "there by hand")
        with open(path, "wb") as f:
            f.write(r.content)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        print(f"warning: {path} is not the standard tiny Shakespeare (sha256 {digest[:12]}...); "
              "using it anyway")


def prepare(text, out_dir):
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(text)
    splits = {"train": text[:int(n * 0.9)], "val": text[int(n * 0.9):]}
    for split, part in splits.items():
        write_bin(os.path.join(out_dir, f"{split}.bin"),
                  np.array([stoi[c] for c in part], dtype=np.uint16))
    save_meta(os.path.join(out_dir, "meta.pkl"),
              {"vocab_size": len(chars), "itos": itos, "stoi": stoi})
    return len(chars), len(splits["train"]), len(splits["val"])


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    input_path = os.path.join(here, "input.txt")
    fetch(input_path)
    with open(input_path, encoding="utf-8") as f:
        text = f.read()
    vocab, n_train, n_val = prepare(text, here)
    print(f"vocab size: {vocab:,}")
    print(f"train has {n_train:,} tokens")
    print(f"val has {n_val:,} tokens")
