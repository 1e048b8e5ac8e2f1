"""
Your own text -> data/<dataset>/, which `python train.py --dataset=<dataset>` trains on.

    python data/prepare.py --input=PATH --dataset=NAME [--tokenizer=gpt2|char]
    python data/prepare.py --dataset=NAME --check      # counts, the val fraction, decoded windows

--input is a file, a folder, or a glob ('corpus/**/*.txt', quoted). A .jsonl file holds one
document per non-blank line (its text in --text_field, default "text"), a .parquet file one per row
(the same field); any other file is one plain-text document (UTF-8; bytes that are not become
U+FFFD, with a warning). A folder contributes every .txt, .jsonl and .parquet file under it; files
are taken in sorted path order.

GPT-2 BPE (the default) puts <|endoftext|> after every document; --tokenizer=char builds the
vocabulary from the corpus's characters and writes it to meta.pkl, documents back to back.
--val_fraction of the documents (at least one; --seed picks them) go to val.bin, whole: a document
is never cut in two. With fewer documents than 1/val_fraction (one long text, say) whole documents
would give val more than its share, so val is instead the last val_fraction of the tokens, by
position, as nanoGPT splits one text. The bin format is dataset.py's (uint16, uint32 for a vocab
above 65,536).

Work is done in shards of about --shard_mb of text, encoded on --num_proc threads. After each shard
the ids are on disk (train.bin.partial, val.bin.partial) and prepare.json records it, so an
interrupted prepare, run again with the same command, goes on after the last finished shard; the
bins get their final names only when all shards are done. Memory does not grow with the corpus.
data/openwebtext/prepare.py uses the same machinery.
"""
import glob
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repo root holds dataset.py, tokenizer.py
from keep.atomic import atomic_write  # noqa: E402
from dataset import DATA_DIR, META, TokenData, bin_dtype  # noqa: E402
from tokenizer import save_meta  # noqa: E402

MANIFEST = "prepare.json"
FORMAT = 1  # of prepare.json: a different one means start over
PIECE = 1 << 20  # a big text file is encoded in pieces of about this many bytes
KINDS = (".txt", ".jsonl", ".parquet")  # what a folder contributes
GPT2_VOCAB = 50257


class PrepareError(Exception):
    """A problem with the input or the disk: one line, exit 1."""


class UsageError(PrepareError):
    """The command is wrong: one line, exit 2."""


# -----------------------------------------------------------------------------------------------
# Sources: each yields (position after, text, document ends here) from a position, so that a
# re-run can start where the last finished shard ended. A position is a byte offset (text, JSON
# lines) or a row number (Parquet, a Hugging Face dataset).

def _safe_cut(buf, start):
    """The last i >= start at which buf may be cut (buf[:i], buf[i:]) without changing its GPT-2
    ids, or None. That is before a '\n' followed by printable, non-space ASCII: the pre-tokenizer
    makes that '\n' a piece of its own (whitespace never joins the letter, digit or symbol after
    it), and what comes before it (text, or whitespace that ends the text) is split the same either
    way. A '\r\n' is cut between the two, so CRLF files get pieces too."""
    i = buf.rfind(b"\n", max(start, 1), len(buf) - 1)
    while i >= max(start, 1):
        if 0x21 <= buf[i + 1] <= 0x7E:
            return i
        i = buf.rfind(b"\n", max(start, 1), i)
    return None


class TextFile:
    """One plain-text document, read in pieces of about PIECE bytes."""

    def __init__(self, path):
        self.path = path
        self.warned = False

    def count(self):
        return 1

    def _decode(self, buf):
        try:
            return buf.decode("utf-8")
        except UnicodeDecodeError as e:
            if not self.warned:
                tqdm.write(f"warning: {self.path} is not UTF-8 (byte {e.start}); such bytes become "
                           "U+FFFD", file=sys.stderr)
                self.warned = True
            return buf.decode("utf-8", errors="replace")

    def read(self, pos):
        with open(self.path, "rb") as f:
            f.seek(pos)
            buf = bytearray()
            while True:
                more = f.read(PIECE)
                seen = max(0, len(buf) - 1)  # where this read's new bytes begin to matter for a cut
                buf += more
                if pos == 0 and buf.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not text
                    del buf[:3]
                    pos = 3
                if len(more) < PIECE:
                    yield pos + len(buf), self._decode(bytes(buf)), True
                    return
                cut = _safe_cut(buf, seen)
                if cut:  # (none yet: a line longer than a piece; read on)
                    pos += cut
                    yield pos, self._decode(bytes(buf[:cut])), False
                    del buf[:cut]


