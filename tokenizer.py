"""
Tokenizers, and the record of one that a checkpoint carries so that it alone is enough to generate
from: GPT-2 BPE (tiktoken) built offline from the files shipped in data/gpt2_bpe/, and the
character vocab that a char dataset's prepare writes to meta.pkl (and export.py, as
char_vocab.json, into an HF folder, so that the folder samples with its own vocab).

The record (checkpoint key "tokenizer", plain data for weights_only loading):
  {"kind": "char", "itos": [one string per token id]}                       the vocab itself
  {"kind": "bpe", "name": "gpt2", "sha256": [vocab.bpe's, encoder.json's]}  a name and a fingerprint

A char dataset's vocab lives in its meta.pkl (the bin format itself is dataset.py's): read here
without running any pickled code (read_meta), and judged before it is used.
"""
import json
import os
import pickle
from typing import Callable, NamedTuple, Optional

from console import RunError
from keep.atomic import atomic_write

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BPE_DIR = os.path.join(DATA_DIR, "gpt2_bpe")
CHAR_VOCAB = "char_vocab.json"  # {"itos": [one string per token id]}, beside an exported model
# the hashes tiktoken itself checks for these two files
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENDOFTEXT = "<|endoftext|>"
GPT2 = {"kind": "bpe", "name": "gpt2", "sha256": [VOCAB_BPE_SHA256, ENCODER_JSON_SHA256]}
_gpt2 = None


def gpt2_encoding():
    """tiktoken's 'gpt2' encoding. The shipped files are byte-identical to what
    tiktoken.get_encoding('gpt2') downloads, so they come first: offline that call would
    only wait on the network and fail. get_encoding is the fallback if the files are gone."""
    global _gpt2
    # tiktoken is imported here: checkpoints are judged without it (tokenizer.problem)
    if _gpt2 is None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        encoder_json = os.path.join(BPE_DIR, "encoder.json")
        vocab_bpe = os.path.join(BPE_DIR, "vocab.bpe")
        if os.path.exists(encoder_json) and os.path.exists(vocab_bpe):
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe,
                                                    encoder_json_file=encoder_json,
                                                    vocab_bpe_hash=VOCAB_BPE_SHA256,
                                                    encoder_json_hash=ENCODER_JSON_SHA256)
            _gpt2 = tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                                      mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256})
        else:
            _gpt2 = tiktoken.get_encoding("gpt2")
    return _gpt2


def of_meta(meta):
    """The record of the tokenizer a dataset's meta.pkl describes (dataset.py: no itos means GPT-2
    BPE)."""
    itos = meta.get("itos")
    if itos is None:
        return GPT2
    try:
        return {"kind": "char", "itos": [itos[i] for i in range(len(itos))]}
    except (KeyError, TypeError):
        raise ValueError("its itos is not a vocab of ids 0, 1, 2, ...") from None


def of_file(path):
    """The record from a dataset's meta.pkl or an export's char_vocab.json; None when there is no
    file. Raises ValueError for a file that is not one."""
    if not path or not os.path.exists(path):
        return None
    # a dataset's meta.pkl: judged, in train.py's words (read_meta, below)
    if not path.endswith(".json"):
        try:
            return of_meta(read_meta(path))
        except RunError as e:
            raise ValueError(str(e)) from None
    try:
        with open(path, encoding="utf-8") as f:
            return {"kind": "char", "itos": list(json.load(f)["itos"])}
    except Exception as e:  # unreadable, not JSON, no itos: one line for the caller
        raise ValueError(f"{path} is not a vocab file ({type(e).__name__}: "
                         f"{str(e)[:100]})") from None


def problem(record, vocab_size):
    """What makes a checkpoint's tokenizer record unusable for a model of vocab_size ids, or
    None."""
    if not isinstance(record, dict) or record.get("kind") not in ("char", "bpe"):
        return "tokenizer is not a record of a char vocab or a BPE"
    if record["kind"] == "bpe":
        if record.get("name") != "gpt2" or record.get("sha256") != GPT2["sha256"]:
            return (f"tokenizer is the BPE {str(record.get('name'))[:40]!r} with other files than "
                    "GPT-2's, which this project has")
        return None
    itos = record.get("itos")
    if not (isinstance(itos, list) and itos and all(isinstance(s, str) and s for s in itos)
            and len(set(itos)) == len(itos)):
        return "tokenizer's char vocab is not a list of distinct strings"
    if len(itos) > vocab_size:
        return f"tokenizer's char vocab has {len(itos)} symbols, more than the model's {vocab_size}"
    return None


