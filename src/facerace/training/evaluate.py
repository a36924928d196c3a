"""facerace evaluate: a model on a labelled dataset -> metrics.json, plots, predictions.csv."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from facerace.errors import DatasetError, FaceraceWarning
from facerace.labels import MAPPINGS, convert_label, convert_probabilities, get_scheme
from facerace.model import ModelConfig, digest_prefixes, load_model, model_pipeline, training_digests
from facerace.textout import CsvWriter
from facerace.training.datasets import AGE_GROUPS, open_dataset
from facerace.training.embeddings import CropEmbedder, embed_files
from facerace.training.metrics import classification_metrics, reliability, subgroup_metrics, wilson
from facerace.training.modelcard import evaluation_markdown
from facerace.training.plots import plot_confusion, plot_reliability, try_plot
from facerace.training.runs import discard_if_empty, environment, new_run_dir, write_json


def common_scheme(model_scheme: str, data_scheme: str) -> str:
    """The finest scheme both the model's and the dataset's classes map onto."""
    for target in (data_scheme, model_scheme, "race6", "utk5", "race4"):
        ok = all(s == target or (s, target) in MAPPINGS for s in (model_scheme, data_scheme))
        if ok:
            return target
    return "race4"


def evaluate(
    model: str | Path = "default",
    data: str = "",
    *,
    split: str = "val",
    scheme: str | None = None,
    out: str | Path | None = None,
    path_column: str = "path",
    label_column: str = "label",
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Score `model` on dataset `data` (`KIND:PATH`, split `split`); return (run folder, metrics).

    `scheme` defaults to the finest scheme both label sets map onto (fairface7 on
    FairFace, utk5 for a fairface7 model on UTKFace); probabilities and true labels are
    both mapped onto it through the explicit tables in `facerace.labels`. Beside overall accuracy the metrics
    give the worst race x gender group (`worst_group`), the gap between genders (`gender_gap`), ECE per gender
    and tables per gender, age group, race x gender and age group x gender (`metrics.subgroup_metrics`).
    predictions.csv, metrics.json and report.md are written before the plots; a plot that fails is a
    warning (also in "warnings"), never a lost evaluation. Warns (FaceraceWarning, also
    listed under "warnings" in metrics.json and report.md) when evaluated images are among the model's
    training images, or when the dataset has no split `split` and all of its images are evaluated.
    """
    config, head = load_model(model)
    ds = open_dataset(data, split, path_column=path_column, label_column=label_column)
    scheme = scheme or common_scheme(config.scheme, ds.scheme)
    classes = get_scheme(scheme).classes
    convert_probabilities(np.zeros((1, len(config.classes))), config.scheme, scheme)  # validates the mapping
    keep = [s for s in ds.samples if convert_label(s.label, ds.scheme, scheme) is not None]
    if not keep:
        raise DatasetError(f"{data}: no images whose class exists in scheme {scheme!r}")
    run = new_run_dir(out, "evaluate")
    try:
        embedder = CropEmbedder(model_pipeline(model, config), ds.face_padding)
        emb = embed_files([s.path for s in keep], embedder, cache_dir=cache_dir, workers=workers,
                          progress=not quiet, desc=f"embedding {ds.kind}")
    except BaseException:
        discard_if_empty(run)  # no empty run folder is left behind
        raise
    samples = [s for s, ok in zip(keep, emb.ok) if ok]
    overlap = training_overlap(model, config, [d for d, ok in zip(emb.digests, emb.ok) if ok])
    notes = _warnings(data, ds.split, split, len(samples), overlap)
    for note in notes:
        warnings.warn(FaceraceWarning(note), stacklevel=2)
    probs = convert_probabilities(head.predict_proba(emb.vectors), config.scheme, scheme)
    y = np.array([classes.index(convert_label(s.label, ds.scheme, scheme)) for s in samples])
    y_pred = probs.argmax(1)
    confidence = probs.max(1)
    metrics = classification_metrics(y, probs, classes)
    threshold = config.threshold_for(scheme)
    certain = confidence >= threshold
    right = y_pred == y
    metrics.update({
        "model": {"path": str(model), "name": config.name, "version": config.version, "scheme": config.scheme},
        "data": {"spec": data, "split": ds.split, "scheme": ds.scheme, "images": len(ds.samples),
                 "dropped_no_class_in_scheme": len(ds.samples) - len(keep), "unreadable": len(emb.errors),
                 "layout_problems": len(ds.problems),
                 "face_detected_fraction": float(emb.detected.mean()),
                 "known_region_used": int((~emb.detected).sum())},
        "scheme": scheme,
        "merged": _merged(config.scheme, scheme),
        "threshold": threshold,
        "uncertain": int((~certain).sum()),
        "uncertain_fraction": float(1 - certain.mean()),
        "uncertain_ci95": wilson(int((~certain).sum()), len(y)),
        "certain": int(certain.sum()),
        "correct_when_certain": int(right[certain].sum()),
        "accuracy_when_certain": float(np.mean(right[certain])) if certain.any() else None,
        "accuracy_when_certain_ci95": wilson(int(right[certain].sum()), int(certain.sum())),
        "training_overlap": overlap,
        "warnings": notes,
        **subgroup_metrics(y, probs, classes, [s.gender for s in samples], [s.age for s in samples]),
        "reliability": reliability(confidence, (y_pred == y).astype(float)),
        "environment": environment(),
    })
    metrics["per_age"] = _by_age(metrics["per_age"])
    metrics["per_age_gender"] = _by_age(metrics["per_age_gender"])
    with open(run / "predictions.csv", "w", newline="", errors="backslashreplace") as f:
        w = CsvWriter(f)
        w.writerow(["path", "true", "predicted", "confidence", *classes])
        for s, t, p, row in zip(samples, y, y_pred, probs):
            w.writerow([s.path, classes[t], classes[p], round(float(row[p]), 4), *(round(float(v), 4) for v in row)])
    title = f"# Evaluation of model `{config.name}` ({model})"
    _write_results(run, metrics, title, drawn=("confusion.png", "reliability.png"))  # complete before any plot
    tried = {"confusion.png": try_plot(plot_confusion, np.array(metrics["confusion"]), classes, run / "confusion.png",
                                       title=f"{ds.kind} {ds.split}"),
             "reliability.png": try_plot(plot_reliability, metrics["reliability"], metrics["ece"],
                                         run / "reliability.png")}
    failed = [note for note in tried.values() if note]
    if failed:
        for note in failed:
            warnings.warn(FaceraceWarning(note), stacklevel=2)
        metrics["warnings"] = [*notes, *failed]
        _write_results(run, metrics, title, drawn=tuple(name for name, note in tried.items() if not note))
    return run, metrics