def _field(record, field):
    """record's text (a null text is an empty document), or ValueError saying what is wrong."""
    if not isinstance(record, dict) or field not in record:
        fields = (", ".join(map(repr, record))
                  if isinstance(record, dict) else f"a JSON {type(record).__name__}")
        raise ValueError(f"has no text field {field!r} (it has {fields}); pass --text_field=NAME")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"has {field!r} as a JSON {type(text).__name__}, not text")
    return text or ""


class JsonLines:
    """One document per non-blank line: a JSON object with the text in `field`."""

    def __init__(self, path, field):
        self.path, self.field = path, field

    def count(self):
        n = 0
        with open(self.path, "rb") as f:
            for line in f:
                n += not line.isspace() and bool(line)
        return n

    def _line_number(self, pos):  # for an error message only: it reads the file up to pos
        with open(self.path, "rb") as f:
            return f.read(pos).count(b"\n") + 1

    def read(self, pos):
        with open(self.path, "rb") as f:
            f.seek(pos)
            for line in f:
                at, pos = pos, pos + len(line)
                if line.isspace():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise PrepareError(f"{self.path}, line {self._line_number(at)}: not a JSON "
                                       f"line ({e})")
                try:
                    text = _field(record, self.field)
                except ValueError as e:
                    raise PrepareError(f"{self.path}, line {self._line_number(at)} {e}")
                yield pos, text, True


class Rows:
    """One document per row of a table: a Parquet file, or a Hugging Face datasets.Dataset."""

    def __init__(self, name, field, table=None):
        self.path, self.field, self.table = name, field, table
        if table is None:  # a Parquet file: pyarrow reads it a batch of rows at a time
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PrepareError(f"{name} is Parquet, which needs pyarrow: pip install pyarrow")
            try:
                self.parquet = pq.ParquetFile(name)
            except Exception as e:  # pyarrow's own errors for a damaged or foreign file
                raise PrepareError(f"{name} cannot be read as Parquet ({e})")
            columns = self.parquet.schema_arrow.names
        else:
            columns = table.column_names
        if field not in columns:
            raise PrepareError(f"{name} has no column {field!r} (it has "
                               f"{', '.join(map(repr, columns))}); pass --text_field=NAME")

    def count(self):
        return self.parquet.metadata.num_rows if self.table is None else len(self.table)

    def _batches(self, pos):
        """(first row, list of texts) from the batch holding row pos on."""
        if self.table is not None:
            for start in range(pos, len(self.table), 1024):
                yield start, self.table[start:start + 1024][self.field]
            return
        row = 0
        for group in range(self.parquet.num_row_groups):
            n = self.parquet.metadata.row_group(group).num_rows
            if row + n > pos:
                for batch in self.parquet.iter_batches(batch_size=1024, row_groups=[group],
                                                       columns=[self.field]):
                    yield row, batch.column(0).to_pylist()
                    row += batch.num_rows
            else:
                row += n

    def read(self, pos):
        for first, texts in self._batches(pos):
            for i, text in enumerate(texts[max(0, pos - first):], start=max(pos, first)):
                if text is not None and not isinstance(text, str):
                    raise PrepareError(f"{self.path}, row {i}: {self.field!r} is "
                                       f"{type(text).__name__}, not text")
                yield i + 1, text or "", True


def find_sources(spec, field):
    """The sources an --input names, in sorted path order."""
    spec = os.path.expanduser(spec)  # '--input=~/corpus': the shell leaves that ~ alone
    if os.path.isdir(spec):
        paths, skipped = [], 0
        for folder, dirs, files in os.walk(spec):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                if name.endswith(KINDS):
                    paths.append(os.path.join(folder, name))
                else:
                    skipped += 1
        if not paths:
            raise UsageError(f"--input={spec!r}: no .txt, .jsonl or .parquet files in that folder")
        if skipped:
            print(f"{len(paths)} file{'s' * (len(paths) != 1)} in {spec} ({skipped} "
                  f"other{'s' * (skipped != 1)} skipped: only .txt, .jsonl and .parquet are read)")
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        if not paths:
            what = "matches no file" if glob.has_magic(spec) else "does not exist"
            raise UsageError(f"--input={spec!r} {what}")
    sources = []
    for p in sorted(set(paths)):
        sources.append(JsonLines(p, field) if p.endswith(".jsonl") else
                       Rows(p, field) if p.endswith(".parquet") else TextFile(p))
    return sources


