"""
The resume policy: which checkpoint a start continues, which config wins, and what a resume
restores (docs/checkpoints.md); and which checkpoint sample.py and export.py read (pick_to_read).
store.py reads and judges the files; this module decides; run.py keeps the run's counters.

- The same command twice continues the run: a start into an out_dir holding a good checkpoint
  resumes it, and nothing ever overwrites another run's files.
- "Newest" comes from the files' contents (branch, iteration), never from file times.
- Config precedence: train.py's defaults < the checkpoint's stored config < config files < flags;
  the model's shape always comes from the checkpoint.
"""
import os

import torch

import distributed
import tokenizer
from configurator import check_data
from console import UsageError, say
from dataset import TokenData
from gpt2 import load_gpt2
from keep.objects import is_remote
from keep.remote import Remote
from keep.files import BEST, MODEL_ARGS, CheckpointError, is_folder_checkpoint
from keep.folders import load_full, load_sharded, read_shards
from keep.rng import restore_rng
from keep.uploader import catch_up
from keep.store import candidates, load, load_latest, load_weights, scan
from model import GPT, GPTConfig


# config keys that fix the model's shape
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias")


# never taken from a stored config: where and how this process starts, and its own time budget
NOT_RESTORED = ("out_dir", "remote_dir", "remote_lease", "init_from", "resume_from", "eval_only",
                "time_limit")


# nanoGPT stores what its machine had here (its dtype default depends on the GPU), not a user's
# choice
MACHINE = ("device", "dtype", "backend", "compile")


def same_origin(a, b):
    return a == b or (os.path.isdir(a) and os.path.isdir(b)
                      and os.path.realpath(a) == os.path.realpath(b))


def start_mode(init_from, resume_from, sources):
    """init_from as this start reads it: resume_from implies 'resume' (unless a flag asked for
    another start, which is an error: UsageError)."""
    if resume_from and init_from != "resume":
        if sources.get("init_from", "").startswith("--"):
            raise UsageError(f"--resume_from continues a checkpoint, but --init_from={init_from!r} "
                             f"asks for a fresh start; drop one of them")
        return "resume"
    return init_from


def find_start(out_dir, init_from, resume_from="", log=say, tensors=True):
    """(path, ckpt) that this start continues, or (None, None) to start fresh. resume_from: that
    file. Otherwise the newest good checkpoint in out_dir, whatever init_from says, so the same
    command run twice continues the run; init_from='resume' with none there is an error."""
    if resume_from:
        ckpt = load(resume_from, tensors=tensors)
        theirs = (ckpt.get("metadata") or {}).get("run_id")
        others = {h["run_id"] for h in scan(out_dir)[0]} - {None, theirs}
        if others:  # two runs in one folder could no longer be told apart by "newest"
            raise CheckpointError(f"out_dir {out_dir!r} holds another run (run id "
                                  f"{sorted(others)[0]}) than {resume_from} (run id {theirs}); "
                                  f"resume it into a new --out_dir")
        return resume_from, ckpt
    one_run(out_dir)
    if init_from == "resume":
        return load_latest(out_dir, log=log, tensors=tensors)
    if not candidates(out_dir):
        return None, None
    try:
        path, ckpt = load_latest(out_dir, log=log, tensors=tensors)
    except CheckpointError:
        raise CheckpointError(f"out_dir {out_dir!r} holds checkpoint files but none of them loads "
                              f"(see warnings above); move them away or pick another "
                              f"--out_dir") from None
    origin = ((ckpt.get("metadata") or {}).get("init_from")
              or (ckpt.get("config") or {}).get("init_from"))
    if origin not in (None, "resume") and not same_origin(origin, init_from):
        raise CheckpointError(f"out_dir {out_dir!r} holds a run that began from {origin!r} "
                              f"(iteration {ckpt['iter_num']}, {os.path.basename(path)}), not from "
                              f"{init_from!r}: continue it with --init_from=resume, or pick "
                              f"another --out_dir")
    log(f"{out_dir} holds this run at iteration {ckpt['iter_num']} ({os.path.basename(path)}): "
        f"continuing it (to start over, pick another --out_dir)")
    return path, ckpt