def _write_results(run: Path, metrics: dict[str, Any], title: str, drawn: tuple[str, ...]) -> None:
    """metrics.json and report.md, which links the plots in `drawn`."""
    write_json(run / "metrics.json", metrics)
    alt = {"confusion.png": "confusion matrices", "reliability.png": "reliability diagram"}
    (run / "report.md").write_text("\n".join([title, "", *evaluation_markdown(metrics),
                                              *(line for name in drawn for line in (f"![{alt[name]}]({name})", ""))]))


def training_overlap(model: str | Path, config: ModelConfig, digests: list[str]) -> dict[str, Any] | None:
    """How many of the evaluated files (their SHA-256s) are among the model's training images; None when the
    model stores no training digests (saved before they were kept)."""
    known = training_digests(model, config)
    if known is None:
        return None
    hits = int(np.isin(digest_prefixes(digests), known).sum())
    return {"images": hits, "of": len(digests), "fraction": hits / len(digests) if digests else 0.0,
            "training_images": int(len(known))}


def _warnings(data: str, split: str, requested: str, n: int, overlap: dict[str, Any] | None) -> list[str]:
    """What a reader of these scores must know: a dataset used whole, images the model was trained on."""
    notes = []
    if split == "all" and requested != "all":
        notes.append(f"{data} has no split {requested!r} (no split sub-folders or column): all of its {n} usable "
                     "images are evaluated; if the model was trained on this dataset, these scores overstate accuracy")
    if overlap and overlap["images"]:
        notes.append(f"{overlap['images']:,} of the {overlap['of']:,} evaluated images ({overlap['fraction']:.1%}) are "
                     "byte-identical to images of the model's training data (its training_files list): these scores "
                     "overstate accuracy on new faces; evaluate on images the model has not seen (e.g. another split)")
    return notes


def _by_age(groups: dict[str, dict]) -> dict[str, dict]:
    """Age groups in age order, not alphabetical."""
    return dict(sorted(groups.items(), key=lambda kv: AGE_GROUPS.index(kv[0]) if kv[0] in AGE_GROUPS else 99))


def _merged(source: str, target: str) -> dict[str, list[str]]:
    """Target classes that gather several source classes (what the mapping merged)."""
    if source == target:
        return {}
    groups: dict[str, list[str]] = {}
    for src, dst in MAPPINGS[(source, target)].items():
        groups.setdefault(dst or "(dropped)", []).append(src)
    return {k: v for k, v in groups.items() if len(v) > 1 or k == "(dropped)"}
