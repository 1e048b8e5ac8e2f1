"""
OpenWebText in GPT-2 BPE tokens, for training GPT-2 124M from scratch (config/train_gpt2.py):
data/openwebtext/{train,val}.bin, each document followed by <|endoftext|>, 0.05% of the documents
(seed 2357, as nanoGPT's split) in val. The full corpus is about 9B train tokens (~17 GB).

    python data/openwebtext/prepare.py               # through Hugging Face datasets
    python data/openwebtext/prepare.py --input=PATH  # local .parquet / .jsonl / .txt files

Through `datasets` (pip install datasets) the corpus is loaded by name, --hf_dataset (default
Skylion007/openwebtext), from Parquet: current datasets versions run no loading scripts, so the name
must be a Parquet dataset on the Hub (or a local folder of Parquet files). The download (~54 GB)
goes to the Hugging Face cache (HF_HOME); with HF_DATASETS_OFFLINE=1 only what is cached is used.
With --input the files are read as data/prepare.py reads them, and `datasets` is not needed.

Like data/prepare.py (whose machinery this is): shards, progress, a re-run goes on where an
interrupted one stopped, and the bins get their final names only when complete.
"""
import os
import sys
from types import SimpleNamespace

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [DATA, os.path.dirname(DATA)]  # data/prepare.py, and the repo root
import prepare as corpus  # noqa: E402  (data/prepare.py)
from configurator import configure  # noqa: E402


def from_hub(name, revision, field, num_proc):
    """The 'train' split of a Hugging Face dataset as a corpus.Rows source, or a PrepareError."""
    try:
        import datasets
    except ImportError:
        raise corpus.UsageError("loading OpenWebText by name needs Hugging Face datasets: pip "
                                "install datasets (or pass --input=PATH with local .parquet, "
                                ".jsonl or .txt files)")
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        table = datasets.load_dataset(name, split="train", revision=revision or None,
                                      num_proc=num_proc)
    except ConnectionError as e:  # offline, or no network: nothing in the cache for this name
        why = "HF_DATASETS_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise corpus.PrepareError(f"{name} is not in the Hugging Face cache "
                                  f"({datasets.config.HF_DATASETS_CACHE}) and {why} ({e}); "
                                  "download it on a machine with network access into that cache, "
                                  "or pass --input=PATH with local .parquet, .jsonl or .txt files")
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        raise corpus.PrepareError(f"{name} is a script dataset, which datasets "
                                  f"{datasets.__version__} cannot load; pass --hf_dataset= a "
                                  "Parquet copy, or --input= local files")
    except (FileNotFoundError, ValueError) as e:  # no such dataset, no 'train' split
        raise corpus.PrepareError(f"{name}: {e}")
    return corpus.Rows(name, field, table=table)


if __name__ == "__main__":
    knobs = dict(
        input="",  # local files instead of the Hub: a file, a folder or a glob (as data/prepare.py)
        hf_dataset="Skylion007/openwebtext",  # a Hub name (Parquet) or a local folder
        hf_revision="",  # a branch, tag or commit of a Hub hf_dataset (empty: the default branch)
        text_field="text",  # the column (or .jsonl field) holding the text
        num_proc=os.cpu_count() or 1,  # download processes and encoding threads
        shard_mb=32.0,
    )
    configure(knobs)
    k = SimpleNamespace(**knobs)
    def work():
        sources = corpus.find_sources(k.input, k.text_field) if k.input else \
            [from_hub(k.hf_dataset, k.hf_revision, k.text_field, k.num_proc)]
        corpus.prepare(sources, "openwebtext", "gpt2", val_fraction=0.0005, seed=2357,
                       num_proc=k.num_proc, shard_mb=k.shard_mb,
                       origin=corpus.origin_of(k.input) if k.input else k.hf_dataset,
                       keep=("prepare.py",))
    corpus.run(work)