def one_run(out_dir):
    """One folder holds one run: checkpoints of two run ids in out_dir (another run's file copied
    in) could no longer be told apart by "newest", and continuing the newest would mix them.
    Raises CheckpointError naming both runs and their files."""
    runs = {}
    for h in scan(out_dir)[0]:
        if h["run_id"] is not None:
            runs.setdefault(h["run_id"], []).append(os.path.basename(h["path"]))
    if len(runs) > 1:
        # the folder's own run first
        (a, fa), (b, fb) = sorted(runs.items(), key=lambda r: -len(r[1]))[:2]
        raise CheckpointError(f"out_dir {out_dir!r} holds two runs: {a} "
                              f"({', '.join(sorted(fa)[:3])}{', ...' if len(fa) > 3 else ''}) "
                              f"and {b} ({', '.join(sorted(fb)[:3])}"
                              f"{', ...' if len(fb) > 3 else ''}); one folder holds one run: move "
                              f"the other run's files into a folder of their own "
                              f"(python checkpoint.py {out_dir} lists them)")


def pick_to_read(out_dir, ckpt="", which="best", log=say):
    """(path, weights: store.load_weights) of the checkpoint that sample.py and export.py read,
    by one rule: the file or FSDP folder `ckpt` names, if any; else from out_dir, ckpt.pt (the best
    val loss, nanoGPT's file) or, when there is none or it does not load, the newest good
    checkpoint, said in one line; which='latest': the newest good one. A remote ckpt or out_dir
    (s3://...) is read through remote.Remote.fetch's verified local cache. Raises CheckpointError
    or RemoteError (RunErrors), or UsageError for an out_dir that is a checkpoint folder."""
    if is_remote(ckpt):
        folder, name = ckpt.rstrip("/").rsplit("/", 1)
        ckpt = os.path.join(Remote(folder).fetch(name, log=log), name)
    if ckpt:
        return ckpt, load_weights(ckpt)
    if is_remote(out_dir):
        out_dir = Remote(out_dir).fetch(which, log=log)
    if os.path.isdir(out_dir) and is_folder_checkpoint(out_dir):
        raise UsageError(f"out_dir {out_dir!r} is a checkpoint folder, not a run's folder; to read "
                         f"it give --ckpt={out_dir}")
    best = os.path.join(out_dir, BEST)
    if which == "best" and os.path.lexists(best):
        try:
            return best, load_weights(best)
        except CheckpointError as e:
            log(f"warning: skipping {e}; reading the newest good checkpoint")
    # (a ckpt.pt that failed has been reported just now)
    path, weights = load_latest(out_dir, log=lambda m: (which == "best" and best in m) or log(m),
                                load_one=load_weights)
    if which == "best" and not os.path.lexists(best):
        log(f"note: {out_dir} has no {BEST} (written when val loss improves): reading the newest "
            f"good checkpoint, {os.path.basename(path)}")
    return path, weights


def restore_config(config, ckpt, sources, explicit=True, log=say):
    """The config of a resumed run: train.py defaults < the checkpoint's stored config < config
    files < --flags (`sources` says which keys a file or flag set). Only knobs (train.py's config
    keys) come back: a stored key that is not one (a foreign or doctored file naming `master`, say)
    is ignored with one note. The model's shape is always
    the checkpoint's: another value from a config file gets a note when the resume was asked for
    (explicit: init_from='resume'), from a --flag, or on an implicit continuation, an error (then
    it is another run's command). Returns (the config, {key: (stored, now)} for each knob that
    differs)."""
    namespace, knobs = dict(config), set(config)
    stored, args = ckpt.get("config") or {}, ckpt["model_args"]
    skip = NOT_RESTORED + (() if "format_version" in ckpt else MACHINE)
    ignored = sorted(k for k in stored if k not in knobs)
    if ignored:
        log(f"note: the checkpoint's config holds {', '.join(map(repr, ignored[:5]))}"
            f"{' ...' if len(ignored) > 5 else ''}, which {'is' if len(ignored) == 1 else 'are'} "
            f"not a knob of train.py; ignored")
    for k, v in stored.items():
        if k in knobs and k not in sources and k not in skip and k not in SHAPE:
            default = namespace[k]
            if (type(v) is type(default) or default is None
                    or (isinstance(default, float) and type(v) is int)):
                namespace[k] = float(v) if isinstance(default, float) and type(v) is int else v
    device = namespace.get("device", "auto")
    if "device" not in sources and ((device.startswith("cuda") and not torch.cuda.is_available()) or
                                    (device == "mps" and not torch.backends.mps.is_available())):
        log(f"note: the run used device={device!r}, which this machine lacks; using device='auto'")
        namespace["device"] = "auto"
    flagged = [f"{k}={namespace[k]!r} but the checkpoint has {args[k]!r}" for k in SHAPE
               if k in args and k in sources and (sources[k].startswith("--") or not explicit)
               and namespace[k] != args[k]]
    if flagged:
        raise CheckpointError("the model's shape comes from the checkpoint and cannot change on "
                              "resume: " + "; ".join(flagged)
                              + " (drop those flags, or pick another --out_dir for a new run)")
    filed = [k for k in SHAPE if k in args and k in sources and namespace[k] != args[k]]
    if filed:
        log(f"note: using the checkpoint's model ({', '.join(f'{k}={args[k]!r}' for k in filed)}), "
            f"not {', '.join(f'{k}={namespace[k]!r}' for k in filed)} from {sources[filed[0]]}")
    for k in SHAPE:
        if k in args:
            namespace[k] = args[k]
    if "dropout" not in sources and "dropout" in args:
        # the model's own, also for files whose config lacks it
        namespace["dropout"] = args["dropout"]
    return namespace, {k: (stored[k], namespace[k]) for k in sources
                       if k in stored and k not in skip and k not in SHAPE
                       and stored[k] != namespace[k]}