def fingerprint(sources):
    """A digest of what the inputs are, cheaply: paths, sizes and modification times (a Hugging Face
    dataset's own fingerprint). A re-run with another digest starts over."""
    out = []
    for s in sources:
        if getattr(s, "table", None) is not None:
            # not its name: a path may be relative
            out.append([getattr(s.table, "_fingerprint", None), len(s.table)])
        else:
            st = os.stat(s.path)
            out.append([os.path.abspath(s.path), st.st_size, st.st_mtime_ns])
    return f"{len(out)} inputs, sha256 " + hashlib.sha256(json.dumps(out).encode()).hexdigest()


# -----------------------------------------------------------------------------------------------
# Tokenizers: text -> uint32 ids as numpy, with no Python list in between

def gpt2_encoder():
    from tokenizer import gpt2_encoding
    enc = gpt2_encoding()

    def encode(text):
        try:  # encode_to_numpy with nothing special: encode_ordinary's ids, without a list of ints
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            # a lone surrogate (JSON can hold one): as tiktoken's own fallback
            return enc.encode_to_numpy(
                text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"),
                disallowed_special=())
    return encode, enc.eot_token, enc.n_vocab


def _code_points(text):
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


# lone halves of UTF-16 pairs (JSON can hold them): U+FFFD, as tiktoken does
SURROGATES = slice(0xD800, 0xE000)


def char_encoder(chars):
    """ids are the ranks of the corpus's characters in code point order (as shakespeare_char)."""
    points = np.array([ord(c) for c in chars], dtype=np.int64)
    table = np.full(0x110000, -1, dtype=np.int64)
    table[points] = np.arange(len(points))
    table[SURROGATES] = table[0xFFFD]

    def encode(text):
        return table[_code_points(text)].astype(np.uint32)
    return encode, None, len(chars)


def corpus_chars(sources, total):
    """Every character the corpus holds, sorted: a pass over all of it."""
    seen = np.zeros(0x110000, dtype=bool)
    with tqdm(total=total, unit="doc", desc="vocab", file=sys.stderr) as bar:
        for s in sources:
            for _, text, end in s.read(0):
                seen[_code_points(text)] = True
                bar.update(end)
    if seen[SURROGATES].any():
        seen[SURROGATES], seen[0xFFFD] = False, True
    return "".join(map(chr, np.flatnonzero(seen)))


# -----------------------------------------------------------------------------------------------
# The sharded, resumable writer

def by_position(n_docs, fraction):
    """Whether val is cut by position: when its share is less than one whole document (fewer than
    1/fraction documents), taking a whole one would give val far more than asked (one of three
    novels is a third of the data, not a tenth), and one document cannot be split by documents at
    all."""
    return n_docs * fraction < 1


def val_documents(n_docs, fraction, seed):
    """The sorted indices of the val documents: round(fraction * n_docs) of them, at least one (none
    when val is cut by position)."""
    if by_position(n_docs, fraction):
        return np.zeros(0, dtype=np.int64)
    n_val = min(n_docs - 1, max(1, round(fraction * n_docs)))
    return np.sort(np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False))


def _percent(fraction):
    return f"{fraction * 100:g}%"


def cut_by_position(files, n, fraction, itemsize):
    """Move the last `fraction` of the n ids written to train.bin.partial into val.bin.partial
    (which holds none): at least one id, at most all but one. Returns the val count. Done again from
    the start if interrupted: train.bin.partial is cut short only after val.bin.partial holds the
    tail, and a re-run that finds it short starts over."""
    if n < 2:
        raise PrepareError(f"the input has {n} token{'s' * (n != 1)}: too little text to split "
                           "into train and val")
    n_val = min(n - 1, max(1, round(fraction * n)))
    train, val = files["train"], files["val"]
    train.seek((n - n_val) * itemsize)
    while True:  # in pieces: a long text's tail need not fit in memory
        piece = train.read(64 << 20)
        if not piece:
            break
        val.write(piece)
    val.flush()
    os.fsync(val.fileno())  # the tail is on disk before train.bin.partial loses it
    train.truncate((n - n_val) * itemsize)
    train.flush()
    os.fsync(train.fileno())
    return n_val


