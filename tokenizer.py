"""
Tokenizers: GPT-2 BPE (tiktoken) built offline from the files shipped in data/gpt2_bpe/, and the
character vocab that a char dataset's prepare writes to meta.pkl (and export.py, as
char_vocab.json, into an HF folder, so that the folder samples with its own vocab).
"""
import json
import os
from typing import Callable, NamedTuple, Optional

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from dataset import load_meta

BPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpt2_bpe")
CHAR_VOCAB = "char_vocab.json"  # {"itos": [one string per token id]}, beside an exported model
# the hashes tiktoken itself checks for these two files
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_gpt2 = None


def gpt2_encoding():
    """tiktoken's 'gpt2' encoding. The shipped files are byte-identical to what
    tiktoken.get_encoding('gpt2') downloads, so they come first: offline that call would
    only wait on the network and fail. get_encoding is the fallback if the files are gone."""
    global _gpt2
    if _gpt2 is None:
        encoder_json = os.path.join(BPE_DIR, "encoder.json")
        vocab_bpe = os.path.join(BPE_DIR, "vocab.bpe")
        if os.path.exists(encoder_json) and os.path.exists(vocab_bpe):
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
                                                    vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
            _gpt2 = tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                                      mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256})
        else:
            _gpt2 = tiktoken.get_encoding("gpt2")
    return _gpt2


def char_vocab(meta_path):
    """{id: char} from a dataset's meta.pkl, or None when the dataset is not character-level."""
    return load_meta(meta_path).get("itos") if meta_path and os.path.exists(meta_path) else None


def save_chars(itos, folder):
    """Write a character vocab as plain JSON into folder (an HF export)."""
    with open(os.path.join(folder, CHAR_VOCAB), "w", encoding="utf-8") as f:
        json.dump({"itos": [itos[i] for i in range(len(itos))]}, f, ensure_ascii=False)


class Codec(NamedTuple):
    encode: Callable[[str], list]  # text -> ids
    decode: Callable[[list], str]  # ids -> text
    token_bytes: Callable[[int], bytes]  # one id -> its bytes (a BPE token may hold part of a character)
    size: int  # ids below this decode to text
    eot: Optional[int]  # <|endoftext|>: GPT-2 BPE only


def get_codec(vocab_path=None):
    """The Codec of a char vocab (a meta.pkl that has one, or an export's char_vocab.json) when
    it exists, else GPT-2 BPE."""
    itos = None
    if vocab_path and vocab_path.endswith(".json") and os.path.exists(vocab_path):
        with open(vocab_path, encoding="utf-8") as f:
            itos = dict(enumerate(json.load(f)["itos"]))
    elif vocab_path:
        itos = char_vocab(vocab_path)
    if itos is not None:
        stoi = {c: i for i, c in itos.items()}
        return Codec(lambda s: [stoi[c] for c in s], lambda ids: "".join(itos[i] for i in ids),
                     lambda i: itos[i].encode("utf-8"), len(itos), None)
    enc = gpt2_encoding()
    return Codec(lambda s: enc.encode(s, allowed_special={ENDOFTEXT}), enc.decode, enc.decode_single_token_bytes,
                 enc.n_vocab, enc.eot_token)