def check_compatible(ckpt, data, vocab_size, log=say):
    """Refuse to resume on other data: another dataset, a vocab the model does not have, or the same
    dataset re-prepared with another tokenizer or char mapping (the ids would mean other text). Bins
    that changed under the same vocab are said in one line, and training goes on with them."""
    problems = []
    saved_dataset = (ckpt.get("config") or {}).get("dataset")
    if saved_dataset is not None and saved_dataset != data.name:
        problems.append(f"dataset={data.name!r} but the checkpoint was trained on "
                        f"{saved_dataset!r}")
    elif (ckpt.get("tokenizer") is not None
          and (what := tokenizer.changes(ckpt["tokenizer"], data.tokenizer()))):
        problems.append(f"{data.dir} was prepared again with another tokenizer since ({what}); "
                        f"prepare the new text under another dataset name, or train on it in "
                        f"another out_dir")
    elif vocab_size is not None and vocab_size != ckpt["model_args"]["vocab_size"]:
        problems.append(f"the dataset's vocab has {vocab_size} tokens but the checkpoint's model "
                        f"has {ckpt['model_args']['vocab_size']}")
    if problems:
        raise CheckpointError("checkpoint does not match this run: " + "; ".join(problems))
    old, new = ckpt.get("data_fingerprint"), data.fingerprint()
    changed = [s for s in ("train", "val") if old and old.get(s) != new[s]]
    if changed:
        sizes = ", ".join(f"{s}.bin {old[s][0]:,} -> {new[s][0]:,} bytes" if old[s][0] != new[s][0]
                          else f"{s}.bin: other contents, same size" for s in changed)
        log(f"note: the data under this run changed since its checkpoint ({sizes}) with the same "
            f"vocab; training goes on with the new data, so this is not an exact resume")


def restore_training(ckpt, ckpt_path, model, optimizer, scaler, rank, world_size, fsdp, log=say):
    """The optimizer, GradScaler and RNG state of the checkpoint into a built (maybe sharded)
    model's run. The weights went in before sharding, except from a folder resumed under FSDP: each
    rank then reads its own share (DCP reshards, whatever world size wrote it). ckpt None: a new
    run."""
    if ckpt is None:
        return
    if "model" not in ckpt:
        load_sharded(ckpt_path, model, optimizer)
    elif fsdp:
        # a file (or consolidated folder) into shards
        load_full(model, optimizer, ckpt["optimizer"])
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng")
    if rngs and len(rngs) == world_size:
        restore_rng(rngs[rank])
    elif rngs:
        log(f"note: checkpoint was written by {len(rngs)} rank(s), this run has {world_size}: the "
            f"data order is exact, dropout's random stream starts afresh")
    else:
        log("note: checkpoint has no RNG state (nanoGPT or older file): approximate resume, data "
            "order reseeded")