def changes(old, new):
    """How the tokenizer record `new` differs from `old`, in a few words, or None when it does
    not."""
    if old == new:
        return None
    if old["kind"] != new["kind"]:
        name = {"char": "a char vocab", "bpe": "GPT-2 BPE"}
        return f"{name[old['kind']]} before, {name[new['kind']]} now"
    a, b = old["itos"], new["itos"]
    now = {c: i for i, c in enumerate(b)}
    moved = [(c, i, now[c]) for i, c in enumerate(a) if c in now and now[c] != i]
    before = set(a)
    gone, added = [c for c in a if c not in now], [c for c in b if c not in before]
    said = [f"{len(moved)} symbol(s) have other ids "
            f"({', '.join(f'{c!r} {i} -> {j}' for c, i, j in moved[:3])})"
            if moved else "", f"not there now: {''.join(gone[:10])!r}" if gone else "",
            f"new: {''.join(added[:10])!r}" if added else ""]
    return "; ".join(s for s in said if s)


class Codec(NamedTuple):
    encode: Callable[[str], list]  # text -> ids
    decode: Callable[[list], str]  # ids -> text
    # one id -> its bytes (a BPE token may hold part of a character)
    token_bytes: Callable[[int], bytes]
    size: int  # ids below this decode to text
    eot: Optional[int]  # <|endoftext|>: GPT-2 BPE only
    has: Callable[[str], bool]  # whether text encodes (a char vocab lacks most characters)


def codec(record):
    """The Codec of a tokenizer record."""
    if record["kind"] == "char":
        itos = dict(enumerate(record["itos"]))
        stoi = {c: i for i, c in itos.items()}
        return Codec(lambda s: [stoi[c] for c in s], lambda ids: "".join(itos[i] for i in ids),
                     lambda i: itos[i].encode("utf-8"), len(itos), None,
                     lambda s: all(c in stoi for c in s))
    enc = gpt2_encoding()
    return Codec(lambda s: enc.encode(s, allowed_special={ENDOFTEXT}), enc.decode,
                 enc.decode_single_token_bytes, enc.n_vocab, enc.eot_token, lambda s: True)


def get_codec(vocab_path=None):
    """The Codec of a char vocab (a meta.pkl that has one, or an export's char_vocab.json) when
    it exists, else GPT-2 BPE."""
    return codec(of_file(vocab_path) or GPT2)


def save_chars(record, folder):
    """Write a character vocab as plain JSON into folder (an HF export)."""
    with open(os.path.join(folder, CHAR_VOCAB), "w", encoding="utf-8") as f:
        json.dump({"itos": record["itos"]}, f, ensure_ascii=False)


def default_prompt(c):
    """nanoGPT's prompt, a newline, when the vocab has it; else its first symbol (a dataset of files
    without newlines). Returns (prompt, why it is not a newline or None)."""
    if c.has("\n"):
        return "\n", None
    first = c.decode([0])
    return (first, "no --start given and the vocab has no newline: the prompt is its first symbol, "
                   f"{first!r}")


def of_checkpoint(ckpt, data_dir, where):
    """The tokenizer a checkpoint's model reads and writes: the checkpoint's own record; for a file
    written before checkpoints carried one (or by nanoGPT), its dataset's meta.pkl or, for a GPT-2
    sized vocab, GPT-2 BPE, with a note saying so. Returns (record, note or None); raises ValueError
    when there is nothing to go on (a small vocab and no meta.pkl): never a guess."""
    if ckpt.get("tokenizer") is not None:
        return ckpt["tokenizer"], None
    dataset = (ckpt.get("config") or {}).get("dataset") or ""
    meta = os.path.join(data_dir, dataset, "meta.pkl") if dataset else None
    record = of_file(meta)
    old = f"{where} carries no tokenizer (written by nanoGPT or an older version)"
    if record is not None and record["kind"] == "char":
        return record, f"note: {old}: using {meta}"
    if ckpt["model_args"]["vocab_size"] >= 50257:
        return (GPT2, f"note: {old}: its vocab of {ckpt['model_args']['vocab_size']} is GPT-2's, "
                      "so GPT-2 BPE")
    raise ValueError(f"{old}, and its model's vocab of {ckpt['model_args']['vocab_size']} tokens "
                     "is no GPT-2 BPE: it needs its dataset's meta.pkl "
                     f"({meta or 'no dataset named'}), which is not there")


