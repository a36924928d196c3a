"""Classification metrics from true labels and probabilities, in plain numpy; every rate with its count
and Wilson 95% interval."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from facerace.labels import convert_label, convert_probabilities, get_scheme, reachable

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959964


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval [low, high] of a rate k/n (95% by default); None when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small n and rates near 0 or 1.
    """
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts C[i, j] of true class i predicted as j."""
    c = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(c, (y_true, y_pred), 1)
    return c


def per_class(conf: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall (each with its Wilson 95% interval), F1, support (true faces of the class) and
    predicted (faces predicted as it) per class from a confusion matrix."""
    out = {}
    for i, name in enumerate(classes):
        tp = int(conf[i, i])
        predicted, support = int(conf[:, i].sum()), int(conf[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": support,
                     "predicted": predicted, "correct": tp, "precision_ci95": wilson(tp, predicted),
                     "recall_ci95": wilson(tp, support)}
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
    """n, loss, accuracy (with its count and Wilson 95% interval), macro-F1, per-class P/R/F1, confusion matrix
    and ECE (15 bins)."""
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
        "correct": int(correct.sum()),
        "accuracy_ci95": wilson(int(correct.sum()), len(y_true)),
        "macro_f1": float(np.mean([pc[c]["f1"] for c in present])),
        "ece": expected_calibration_error(confidence, correct),
        "per_class": pc,
        "confusion": conf.tolist(),
        "classes": list(classes),
    }


def group_metrics(groups: Sequence[str | None], y_true: np.ndarray, y_pred: np.ndarray,
                  n_classes: int) -> dict[str, dict]:
    """Count, correct, accuracy (Wilson 95% interval) and macro-F1 per group value (e.g. gender or age group);
    None values skipped."""
    out = {}
    arr = np.array([g if g is not None else "" for g in groups])
    for g in sorted(set(arr) - {""}):
        mask = arr == g
        pc = per_class(confusion_matrix(y_true[mask], y_pred[mask], n_classes), [str(i) for i in range(n_classes)])
        f1 = [c["f1"] for c in pc.values() if c["support"] > 0]
        right = int(np.sum(y_true[mask] == y_pred[mask]))
        out[g] = {"n": int(mask.sum()), "correct": right, "accuracy": right / int(mask.sum()),
                  "accuracy_ci95": wilson(right, int(mask.sum())), "macro_f1": float(np.mean(f1)) if f1 else 0.0}
    return out


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float = 0.8) -> float:
    """The lowest confidence t such that faces with confidence >= t are right at least `target` of the time."""
    order = np.argsort(-confidence)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(running >= target)[0]
    if len(ok) == 0:
        return 1.0
    return float(confidence[order][ok[-1]])


def scheme_thresholds(y: np.ndarray, probs: np.ndarray, scheme: str, target: float) -> dict[str, dict[str, float]]:
    """For `scheme` and every coarser scheme: the `choose_threshold` of held-out faces (true class indices `y`
    and probabilities in `scheme`) scored in that scheme, with the share of faces at or above it (coverage).
    Faces whose class has no counterpart in a coarser scheme (e.g. Middle Eastern in race4) are left out of it."""
    classes = get_scheme(scheme).classes
    out = {}
    for target_scheme in reachable(scheme):
        names = [convert_label(classes[i], scheme, target_scheme) for i in y]
        keep = np.array([n is not None for n in names], dtype=bool)
        if not keep.any():
            continue
        mapped = get_scheme(target_scheme).classes
        truth = np.array([mapped.index(n) for n in names if n is not None])
        p = convert_probabilities(probs[keep], scheme, target_scheme)
        confidence = p.max(1)
        threshold = choose_threshold(confidence, (p.argmax(1) == truth).astype(float), target)
        out[target_scheme] = {"threshold": round(threshold, 4), "coverage": float((confidence >= threshold).mean()),
                              "n": int(keep.sum())}
    return out
