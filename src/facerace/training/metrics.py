"""Classification metrics from true labels and probabilities, in plain numpy."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts C[i, j] of true class i predicted as j."""
    c = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(c, (y_true, y_pred), 1)
    return c


def per_class(conf: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    out = {}
    for i, name in enumerate(classes):
        tp = conf[i, i]
        predicted, support = conf[:, i].sum(), conf[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)}
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE: support-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per confidence bin: its range, count, mean confidence and accuracy."""
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = bins == b
        rows.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(mask.sum()),
                     "confidence": float(confidence[mask].mean()) if mask.any() else None,
                     "accuracy": float(correct[mask].mean()) if mask.any() else None})
    return rows


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """n, loss, accuracy, macro-F1, per-class P/R/F1, confusion matrix and ECE (15 bins)."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    conf = confusion_matrix(y_true, y_pred, len(classes))
    pc = per_class(conf, classes)
    present = [c for c in classes if pc[c]["support"] > 0]
    confidence = probs.max(axis=1)
    correct = (y_pred == y_true).astype(float)
    return {
        "n": int(len(y_true)),
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)))) + 0.0,
        "accuracy": float(correct.mean()),
        "macro_f1": float(np.mean([pc[c]["f1"] for c in present])),
        "ece": expected_calibration_error(confidence, correct),
        "per_class": pc,
        "confusion": conf.tolist(),
        "classes": list(classes),
    }


def group_metrics(groups: Sequence[str | None], y_true: np.ndarray, y_pred: np.ndarray,
                  n_classes: int) -> dict[str, dict]:
    """Count, accuracy and macro-F1 per group value (e.g. gender or age group); None values skipped."""
    out = {}
    arr = np.array([g if g is not None else "" for g in groups])
    for g in sorted(set(arr) - {""}):
        mask = arr == g
        pc = per_class(confusion_matrix(y_true[mask], y_pred[mask], n_classes), [str(i) for i in range(n_classes)])
        f1 = [c["f1"] for c in pc.values() if c["support"] > 0]
        out[g] = {"n": int(mask.sum()), "accuracy": float(np.mean(y_true[mask] == y_pred[mask])),
                  "macro_f1": float(np.mean(f1)) if f1 else 0.0}
    return out


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float = 0.8) -> float:
    """The lowest confidence t such that faces with confidence >= t are right at least `target` of the time."""
    order = np.argsort(-confidence)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(running >= target)[0]
    if len(ok) == 0:
        return 1.0
    return float(confidence[order][ok[-1]])