# -----------------------------------------------------------------------------------------------
# meta.pkl: a dataset's vocab record

META = "meta.pkl"
GPT2_IDS = 50257  # GPT-2 BPE's ids: the bound on the ids of data with no char vocab


class _PlainUnpickler(pickle.Unpickler):
    # meta.pkl holds only dicts, lists, str and int, which unpickle without find_class;
    # anything that names a class or function is refused, so a planted file runs nothing.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl may hold plain "
                                     "data only")


def load_meta(path):
    """meta.pkl as it is, unjudged (read_meta judges it)."""
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def prepare_command(folder, meta=None):
    """What to run to prepare data/<name>/ again: its own prepare.py, else data/prepare.py with the
    input that meta.pkl records (when it can be read)."""
    own = os.path.join(folder, "prepare.py")
    if os.path.exists(own):
        return f"python {os.path.relpath(own)}"
    meta = meta if isinstance(meta, dict) else {}
    source = meta.get("source") if isinstance(meta.get("source"), str) and meta.get("source") \
        else "YOUR_FILES"
    char = " --tokenizer=char" if "itos" in meta or meta.get("tokenizer") == "char" else ""
    return (f"python {os.path.relpath(os.path.join(DATA_DIR, 'prepare.py'))} --input={source} "
            f"--dataset={os.path.basename(folder)}{char}")


def meta_problem(meta):
    """What makes meta.pkl's content unusable, as words that follow its path, or None."""
    if not isinstance(meta, dict):
        return f"is not a dict but a pickled {type(meta).__name__}"
    size = meta.get("vocab_size")
    if type(size) is not int or size < 1:
        return ("has no vocab_size" if size is None
                else f"has vocab_size {size!r}, not a whole number above 0")
    if meta.get("dtype", "uint16") not in ("uint16", "uint32"):
        return f"has dtype {meta['dtype']!r}, not uint16 or uint32"
    tokenizer = meta.get("tokenizer", "char" if "itos" in meta else None)
    if tokenizer == "gpt2" and "itos" not in meta:
        return (None if size == GPT2_IDS
                else f"says GPT-2 BPE but has vocab_size {size}, not {GPT2_IDS}")
    if "itos" not in meta:  # never taken for GPT-2 BPE: a model of 50304 ids trained on char ids
        return f"has vocab_size {size} but no itos (the char vocab's ids -> characters; GPT-2 " \
               f"BPE data says tokenizer 'gpt2')"
    if tokenizer != "char":
        return f"has tokenizer {tokenizer!r} and an itos; a char vocab says 'char'"
    itos = meta["itos"]
    if isinstance(itos, dict) and set(itos) == set(range(len(itos))):
        itos = [itos[i] for i in range(len(itos))]
    if not isinstance(itos, list) or not all(isinstance(c, str) for c in itos):
        return "has an itos that is not a vocab of ids 0, 1, 2, ... -> characters"
    if len(itos) != size:
        return f"has vocab_size {size} but its itos has {len(itos)} symbols"
    return None


def read_meta(path):
    """A dataset's meta.pkl, judged: its dict, or RunError saying in one line what is wrong with
    which file and what to run. The unpickler runs no code (a planted file is refused, not run)."""
    meta = None
    try:
        meta = load_meta(path)
        problem = meta_problem(meta)
    except Exception as e:  # not a pickle, truncated, or one that names code: the same one line
        problem = f"cannot be read as a pickle of plain data ({type(e).__name__}: {str(e)[:120]})"
    if problem:
        folder = os.path.dirname(os.path.abspath(path))
        raise RunError(f"{path} {problem}; prepare dataset {os.path.basename(folder)!r} again: "
                       f"{prepare_command(folder, meta)}")
    return meta


def save_meta(path, meta):
    atomic_write(path, lambda f: pickle.dump(meta, f))
