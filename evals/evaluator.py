"""
What a training run evaluates, built from its config in one call: the loss of both splits on
fixed text (loss.LossEval) at every eval, and the multiple-choice tasks of eval_tasks (scored as
eval.py scores them) at every eval_tasks_interval-th iteration, every rank scoring its share.
"""
import math

import distributed
import tokenizer
from console import UsageError
from evals import score
from evals.loss import LossEval
from evals.tasks import TASKS, load, names


class Evaluator:
    @classmethod
    def build(cls, config, data, vocab_size, device, ctx):
        """The run's Evaluator, on every rank together: a task's data that one node lacks stops
        every rank with that one line (distributed.on_every_rank), none waits on the others."""
        return distributed.on_every_rank(lambda: cls(config, data, vocab_size, device, ctx))

    def __init__(self, config, data, vocab_size, device, ctx):
        c = config
        tokens = c["eval_tokens"]
        if c["eval_iters"]:  # nanoGPT's knob: as many tokens as its random batches held
            tokens = c["eval_iters"] * c["batch_size"] * c["block_size"]
        self.codec = tokenizer.codec(data.tokenizer())
        self.loss = LossEval(data, self.codec, vocab_size or self.codec.size, tokens=tokens,
                             block_size=c["block_size"], batch_size=c["batch_size"], device=device,
                             ctx=ctx)
        self.interval, self.every = c["eval_interval"], c["eval_tasks_interval"]
        self.max_iters, self.only = c["max_iters"], c["eval_only"]
        self.device, self.ctx = device, ctx
        self.tasks = {}
        if c["eval_tasks"]:
            if self.every and self.every % self.interval:
                raise UsageError(f"eval_tasks_interval={self.every} must be a multiple of "
                                 f"eval_interval={self.interval}: tasks are scored at an eval")
            limit = max(c["eval_tasks_limit"], 0)
            self.tasks = {n: load(n, limit, c["eval_data"]) for n in names(c["eval_tasks"])}
            for name, examples in self.tasks.items():
                score.check_vocab(self.codec, name, examples)

    def due(self, it, run):
        """Whether iteration `it` evaluates: every eval_interval, at the end, once for eval_only;
        never again at an iteration whose eval the checkpoint being continued holds."""
        if run.last_eval is not None and run.last_eval[0] == it and not self.only:
            return False
        return it % self.interval == 0 or it == self.max_iters or self.only

    def __call__(self, it, model, raw_model, stopping):
        """{"train_loss", "val_loss", "val_bpb", "<task>_acc", "<task>_acc_norm", ...} at
        iteration `it` (the tasks when due), or None if a stop came meanwhile (on any rank)."""
        losses = self.loss(model, stopping)
        if losses is None:
            return None
        out = dict(train_loss=losses["train"], val_loss=losses["val"], val_bpb=losses["val_bpb"])
        if self.tasks and (self.only or not self.every or it % self.every == 0):
            raw_model.eval()
            for name, examples in self.tasks.items():
                r = score.score_task(raw_model, self.codec, examples, self.device, self.ctx,
                                     stopping=stopping)
                if r is None:
                    raw_model.train()
                    return None
                out[f"{name}_acc"] = r["acc"]
                if TASKS[name].norm:
                    out[f"{name}_acc_norm"] = r["acc_norm"]
            raw_model.train()
        return out

    @staticmethod
    def diverged(scores):
        """The first loss that is not finite (nan or inf), else None."""
        return next((v for k in ("val_loss", "train_loss") if not math.isfinite(v := scores[k])),
                    None)

    @staticmethod
    def line(it, scores):
        tasks = "".join(f", {k} {v:.4f}" for k, v in scores.items() if k.endswith("_acc"))
        return (f"step {it}: train loss {scores['train_loss']:.4f}, val loss "
                f"{scores['val_loss']:.4f} ({scores['val_bpb']:.4f} bpb){tasks}")
