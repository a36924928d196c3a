"""Plots written into run folders (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def try_plot(plot: Callable[..., Path], *args: Any, **kwargs: Any) -> str | None:
    """Draw `plot(*args, **kwargs)` (its last positional argument is the file); on any error remove the partial
    file and return a note saying which plot was not drawn and why, so that a plot never loses computed results."""
    path = Path(args[-1])
    try:
        plot(*args, **kwargs)
    except Exception as exc:  # matplotlib raises many kinds; the results must survive all of them
        path.unlink(missing_ok=True)
        reason = " ".join(str(exc).split())[:200]
        return f"{path.name} was not drawn ({type(exc).__name__}: {reason}); every other result was written"
    return None


def plot_loss(train_loss: Sequence[float], val_loss: Sequence[float], best_epoch: int, path: Path) -> Path:
    """Train and validation loss per epoch, with the kept (best) epoch marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    epochs = np.arange(1, len(train_loss) + 1)
    ax.plot(epochs, train_loss, label="train")
    ax.plot(epochs, val_loss, label="validation")
    if 0 <= best_epoch < len(val_loss):
        ax.axvline(best_epoch + 1, color="grey", linestyle="--", linewidth=1)
        ax.scatter([best_epoch + 1], [val_loss[best_epoch]], color="red", zorder=3,
                   label=f"best epoch {best_epoch + 1} ({val_loss[best_epoch]:.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(conf: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Side-by-side heat maps: counts and row-normalised (recall) confusion matrices."""
    plt = _pyplot()
    conf = np.asarray(conf)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros(conf.shape, float), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    for ax, data, fmt, name in ((axes[0], conf, "d", "counts"), (axes[1], norm, ".2f", "row-normalised")):
        im = ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} {name}".strip())
        top = data.max() if data.size else 0
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if data[i, j] > top / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(bins: list[dict], ece: float, path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin with its Wilson 95% interval and its face count
    (written at the bar's foot); empty bins are left blank (no faces is no evidence, not zero accuracy)."""
    from facerace.training.metrics import wilson

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    filled = [b for b in bins if b["count"]]
    width = 1 / len(bins) if bins else 0.1
    centres = [(b["low"] + b["high"]) / 2 for b in filled]
    accuracy = [b["accuracy"] for b in filled]
    intervals = [wilson(round(b["accuracy"] * b["count"]), b["count"]) for b in filled]
    errors = [[max(0.0, a - lo) for a, (lo, _) in zip(accuracy, intervals)],
              [max(0.0, hi - a) for a, (_, hi) in zip(accuracy, intervals)]]
    ax.bar(centres, accuracy, width=width, edgecolor="black", alpha=0.7, label="accuracy (95% CI; n faces)")
    ax.errorbar(centres, accuracy, yerr=errors, fmt="none", ecolor="black", capsize=2, linewidth=0.8)
    for x, b in zip(centres, filled):
        ax.text(x, 0.01, f"{b['count']:,}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.3f}, n = {sum(b['count'] for b in bins):,}; empty bins blank)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