def open_data(config, ckpt, log=say):
    """The run's TokenData, checked against block_size and against the checkpoint being
    continued."""
    data = TokenData(config["dataset"])
    check_data(config["block_size"], data.tokens(), config["dataset"])
    if ckpt is not None:
        check_compatible(ckpt, data, data.vocab_size(), log=log)
    if ckpt is not None and "eval_tokens" not in (ckpt.get("config") or {}):
        log(f"note: this run's losses up to iteration {ckpt['iter_num']} were measured on random "
            f"windows (its checkpoint is older than fixed eval text); from here on they are on the "
            f"splits' first tokens (eval_tokens): the curve's two parts are on different text")
    return data


def start(config, sources, master, log=say):
    """What this start continues, on every rank: (path, plain checkpoint, the config, {key: (stored,
    now)} changed on resume); (None, None, config, {}) for a fresh start. An out_dir that holds a
    good checkpoint is always continued, whatever init_from says, so the same command run twice (a
    re-queued job, `make demo` again) carries on instead of starting over; the run's stored config
    comes back, with config files and flags on top. Rank 0 alone picks the checkpoint (or the
    error), the others read that very file: ranks that chose on their own could start from
    different iterations (a read error on one of them, a stale listing)."""
    init_from = start_mode(config["init_from"], config["resume_from"], sources)
    pick = lambda: find_start(config["out_dir"], init_from, config["resume_from"],  # noqa: E731
                              log=log, tensors=False)
    path, ckpt = distributed.on_rank0(pick, master) or (None, None)
    path = distributed.from_rank0(path)
    ckpt = distributed.on_every_rank(lambda: ckpt if master or not path
                                     else load(path, tensors=False))
    config = dict(config, init_from=init_from)
    if ckpt is None:
        return None, None, config, {}
    config, changed = restore_config(config, ckpt, sources, explicit=init_from == "resume", log=log)
    return path, ckpt, config, changed


def build_model(ckpt, path, config, vocab_size, fsdp, fits):
    """The model this start trains (its weights loaded, except a folder's under FSDP: each rank
    reads its share once sharded), from the checkpoint being continued, from scratch, or from
    GPT-2's weights; and its model_args (the checkpoint's or GPT-2's shape, cut to block_size).
    fits(args) judges the shape against the machine's memory before anything is built."""
    args = {k: config[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")}
    args["vocab_size"] = vocab_size or 50304  # GPT-2's 50257, padded to a multiple of 64
    if ckpt is not None:
        args.update({k: ckpt["model_args"][k] for k in MODEL_ARGS if k in ckpt["model_args"]})
        # the run's own, or a new one set on resume (e.g. to fine-tune)
        args["dropout"] = config["dropout"]
        fits(args)
        model = GPT(GPTConfig(**args))
        # a checkpoint folder, resumed without FSDP: read it whole
        if "model" not in ckpt and not fsdp:
            ckpt["model"], ckpt["optimizer"] = read_shards(path, ckpt)
        if "model" in ckpt:
            model.load_state_dict(ckpt["model"])
    elif config["init_from"] == "scratch":
        fits(args)
        model = GPT(GPTConfig(**args))
    else:  # 'gpt2', ..., 'gpt2-xl' or a local Hugging Face folder; the shape is theirs
        say(f"loading GPT-2 weights {config['init_from']}...")
        model = load_gpt2(config["init_from"], dropout=config["dropout"])
        args.update({k: getattr(model.config, k) for k in MODEL_ARGS})
    if config["block_size"] < model.config.block_size:
        # e.g. GPT-2's 1024 context cut to 256 for fine-tuning
        model.crop_block_size(config["block_size"])
        args["block_size"] = config["block_size"]
    return model, args


def complete(ckpt, path, config, remote, attempt, log=say):
    """Whether the checkpoint being continued has reached max_iters (then the start has nothing to
    train; it says so, and copies to remote_dir what a kill kept from it)."""
    if ckpt is None or ckpt["iter_num"] < config["max_iters"] or config["eval_only"]:
        return False
    log(f"the run is complete: iteration {ckpt['iter_num']} of max_iters={config['max_iters']} "
        f"({path}); raise --max_iters to train longer")
    if remote is not None:
        meta = ckpt.get("metadata") or {}
        catch_up(remote, config["out_dir"], run_id=meta.get("run_id"), branch=meta.get("branch", 0),
                 attempt=attempt, keep_last=config["keep_last"], keep_every=config["keep_every"],
                 wait=config["remote_wait"], log=log)
    return True
