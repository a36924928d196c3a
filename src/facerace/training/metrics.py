"""Classification metrics from true labels and probabilities, in plain numpy; every rate with its count
and Wilson 95% interval."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from facerace.labels import convert_label, convert_probabilities, get_scheme, reachable

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959964
#: Groups of fewer faces than this get no rate in reports ("too few to measure") and are never the worst group.
MIN_GROUP_FACES = 50


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval [low, high] of a rate k/n (95% by default); None when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small n and rates near 0 or 1.
    The bounds are clipped so that 0 <= low <= k/n <= high <= 1 exactly: rounding alone gives 10 of 10
    an upper bound of 0.9999999999999999, below the rate itself.
    """
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))]


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


def group_metrics(groups: Sequence[str | None], y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                  confidence: np.ndarray | None = None) -> dict[str, dict]:
    """Per group value (e.g. gender or age group; None values skipped): count, correct, accuracy (Wilson 95%
    interval), macro-F1 and, given the faces' `confidence`, ECE. A group of fewer than MIN_GROUP_FACES faces
    is `measured: false` and its rates are None (too few to measure); its counts stay."""
    out = {}
    arr = np.array([g if g is not None else "" for g in groups], dtype=object)
    for g in sorted(set(arr) - {""}):
        mask = arr == g
        n, right = int(mask.sum()), int(np.sum(y_true[mask] == y_pred[mask]))
        pc = per_class(confusion_matrix(y_true[mask], y_pred[mask], n_classes), [str(i) for i in range(n_classes)])
        f1 = [c["f1"] for c in pc.values() if c["support"] > 0]
        row = {**rate_row(right, n), "macro_f1": float(np.mean(f1)) if f1 else 0.0}
        if confidence is not None:
            row["ece"] = expected_calibration_error(confidence[mask], (y_true[mask] == y_pred[mask]).astype(float))
        if not row["measured"]:
            row.update({k: None for k in ("macro_f1", "ece") if k in row})
        out[str(g)] = row
    return out


def rate_row(k: int, n: int, name: str = "accuracy") -> dict[str, Any]:
    """`n`, `correct` (k) and, when n >= MIN_GROUP_FACES, the rate `name` and its Wilson 95% interval
    (`name_ci95`); below that both are None. `measured` says which."""
    measured = n >= MIN_GROUP_FACES
    return {"n": int(n), "correct": int(k), "measured": measured, name: k / n if measured else None,
            f"{name}_ci95": wilson(k, n) if measured else None}


def race_gender_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                        genders: Sequence[str | None]) -> dict[str, dict[str, dict]]:
    """Per true class and gender (faces of unknown gender left out; empty cells left out): the group's count and
    accuracy (the class's recall among faces of that gender), and precision among the faces of that gender
    predicted as the class, each with its Wilson 95% interval; a rate over fewer than MIN_GROUP_FACES faces is
    None (`measured` / `precision_measured` false)."""
    arr = np.array([g if g is not None else "" for g in genders], dtype=object)
    out: dict[str, dict[str, dict]] = {}
    for g in sorted(set(arr) - {""}):
        mask = arr == g
        pc = per_class(confusion_matrix(y_true[mask], y_pred[mask], len(classes)), classes)
        for c, v in pc.items():
            if v["support"]:
                precision = rate_row(v["correct"], v["predicted"], "precision")
                out.setdefault(c, {})[str(g)] = {**rate_row(v["correct"], v["support"]), "predicted": v["predicted"],
                                                 "precision": precision["precision"],
                                                 "precision_ci95": precision["precision_ci95"],
                                                 "precision_measured": precision["measured"]}
    return {c: out[c] for c in classes if c in out}


def crossed_groups(first: Sequence[str | None], second: Sequence[str | None], y_true: np.ndarray,
                   y_pred: np.ndarray, n_classes: int) -> dict[str, dict[str, dict]]:
    """`group_metrics` of every (first, second) pair of values, e.g. age group x gender: {first: {second: row}}."""
    arr = np.array([g if g is not None else "" for g in second], dtype=object)
    out: dict[str, dict[str, dict]] = {}
    for g in sorted(set(arr) - {""}):
        mask = arr == g
        for a, row in group_metrics([v for v, m in zip(first, mask) if m], y_true[mask], y_pred[mask],
                                    n_classes).items():
            out.setdefault(a, {})[str(g)] = row
    return out


def worst_group(cells: dict[str, dict[str, dict]]) -> dict[str, Any] | None:
    """The least accurate race x gender group among those of at least MIN_GROUP_FACES faces (`cells` from
    `race_gender_metrics`), or None when no group is that large."""
    measured = [(v["accuracy"], -v["n"], race, gender) for race, row in cells.items() for gender, v in row.items()
                if v["measured"]]
    if not measured:
        return None
    _, _, race, gender = min(measured)
    v = cells[race][gender]
    too_few = sum(not v["measured"] for row in cells.values() for v in row.values())
    return {"group": f"{race} {gender}", "race": race, "gender": gender, "n": v["n"], "correct": v["correct"],
            "accuracy": v["accuracy"], "accuracy_ci95": v["accuracy_ci95"], "min_faces": MIN_GROUP_FACES,
            "groups_measured": len(measured), "groups_too_few": too_few}


def gender_gap(per_gender: dict[str, dict]) -> dict[str, Any] | None:
    """Accuracy points between the most and the least accurate gender (of those with at least MIN_GROUP_FACES
    faces), with Newcombe's 95% interval of that difference (from the two Wilson intervals); None when fewer
    than two genders are that large."""
    measured = sorted(((v["accuracy"], g) for g, v in per_gender.items() if v["measured"]), reverse=True)
    if len(measured) < 2:
        return None
    (p1, high), (p2, low) = measured[0], measured[-1]
    (l1, u1), (l2, u2) = per_gender[high]["accuracy_ci95"], per_gender[low]["accuracy_ci95"]
    d = p1 - p2
    ci = [max(-1.0, d - math.hypot(p1 - l1, u2 - p2)), min(1.0, d + math.hypot(u1 - p1, p2 - l2))]
    return {"points": 100 * d, "points_ci95": [100 * ci[0], 100 * ci[1]], "higher": high, "lower": low,
            "min_faces": MIN_GROUP_FACES,
            "per_gender": {g: {k: v[k] for k in ("n", "correct", "accuracy", "accuracy_ci95", "measured", "ece")
                               if k in v} for g, v in per_gender.items()}}


def subgroup_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     genders: Sequence[str | None], ages: Sequence[str | None]) -> dict[str, Any]:
    """Everything measured per group of faces: per gender (with ECE), age group, race x gender and age x gender,
    the worst race x gender group and the gap between genders (see `worst_group`, `gender_gap`)."""
    y_pred, confidence = probs.argmax(1), probs.max(1)
    per_gender = group_metrics(genders, y_true, y_pred, len(classes), confidence)
    cells = race_gender_metrics(y_true, y_pred, classes, genders)
    return {
        "min_group_faces": MIN_GROUP_FACES,
        "worst_group": worst_group(cells),
        "gender_gap": gender_gap(per_gender),
        "ece_per_gender": {g: v["ece"] for g, v in per_gender.items()},
        "per_gender": per_gender,
        "per_age": group_metrics(ages, y_true, y_pred, len(classes)),
        "per_race_gender": cells,
        "per_age_gender": crossed_groups(ages, genders, y_true, y_pred, len(classes)),
    }


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
