"""`gptkit plot RUN_DIR`: a run's loss curves from its metrics.jsonl, as one PNG.

Left panel: train and val loss against steps, with the learning rate on a second y axis.
Right panel: the same losses against tokens seen. The final whole-split val loss is a marker.
matplotlib is an optional extra (`pip install 'gptkit[plot]'`), imported here only.
"""

from __future__ import annotations

from pathlib import Path

from gptkit.errors import GptkitError, make_dir
from gptkit.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR's curves into `out` (default RUN_DIR/loss.png); return the PNG's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptkitError("run directory not found", run_dir, "give a directory written by `gptkit train`")
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("train_loss") is not None and not r.get("final")]
    val = [r for r in rows if "val_loss" in r and not r.get("final")]
    final = [r for r in rows if r.get("final")]
    if not train and not val:
        raise GptkitError("metrics.jsonl holds no losses yet", run_dir / "metrics.jsonl",
                          "plot after the first logged step")
    out = Path(out) if out else run_dir / "loss.png"
    if out.suffix.lower() != ".png":
        raise GptkitError(f"the output must be a .png file, got {out.name!r}", "--out",
                          "name the output file like loss.png")
    try:
        import matplotlib
    except ImportError:
        raise GptkitError("plotting needs matplotlib", "gptkit plot", "pip install 'gptkit[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, x in ((ax_s, "step"), (ax_t, "tokens")):
        if train:
            ax.plot([r[x] for r in train], [r["train_loss"] for r in train], color="tab:blue", lw=1.2,
                    label="train loss")
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange", ms=3.5, lw=1.2,
                    label="val loss")
        if final:
            ax.plot([final[-1][x]], [final[-1]["val_loss"]], "*", color="tab:red", ms=12,
                    label=f"final val loss {final[-1]['val_loss']:.4f} (whole split)")
        ax.set_xlabel("step" if x == "step" else "tokens seen")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    lr_rows = [r for r in train if "lr" in r]
    handles, labels = ax_s.get_legend_handles_labels()
    if lr_rows:
        ax_lr = ax_s.twinx()
        ax_lr.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], "--", color="tab:green", lw=1,
                   label="learning rate")
        ax_lr.set_ylabel("learning rate", color="tab:green")
        ax_lr.tick_params(axis="y", colors="tab:green")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        h2, l2 = ax_lr.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax_s.legend(handles, labels, loc="upper right", fontsize=9)
    ax_s.set_title("loss and learning rate vs step")
    ax_t.set_title("loss vs tokens")
    ax_t.legend(loc="upper right", fontsize=9)
    fig.suptitle(f"gptkit run {run_dir.resolve().name}", fontsize=11)
    make_dir(out.parent, "--out")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
