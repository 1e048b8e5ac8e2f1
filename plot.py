"""
Draw a run's loss curve from its metrics.jsonl (see metrics.py), or several runs on one figure.

    python plot.py out-shakespeare-char             # -> out-shakespeare-char/loss.png
    python plot.py out-a out-b --to=compare.png     # runs side by side, labelled by their knobs
    python plot.py out-sweep                        # every trial of a sweep (sweep.py), best marked
    python plot.py out-shakespeare-char --x=tokens  # tokens seen on the x axis -> loss-tokens.png

Top panel: train loss (a thin line per logged iteration) and val loss (dots at each eval), on a
log scale when the loss falls by more than 2x; checkpoints are ticks along the bottom, resumes
dashed vertical lines. Then, when the runs have them, the val loss in bits per byte (which a
char run and a BPE run of the same text share) and each task's accuracy (eval_tasks; one marker
per task, one color per run). Bottom panel: the learning rate. Rows marked superseded (work redone
after a resume) are left out. Several runs, or a sweep's trials, are labelled by the knobs that
differ between them (compare.py); a sweep's best trial is drawn thicker, "(best)" in its label.
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, ScalarFormatter  # noqa: E402

import compare  # noqa: E402
from console import fail, one_line_errors  # noqa: E402
from metrics import METRICS, read_rows  # noqa: E402


# what a row must have to be drawn
NEEDS = {"train": ("loss", "lr"), "eval": ("val_loss",), "event": ("event",)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="loss curves from out_dir/metrics.jsonl")
    ap.add_argument("out_dirs", nargs="+",
                    help="run folders (each holds a metrics.jsonl), metrics.jsonl files, or sweep "
                         "folders (sweep.py's out_dir: every trial)")
    ap.add_argument("--x", choices=("iter", "tokens"), default="iter",
                    help="x axis: iterations or tokens seen")
    ap.add_argument("--to", default="", help="the PNG to write (default: OUT_DIR/loss.png for one "
                                             "run, loss-compare.png here for several; "
                                             "loss-tokens.png with --x=tokens)")
    args = ap.parse_args(argv)
    one_line_errors()  # (a sweep.json that cannot be read: compare.py's UsageError)
    key = "iter" if args.x == "iter" else "tokens"
    folders = [os.path.dirname(d) or "." if os.path.basename(d) == METRICS and os.path.isfile(d)
               else d.rstrip("/") or d for d in args.out_dirs]
    for d in folders:
        if not os.path.isfile(os.path.join(d, METRICS)) and not compare.is_sweep(d):
            fail(f"{d!r} has no {METRICS}: train into it first (every run writes one), or check "
                 "the folder")
    # (folder, label, best): one run by its folder's name; several, or a sweep's trials, by the
    # knobs that differ between them; trials that have not started yet have nothing to draw
    entries = [(folders[0], folders[0], False)]
    if len(folders) > 1 or compare.is_sweep(folders[0]):
        table, _, _ = compare.rows(folders)
        entries = [(r["out_dir"], r["label"], r.get("best", False)) for r in table
                   if os.path.isfile(os.path.join(r["out_dir"], METRICS))]
        if not entries:
            fail(f"no trial of {', '.join(folders)} has a {METRICS} yet: run the sweep first")
    runs = []
    for out_dir, label, best in entries:
        path = os.path.join(out_dir, METRICS)
        rows = [r for r in read_rows(path) if not r.get("superseded") and all(
            # (a null loss: the step that diverged)
            r.get(k) is not None for k in (key, *NEEDS.get(r["kind"], ())))]
        if not any(r["kind"] in ("train", "eval") for r in rows):
            if len(entries) > 1:
                continue  # a trial that has just started
            raise SystemExit(f"error: {path} has no train or eval rows yet")
        runs.append((label + (" (best)" if best else ""), rows, best))
    single = len(folders) == 1
    png = "loss.png" if args.x == "iter" else "loss-tokens.png"
    to = args.to or (os.path.join(folders[0], png)
                     if single else png.replace("loss", "loss-compare"))

    evals = [r for _, rows, _ in runs for r in rows if r["kind"] == "eval"]
    bpb = any(r.get("val_bpb") is not None for r in evals)  # runs since evals in bits per byte
    tasks = sorted({k for r in evals for k in r if k.endswith("_acc") and r[k] is not None})
    ratios = [3] + [1.5] * bpb + [1.5] * bool(tasks) + [1]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(9, 4.5 + 2 * len(ratios) - 2), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    ax, ax_lr = axes[0], axes[-1]
    ax_bpb, ax_tasks = (axes[1] if bpb else None), (axes[-2] if tasks else None)
    titles, losses = [], []
    for i, (name, rows, best) in enumerate(runs):
        color = f"C{i}"
        train = [r for r in rows if r["kind"] == "train"]
        evals = [r for r in rows if r["kind"] == "eval"]
        events = [r for r in rows if r["kind"] == "event"]
        losses += [r["loss"] for r in train] + [r["val_loss"] for r in evals]
        start = next((r for r in events if r["event"] == "start"), {})
        size = f", {start['params'] / 1e6:.2f}M params" if start.get("params") else ""
        resumes = sum(r["event"] == "resume" for r in events)
        # many runs: details in the legend, not the title
        label = name if len(runs) <= 3 else f"{name}{size}"
        ax.plot([r[key] for r in train], [r["loss"] for r in train], color=color, alpha=0.35,
                lw=0.8, label=f"{label} train" if len(runs) <= 3 else None)
        ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o-", color=color,
                ms=6 if best else 4, lw=3 if best else 1.5,
                label=f"{label} val" if len(runs) <= 3 else label)
        ax_lr.plot([r[key] for r in train], [r["lr"] for r in train], color=color, lw=1)
        if ax_bpb is not None:  # bits per byte of the text: a char run and a BPE run compare here
            pts = [r for r in evals if r.get("val_bpb") is not None]
            ax_bpb.plot([r[key] for r in pts], [r["val_bpb"] for r in pts], "o-", color=color, ms=3,
                        lw=1.2)
        for j, task in enumerate(tasks if ax_tasks is not None else []):
            pts = [r for r in evals if r.get(task) is not None]
            ax_tasks.plot([r[key] for r in pts], [r[task] for r in pts], marker="os^vD"[j % 5],
                          color=color, ms=4, lw=1, label=task[:-4] if i == 0 else None)
        ckpts = [r[key] for r in events if r["event"] == "checkpoint"]
        ax.plot(ckpts, [0.0] * len(ckpts), "|", color=color, ms=14, mew=2,
                transform=ax.get_xaxis_transform(),
                label=f"{label} checkpoints" if ckpts and len(runs) <= 3 else None)
        for r in events:
            if r["event"] == "resume":
                ax.axvline(r[key], color=color, ls="--", lw=0.8)
                ax_lr.axvline(r[key], color=color, ls="--", lw=0.8)
        titles.append(f"{name}{size}" + (f", resumed {resumes}x" if resumes else ""))
    # a curve that falls far: log scale shows it all
    log_scale = min(losses) > 0 and max(losses) / min(losses) > 2
    if log_scale:
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(ScalarFormatter())
    ax.set_ylabel("loss (cross-entropy" + (", log scale)" if log_scale else ")"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8 if len(runs) <= 3 else 7, ncol=1 if len(runs) <= 3 else 2)
    title = ("; ".join(titles) if len(runs) <= 3 and not compare.is_sweep(folders[0]) else
             f"{len(runs)} {'trials of ' + folders[0] if compare.is_sweep(folders[0]) else 'runs'}"
             f" (val loss; train loss faint)")
    ax.set_title(title + ("\n(dashed: resumed here)"
                          if any("resumed" in t for t in titles) else ""), fontsize=10)
    if ax_bpb is not None:
        ax_bpb.set_ylabel("val bits per byte")
        ax_bpb.grid(True, alpha=0.3)
    if ax_tasks is not None:
        ax_tasks.set_ylabel("task accuracy")
        ax_tasks.grid(True, alpha=0.3)
        ax_tasks.legend(fontsize=7, ncol=min(len(tasks), 4))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration" if key == "iter" else "tokens seen")
    if key == "tokens":
        ax_lr.xaxis.set_major_formatter(EngFormatter())  # 400k, 1.2M
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(to, dpi=100)
    except OSError as e:
        raise SystemExit(f"error: could not write {to}: {e.strerror or e}") from None
    print(f"wrote {to}")


if __name__ == "__main__":
    main()