def _encode_group(pieces, encode, eot, dtype):
    """One thread's share of a shard: (train ids, val ids)."""
    out = {False: [], True: []}
    tail = np.array([eot] if eot is not None else [], dtype=np.uint32)
    for text, is_val, end in pieces:
        out[is_val].append(encode(text))
        if end:
            out[is_val].append(tail)
    return tuple(np.concatenate(out[v]).astype(dtype) if out[v] else np.zeros(0, dtype)
                 for v in (False, True))


def _split(pieces, k):
    """pieces in up to k runs of about equal text, in order."""
    sizes = np.cumsum([len(p[0]) for p in pieces])
    bounds = [0, *np.searchsorted(sizes, sizes[-1] * np.arange(1, k) / k, side="right").tolist(),
              len(pieces)]
    return [pieces[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _save_manifest(path, state):
    atomic_write(path, lambda f: f.write(json.dumps(state).encode()))


def _done(state):
    """The last finished shard: where the next one starts, and the ids so far."""
    return (state["shards"][-1]
            if state["shards"] else dict(source=0, pos=0, documents=0, train=0, val=0))


def _tokens(state):
    """{split: ids} of a finished prepare (recorded once val is cut by position), else of its last
    shard."""
    return state.get("tokens") or _done(state)


def _dtype(state):
    return bin_dtype(len(state["chars"]) if state["chars"] is not None else GPT2_VOCAB)


def _usable_state(out, key, keep):
    """The manifest's state when this prepare may go on from it (or is done), else None, saying
    why."""
    ours = ("train.bin", "val.bin", META, MANIFEST, "train.bin.partial", "val.bin.partial", *keep)
    foreign = sorted(f for f in (os.listdir(out) if os.path.isdir(out) else [])
                     if f not in ours and f[0] != ".")
    manifest = os.path.join(out, MANIFEST)
    if foreign or (not os.path.exists(manifest) and os.path.exists(os.path.join(out, "train.bin"))):
        names = ", ".join(foreign[:3]) + ", ..." * (len(foreign) > 3) or "train.bin"
        raise PrepareError(f"{out} holds files that data/prepare.py did not make ({names}); "
                           f"choose another --dataset, or remove them")
    try:
        with open(manifest) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # written atomically, so not a torn file: someone else's
        print(f"{manifest} cannot be read: preparing again from the start")
        return None
    changed = [k for k in key if (state.get("key") or {}).get(k) != key[k]]
    if changed:
        print(f"{' and '.join(changed)} differ from the last prepare's: "
              f"preparing {os.path.basename(out)} again from the start")
        return None
    size = _dtype(state).itemsize
    if state["complete"]:
        bins = {split: os.path.join(out, f"{split}.bin") for split in ("train", "val")}
        if all(os.path.exists(p) and os.path.getsize(p) == _tokens(state)[split] * size
               for split, p in bins.items()):
            return state
        print(f"{out}'s bins are missing or not the size {MANIFEST} records: preparing again from "
              "the start")
        return None
    done = _done(state)
    for split in ("train", "val"):
        path = os.path.join(out, f"{split}.bin.partial")
        if (os.path.getsize(path) if os.path.exists(path) else 0) < done[split] * size:
            print(f"{path} is missing or shorter than the {len(state['shards'])} finished shards: "
                  f"preparing again from the start")
            return None
    return state


def prepare(sources, name, tokenizer="gpt2", val_fraction=0.1, seed=1337, num_proc=1, shard_mb=32.0,
            origin="", data_dir=DATA_DIR, keep=()):
    """sources -> data_dir/name/{train,val}.bin and meta.pkl. Returns the finished manifest.
    keep: files of data_dir/name/ other than its own that it leaves alone (a dataset's
    prepare.py)."""
    out = os.path.join(data_dir, name)
    manifest = os.path.join(out, MANIFEST)
    finals = [os.path.join(out, f) for f in ("train.bin", "val.bin", META)]
    partial = {split: os.path.join(out, f"{split}.bin.partial") for split in ("train", "val")}
    # what the bins depend on (threads and shard size change nothing in them)
    key = dict(format=FORMAT, inputs=fingerprint(sources), tokenizer=tokenizer,
               val_fraction=val_fraction, seed=seed, text_field=getattr(sources[0], "field", None))
    state = _usable_state(out, key, keep)
    if state is not None and state["complete"]:
        print(f"{out} is already prepared from these inputs ({state['documents']:,} documents, "
              f"train {_tokens(state)['train']:,} tokens, val {_tokens(state)['val']:,}); nothing "
              "to do")
        return state
    if state is None:  # plan: count the documents (and, for char, collect the vocab) once
        empty = [s.path for s in sources if getattr(s, "table", None) is None
                 and os.path.getsize(s.path) == 0]
        # (an empty file among others is an empty document, as a null text is)
        if len(empty) == len(sources):
            raise PrepareError(f"{', '.join(empty[:3])}{', ...' * (len(empty) > 3)} "
                               f"{'is' if len(empty) == 1 else 'are'} empty: there is nothing to "
                               "prepare")
        n_docs = sum(s.count() for s in sources)
        if n_docs == 0:
            raise PrepareError("the input has no documents (only blank lines or no rows)")
        chars = corpus_chars(sources, n_docs) if tokenizer == "char" else None
        if chars == "":
            raise PrepareError("the input has no text: every document is empty")
        os.makedirs(out, exist_ok=True)
        for p in finals + list(partial.values()):
            if os.path.exists(p):
                os.remove(p)
        state = dict(key=key, documents=n_docs, chars=chars, shards=[], complete=False)
        _save_manifest(manifest, state)
    else:
        print(f"resuming: {len(state['shards'])} shards done ({state['shards'][-1]['documents']:,} "
              f"of {state['documents']:,} documents)" if state["shards"]
              else "resuming from the first shard")

    encode, eot, vocab_size = (gpt2_encoder()
                               if tokenizer == "gpt2" else char_encoder(state["chars"]))
    dtype = _dtype(state)
    val_docs = val_documents(state["documents"], val_fraction, seed)
    done = _done(state)
    files = {}
    # drop whatever an interrupted shard left after the last finished one
    for split, path in partial.items():
        files[split] = open(path, "r+b" if os.path.exists(path) else "wb")
        files[split].truncate(done[split] * dtype.itemsize)
        files[split].seek(0, os.SEEK_END)
    doc, counts = done["documents"], {"train": done["train"], "val": done["val"]}
    next_val = int(np.searchsorted(val_docs, doc))
    shard_chars = int(shard_mb * 2**20)
    started, new_tokens = time.time(), 0
    bar = tqdm(total=state["documents"], initial=doc, unit="doc", desc=name, file=sys.stderr,
               smoothing=0.1)
    try:
        with ThreadPoolExecutor(num_proc) as pool:
            def finish(shard):
                """Wait for a shard's ids, append them, fsync, then record the shard as done."""
                nonlocal new_tokens
                futures, where = shard
                for split, k in (("train", 0), ("val", 1)):
                    f = files[split]
                    try:
                        for fut in futures:
                            ids = fut.result()[k]
                            # not ndarray.tofile, whose stdio buffer loses a failed write's error
                            f.write(ids.data)
                            counts[split] += len(ids)
                            new_tokens += len(ids)
                        f.flush()
                        os.fsync(f.fileno())
                    except OSError as e:
                        raise OSError(e.errno, e.strerror, f.name) from e
                    # trust, but check
                    if os.fstat(f.fileno()).st_size != counts[split] * dtype.itemsize:
                        raise PrepareError(f"{f.name} is shorter than what was written to it; is "
                                           "the disk full?")
                state["shards"].append(dict(where, **counts))
                _save_manifest(manifest, state)
                bar.update(where["documents"] - bar.n)
                bar.set_postfix_str(f"{new_tokens / max(time.time() - started, 1e-9):,.0f} "
                                    "tokens/s")

            # A shard is encoded while the next one is read and the one before is written: the
            # threads never wait for the disk or for this loop.
            pieces, size, pending = [], 0, None
            for (src, pos), text, end in _stream(sources, done["source"], done["pos"]):
                is_val = next_val < len(val_docs) and val_docs[next_val] == doc
                pieces.append((text, is_val, end))
                size += len(text)
                if end:
                    doc += 1
                    next_val += is_val
                if size >= shard_chars or doc == state["documents"]:
                    # more runs than threads: one that ends early takes the next, none sits idle
                    runs = _split(pieces, 4 * num_proc)
                    futures = [pool.submit(_encode_group, run, encode, eot, dtype) for run in runs]
                    if pending:
                        finish(pending)
                    pending = futures, dict(source=src, pos=pos, documents=doc)
                    pieces, size = [], 0
            if pending:
                finish(pending)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if eot is not None and counts["train"] + counts["val"] == state["documents"]:
        raise PrepareError("the input has no text: every document is empty")
    if doc != state["documents"]:
        raise PrepareError(f"the inputs changed while being read: {doc:,} documents, not "
                           f"{state['documents']:,}; run the command again")
    position = by_position(state["documents"], val_fraction)
    if position:
        with open(partial["train"], "r+b") as train, open(partial["val"], "r+b") as val:
            val.truncate(0)
            n_val = cut_by_position(dict(train=train, val=val), counts["train"], val_fraction,
                                    dtype.itemsize)
        counts = {"train": counts["train"] - n_val, "val": n_val}
        n = state["documents"]
        print(f"one document: val is its last {_percent(val_fraction)} by position "
              f"({n_val:,} tokens)" if n == 1 else
              f"{n} documents, fewer than 1/val_fraction={1 / val_fraction:g}: val is the last "
              f"{_percent(val_fraction)} of the tokens by position ({n_val:,} tokens)")
    meta = dict(vocab_size=vocab_size, dtype=dtype.name, tokenizer=tokenizer,
                documents=state["documents"], val_documents=len(val_docs),
                tokens=dict(train=counts["train"], val=counts["val"]),
                split="position" if position else "documents", val_fraction=val_fraction, seed=seed,
                source=origin)
    if tokenizer == "char":
        meta["itos"] = dict(enumerate(state["chars"]))
        meta["stoi"] = {c: i for i, c in enumerate(state["chars"])}
    save_meta(finals[2], meta)
    # train.bin last: TokenData needs both, so a half-renamed pair is never read
    for split in ("val", "train"):
        os.replace(partial[split], os.path.join(out, f"{split}.bin"))
    state["complete"], state["tokens"] = True, counts
    _save_manifest(manifest, state)
    seconds = time.time() - started
    in_val = "val by position" if position else f"{len(val_docs):,} in val"
    print(f"{name}: {state['documents']:,} document{'s' * (state['documents'] != 1)} ({in_val}), "
          f"train {counts['train']:,} tokens, val {counts['val']:,} "
          f"({counts['val'] / max(1, counts['train'] + counts['val']):.2%}), {dtype.name}, vocab "
          f"{vocab_size:,}; {new_tokens / max(seconds, 1e-9):,.0f} tokens/s")
    return state


def _stream(sources, first, pos):
    """((source, position) to resume after this piece, text, document ends) from a resume point."""
    for i in range(first, len(sources)):
        pieces = sources[i].read(pos if i == first else 0)
        ahead = next(pieces, None)
        while ahead is not None:
            after, text, end = ahead
            ahead = next(pieces, None)
            yield ((i, after) if ahead is not None else (i + 1, 0)), text, end


# -----------------------------------------------------------------------------------------------
# --check: see the data before spending GPU hours on it

def check_dataset(name, windows=3, window_tokens=64, seed=0):
    data = TokenData(name)
    meta = data.meta
    from tokenizer import get_codec
    codec = get_codec(data.meta_path)  # BPE when meta.pkl holds no char vocab
    bpe = codec.eot is not None
    print(f"{data.dir}: {data.bins['train'].dtype}, "
          f"{'GPT-2 BPE' if bpe else f'characters, vocab {codec.size:,}'}"
          + (f", {meta['documents']:,} documents ("
             + ("val by position" if meta.get("split") == "position" else
                f"{meta['val_documents']:,} in val") + ")"
             if "documents" in meta else ""))
    rng = np.random.default_rng(seed)
    total = sum(len(b) for b in data.bins.values())
    for split, ids in data.bins.items():
        top, eots = 0, 0
        for at in range(0, len(ids), 1 << 24):  # a pass in chunks: memory stays flat on a 17 GB bin
            chunk = np.asarray(ids[at:at + (1 << 24)])
            top = max(top, int(chunk.max(initial=0)))
            eots += int(np.count_nonzero(chunk == codec.eot)) if bpe else 0
        recorded = meta.get("tokens", {}).get(split)
        if recorded is not None and recorded != len(ids):
            raise PrepareError(f"{split}.bin of {name!r} holds {len(ids):,} tokens, but meta.pkl "
                               f"records {recorded:,}; prepare it again")
        print(f"{split}: {len(ids):,} tokens ({len(ids) / max(total, 1):.2%})"
              + (f", {eots:,} <|endoftext|>" if bpe else "") + f", largest id {top:,}")
        if top >= codec.size:
            raise PrepareError(f"{split}.bin of {name!r} holds id {top:,}, outside its vocab of "
                               f"{codec.size:,}; prepare it again")
    # after the counts, so that a window is all that a frame holds
    for split, ids in data.bins.items():
        for _ in range(windows if len(ids) else 0):
            at = int(rng.integers(0, max(1, len(ids) - window_tokens)))
            text = codec.decode([int(t) for t in ids[at:at + window_tokens]])
            print(f"--- {split} tokens {at:,}-{min(len(ids), at + window_tokens):,} ---\n{text}")
    print("---")


# -----------------------------------------------------------------------------------------------
# the command line (configurator.py: --key=value, checked once)

def origin_of(spec):
    """--input as meta.pkl records it: a full path (a glob stays a pattern)."""
    return os.path.abspath(os.path.expanduser(spec))


def run(work):
    """work(), with every way it can fail as one line: exit 2 for a wrong command, 1 otherwise."""
    from console import RunError, fail
    try:
        work()
    except UsageError as e:
        fail(str(e))
    except (PrepareError, RunError) as e:
        # RunError: dataset.TokenData's word on a dataset --check reads
        sys.exit(f"error: {e}")
    except OSError as e:
        # a full disk, a file that cannot be read: what is on disk resumes with the same command
        sys.exit(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; "
                 f"finished shards are kept: run the same command again to go on")
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept: run the same command again to go on",
              file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    from configurator import configure
    from console import fail
    knobs = dict(  # a dict, not globals, so that this module's constants are no knobs
        input="",  # a file, a folder or a glob (see above)
        dataset="",  # the name: data/<dataset>/, and train.py --dataset=<dataset>
        tokenizer="gpt2",  # 'gpt2' (BPE, <|endoftext|> after each document) or 'char'
        text_field="text",  # the field holding the text in .jsonl and .parquet files
        val_fraction=0.1,  # of the documents, whole (by position, under 1/val_fraction documents)
        seed=1337,  # which documents go to val
        num_proc=os.cpu_count() or 1,  # threads encoding a shard
        shard_mb=32.0,  # text per shard: the work a re-run may have to redo, and the memory in use
        check=False,  # print counts, val fraction, decoded windows (after preparing, with --input)
        windows=3,  # random windows --check decodes per split
    )
    configure(knobs)
    k = SimpleNamespace(**knobs)
    if not 0 < k.val_fraction < 1:
        fail(f"val_fraction={k.val_fraction!r} must be between 0 and 1 (the share of documents "
             "that go to val)")
    if not k.input and not k.check:
        fail("give --input=PATH (a file, folder or glob of .txt, .jsonl or .parquet) and "
             "--dataset=NAME")
    if (not k.dataset.replace("-", "").replace("_", "").replace(".", "").isalnum()
            or k.dataset.startswith(".")):
        fail(f"dataset={k.dataset!r} must be a plain folder name (letters, digits, '-', '_', '.'): "
             "data/<dataset>/")
    def work():
        if k.input:
            prepare(find_sources(k.input, k.text_field), k.dataset, k.tokenizer, k.val_fraction,
                    k.seed, k.num_proc, k.shard_mb, origin=origin_of(k.input))
            print(f"train on it: python train.py --dataset={k.dataset}")
        if k.check:
            check_dataset(k.dataset, k.windows)
    run(work)
