"""
The multiple-choice tasks, their data and their text exactly as lm-evaluation-harness 0.4 makes
it (its task YAMLs and utils.py; docs/evals.md): each example becomes (context, continuation)
pairs, one per choice, and the index of the right one.

- hellaswag: the query "activity_label: ctx_a Ctx_b" and each ending, cleaned of WikiHow's
  bracket artifacts; acc and acc_norm.
- piqa: "Question: goal\\nAnswer:" and " sol1" / " sol2"; acc and acc_norm.
- arc_easy: "Question: question\\nAnswer:" and each choice's text; acc and acc_norm.
- winogrande: the sentence up to "_" with each option put in (two contexts) and the rest of the
  sentence as the one continuation (lm-eval's partial scoring); acc only.

The validation sets ship in data/evals/ as gzipped JSON Lines in the Hugging Face datasets' field
layout (data/evals/README.md: sources, licences), each checked against its sha256 when read.
"""
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass

from console import RunError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_DIR = os.path.join(ROOT, "data", "evals")
DELIMITER = " "  # lm-eval's target_delimiter: between a context and its continuation


@dataclass
class Example:
    pairs: list  # [(context, continuation)], one per choice
    lengths: list  # each choice's length in characters: acc_norm divides by it
    label: int


def _clean(text):
    """hellaswag's preprocess: the WikiHow part's " [title]" and [bracketed] artifacts."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _choices(context, choices, label):
    return Example([(context, DELIMITER + c) for c in choices], [float(len(c)) for c in choices],
                   label)


def hellaswag(doc):
    query = _clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _choices(query, [_clean(e) for e in doc["endings"]], int(doc["label"]))


def piqa(doc):
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]],
                    int(doc["label"]))


def arc_easy(doc):
    labels = doc["choices"]["label"]
    return _choices(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                    labels.index(doc["answerKey"]))


def winogrande(doc):
    cut = doc["sentence"].index("_")
    rest = DELIMITER + doc["sentence"][cut + 1:].strip()
    options = [doc["option1"], doc["option2"]]
    return Example([(doc["sentence"][:cut] + o, rest) for o in options],
                   [float(len(doc["sentence"][:cut] + o)) for o in options],
                   {"1": 0, "2": 1}[doc["answer"]])


@dataclass
class Task:
    name: str
    file: str
    sha256: str  # of the uncompressed JSON Lines
    count: int
    example: object  # doc -> Example
    norm: bool  # whether lm-eval reports acc_norm for it


TASKS = {t.name: t for t in [
    Task("hellaswag", "hellaswag_validation.jsonl.gz",
         "d5c08c3e5771307e73886dc9d2744df8ca5f372a7857f32fe77df8c58942f950", 10042, hellaswag,
         True),
    Task("piqa", "piqa_validation.jsonl.gz",
         "61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55", 1838, piqa, True),
    Task("winogrande", "winogrande_validation.jsonl.gz",
         "69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be", 1267, winogrande,
         False),
    Task("arc_easy", "arc_easy_validation.jsonl.gz",
         "1591d2431c45b1712f9c9e7032bd2dfcba863a5eec748c88b2ec11cf7c7da6c5", 570, arc_easy, True),
]}


def names(text):
    """The task names of a comma-separated list, checked (UsageError for one we do not have)."""
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    if not wanted:
        raise UsageError(f"no task named; give one or more of {', '.join(TASKS)}")
    for t in wanted:
        if t not in TASKS:
            raise UsageError(f"unknown task {t!r}; the tasks are {', '.join(TASKS)}")
    return list(dict.fromkeys(wanted))


def load(name, limit=0, data_dir=""):
    """The task's first `limit` examples (all: 0) in the dataset's order, from data_dir (default:
    the project's data/evals). RunError for a file that is missing or not the one expected."""
    task = TASKS[name]
    path = os.path.join(data_dir or EVAL_DIR, task.file)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise RunError(f"the data of task {name} is missing: {path}; it ships with the project in "
                       f"data/evals/ (git checkout data/evals), or give --eval_data=DIR holding "
                       f"{task.file}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise RunError(f"cannot read the data of task {name}, {path}: {e}") from None
    if hashlib.sha256(raw).hexdigest() != task.sha256:
        raise RunError(f"{path} is not the {name} validation set this project scores (sha256 "
                       f"differs); restore it with git checkout data/evals, or fetch it again")
    docs = raw.decode("utf-8").splitlines()
    return [task.example(json.loads(d)) for d in (docs[:limit] if limit else docs)]


# -----------------------------------------------------------------------------------------------
# The same tasks for lm-evaluation-harness itself (its own templates and process_docs, reading the
# files above instead of the Hub), to check our scores against it: tests/test_evals.py and
# bench/bench_eval.py run `lm_eval --include_path FOLDER --tasks hellaswag_local,...`.

LM_EVAL = {
    "hellaswag": 'process_docs: !function hellaswag_utils.process_docs\ndoc_to_text: "{{query}}"\n'
                 'doc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n',
    "piqa": 'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
            'doc_to_choice: "{{[sol1, sol2]}}"\n',
    "winogrande": "".join(f"doc_to_{k}: !function preprocess_winogrande.doc_to_{k}\n"
                          for k in ("text", "target", "choice")),
    "arc_easy": 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
                'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
                'doc_to_choice: "{{choices.text}}"\n',
}


def write_lm_eval_tasks(folder, data_dir=""):
    """Task YAMLs <task>_local.yaml (and the helpers they name, copied from the installed lm_eval)
    into folder, for lm-eval's --include_path."""
    lm_eval = importlib.util.find_spec("lm_eval").submodule_search_locations[0]
    shutil.copy(os.path.join(lm_eval, "tasks", "hellaswag", "utils.py"),
                os.path.join(folder, "hellaswag_utils.py"))
    shutil.copy(os.path.join(lm_eval, "tasks", "winogrande", "preprocess_winogrande.py"), folder)
    for name, body in LM_EVAL.items():
        task = TASKS[name]
        metrics = ["acc"] + ["acc_norm"] * task.norm
        with open(os.path.join(folder, f"{name}_local.yaml"), "w") as f:
            f.write(f"task: {name}_local\ndataset_path: json\ndataset_name: null\n"
                    f"dataset_kwargs:\n  data_files:\n"
                    f"    validation: {os.path.join(data_dir or EVAL_DIR, task.file)}\n"
                    f"output_type: multiple_choice\ntraining_split: null\n"
                    f"validation_split: validation\ntest_split: null\n{body}metric_list:\n"
                    + "".join(f"  - metric: {m}\n    aggregation: mean\n"
                              "    higher_is_better: true\n" for m in metrics)
                    + "metadata:\n  version: 1.0\n")
