"""
Who a run is and where it stands: its own counters in one RunState (iteration, best val loss,
tokens, run id, branch, resumes), which a start makes (run_state: a new run's, or a resumed run's
lineage), the training loop advances, and every checkpoint stores in its metadata.
"""
import os
import time
from dataclasses import dataclass, field

from console import say
from keep.files import new_run_id
from keep.store import scan


def branch_for(out_dir, ckpt, picked):
    """The branch a resumed run writes: the checkpoint's own, unless the file was picked by hand
    (resume_from) and out_dir holds later work; then a new branch, whose files get their own
    names and outrank the abandoned ones, so nothing is overwritten and a plain resume continues
    the newest branch."""
    b = int((ckpt.get("metadata") or {}).get("branch", 0))
    if not picked:
        return b
    heads, _ = scan(out_dir)
    if any((h["branch"], h["iter_num"]) > (b, ckpt["iter_num"]) for h in heads):
        return 1 + max(h["branch"] for h in heads)
    return b


@dataclass
class RunState:
    """The run's own counters, in one object: a start makes it (run_state; lineage for a resumed
    run), the loop advances it, and every checkpoint stores it (metadata). tokens_seen: tokens
    trained on before start_iter, counted rather than iter_num * batch, as the batch may change on
    resume."""
    run_id: str
    origin: str  # the init_from of the run's first start
    iter_num: int = 0
    best_val_loss: float = float("inf")
    tokens_seen: int = 0
    train_seconds: float = 0.0  # before this start
    last_eval: list = None  # [iteration, val loss] of the newest eval
    scores: dict = None  # the newest eval's scores: losses, bits per byte, tasks' acc
    branch: int = 0
    resumes: list = field(default_factory=list)
    start_iter: int = 0
    tokens_per_iter: int = 0
    started: float = field(default_factory=time.time)

    def tokens_at(self, it):
        """Tokens trained on before update `it`."""
        return self.tokens_seen + (it - self.start_iter) * self.tokens_per_iter

    def metadata(self, val_loss):
        return dict(tokens_seen=self.tokens_at(self.iter_num), val_loss=val_loss,
                    last_eval=self.last_eval, scores=self.scores,
                    train_seconds=self.train_seconds + time.time() - self.started,
                    init_from=self.origin, run_id=self.run_id, branch=self.branch,
                    resumes=self.resumes)


def run_state(ckpt, ckpt_path, config, tokens_per_iter, changed, log=say):
    """The RunState this start trains on: a new run's, or where a resumed run stands (lineage)."""
    if ckpt is None:
        run = RunState(run_id=new_run_id(), origin=config["init_from"])
    else:
        run = lineage(ckpt, ckpt_path, config["out_dir"], bool(config["resume_from"]), changed, log)
    run.tokens_per_iter = tokens_per_iter
    # a file without the count (nanoGPT's): as if the batch never changed
    if run.tokens_seen is None:
        run.tokens_seen = run.iter_num * tokens_per_iter
    return run


def lineage(ckpt, ckpt_path, out_dir, picked, changed, log=say):
    """Where a resumed run stands and who it is (a RunState): the counters its checkpoint holds, its
    run id (a new one for nanoGPT's files, which have none), the branch it writes (branch_for) and
    its list of resumes with this one added."""
    meta = ckpt.get("metadata") or {}
    branch = branch_for(out_dir, ckpt, picked)
    here = os.path.dirname(os.path.realpath(ckpt_path)) == os.path.realpath(out_dir)
    resumes = list(meta.get("resumes", [])) + [{
        "iter": ckpt["iter_num"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from": os.path.basename(ckpt_path) if here else os.path.abspath(ckpt_path),
        "branch": branch, "changed": {k: list(v) for k, v in changed.items()}}]
    log(f"resuming from {ckpt_path} at iteration {ckpt['iter_num']}"
        + (f", as branch {branch}: later checkpoints of branch {meta.get('branch', 0)} stay as "
           f"they are" if branch != meta.get("branch", 0) else ""))
    if changed:
        log("changed on resume: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return RunState(iter_num=ckpt["iter_num"], best_val_loss=ckpt["best_val_loss"],
                    train_seconds=meta.get("train_seconds", 0.0), last_eval=meta.get("last_eval"),
                    scores=meta.get("scores"),
                    origin=meta.get("init_from", "resume"), tokens_seen=meta.get("tokens_seen"),
                    run_id=meta.get("run_id") or new_run_id(), branch=branch, resumes=resumes,
                    start_iter=ckpt["iter_num"])
