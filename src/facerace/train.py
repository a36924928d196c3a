"""facerace train: datasets -> cached embeddings (or stored views, to fine-tune) -> a model with early stopping -> a run folder."""

from __future__ import annotations

import csv
import inspect
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .backbones import create_backbone
from .datasets import Dataset, Sample, open_dataset
from .embeddings import CropEmbedder, embed_files, file_digest
from .errors import DatasetError, InvalidParameterError
from .finetune import NETWORKS, ViewEmbedder, fit, load_network
from .head import RaceHead
from .labels import convert_label, get_scheme
from .metrics import choose_threshold, classification_metrics
from .model import ModelConfig, save_model
from .plots import plot_loss
from .runs import environment, new_run_dir, write_json


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) holding out `fraction` of every class, reproducibly."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        val.extend(idx[: max(1, round(fraction * len(idx)))])
    mask = np.zeros(len(y), bool)
    mask[val] = True
    return np.nonzero(~mask)[0], np.nonzero(mask)[0]


def labelled(specs: Sequence[str], split: str, scheme: str, *, path_column: str = "path",
             label_column: str = "label") -> Iterator[tuple[str, Dataset, list[Sample]]]:
    """(spec, dataset, its samples whose class exists in `scheme`) for every dataset spec."""
    for spec in specs:
        ds = open_dataset(spec, split, path_column=path_column, label_column=label_column)
        yield spec, ds, [s for s in ds.samples if convert_label(s.label, ds.scheme, scheme) is not None]


def _report(ds: Dataset, keep: list[Sample], used: int, unreadable: int, detected: np.ndarray) -> dict[str, Any]:
    return {"split": ds.split, "images": len(ds.samples), "used": used,
            "dropped_no_class_in_scheme": len(ds.samples) - len(keep), "unreadable": unreadable,
            "layout_problems": len(ds.problems),
            "face_detected_fraction": float(detected.mean()) if len(detected) else 0.0,
            "known_region_used": int((~detected).sum())}


def load_embeddings(specs: Sequence[str], split: str, scheme: str, *, detector: str, backbone: str,
                    weights: str | None = None, flip_average: bool = True,
                    path_column: str = "path", label_column: str = "label", cache_dir=None, workers=None,
                    quiet=False):
    """Embeddings, class indices in `scheme`, and a report, for every sample of the datasets."""
    classes = get_scheme(scheme).classes
    xs, ys, samples, report = [], [], [], {}
    chips = create_backbone(backbone, weights).input_spec
    for spec, ds, keep in labelled(specs, split, scheme, path_column=path_column, label_column=label_column):
        embedder = CropEmbedder(detector, backbone, chips.chip_size, chips.padding, ds.face_padding, flip_average,
                                weights)
        emb = embed_files([s.path for s in keep], embedder, cache_dir=cache_dir, workers=workers,
                          progress=not quiet, desc=f"embedding {ds.kind}")
        kept = [s for s, ok in zip(keep, emb.ok) if ok]
        xs.append(emb.vectors)
        ys.extend(classes.index(convert_label(s.label, ds.scheme, scheme)) for s in kept)
        samples.extend(kept)
        report[spec] = {**_report(ds, keep, len(kept), len(emb.errors), emb.detected), "computed_now": emb.computed}
    if not samples:
        raise DatasetError(f"no usable images in {', '.join(specs)} for scheme {scheme!r}")
    return np.concatenate(xs), np.array(ys), samples, report


def load_views(specs: Sequence[str], split: str, scheme: str, embedder: ViewEmbedder, *, path_column: str = "path",
               label_column: str = "label", cache_dir=None, workers=None, quiet=False):
    """(FeatureStore of every labelled image's views, class indices, usable rows, report)."""
    from .finetune import compute_views

    classes = get_scheme(scheme).classes
    paths, digests, paddings, ys, spans = [], [], [], [], []
    for spec, ds, keep in labelled(specs, split, scheme, path_column=path_column, label_column=label_column):
        spans.append((spec, ds, keep, len(paths)))
        paths += [str(s.path) for s in keep]
        digests += [file_digest(s.path) for s in tqdm(keep, desc="hashing", disable=quiet, leave=False)]
        paddings += [ds.face_padding] * len(keep)
        ys += [classes.index(convert_label(s.label, ds.scheme, scheme)) for s in keep]
    store = compute_views(paths, digests, paddings, embedder, cache_dir=cache_dir, workers=workers,
                          progress=not quiet)
    report = {}
    for spec, ds, keep, start in spans:
        done = store.done[start : start + len(keep)]
        detected = store.detected[start : start + len(keep)][done]
        report[spec] = {**_report(ds, keep, int(done.sum()), len(keep) - int(done.sum()), detected),
                        "computed_now": store.computed,
                        "views": {"path": str(store.directory), "shape": list(store.features.shape),
                                  "gigabytes": round(store.features.nbytes / 1e9, 3)}}
    rows = np.nonzero(store.done)[0]
    if not len(rows):
        raise DatasetError(f"no usable images in {', '.join(specs)} for scheme {scheme!r}")
    return store, np.array(ys), rows, report


def train(
    data: Sequence[str],
    *,
    scheme: str = "fairface7",
    out: str | Path | None = None,
    split: str = "train",
    val_fraction: float = 0.12,
    seed: int = 0,
    hidden: int = 512,
    learning_rate: float = 3e-4,
    weight_decay: float = 3e-3,
    dropout: float = 0.6,
    patience: int | None = None,
    max_epochs: int | None = None,
    detector: str = "yunet",
    backbone: str = "dlib-resnet-v1-onnx",
    backbone_weights: str | None = None,
    flip_average: bool = True,
    unfreeze: int = 0,
    views: int = 4,
    backbone_learning_rate: float = 3e-5,
    batch_size: int = 128,
    threshold_target: float = 0.8,
    path_column: str = "path",
    label_column: str = "label",
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> Path:
    """Train a model on the datasets `data` (each `KIND:PATH`); return the run folder.

    The run folder is `out` (new or empty) or else `runs/train/expN`; its `model/`
    subfolder is a model usable as `--model RUN`. `resume=True` continues the interrupted
    run in folder `out` (see `resume`).

    With `unfreeze=0` the backbone stays frozen and a head is trained on cached embeddings
    (default patience 15, at most 200 epochs). With `unfreeze=N` the last N units of a
    PyTorch backbone (`dlib-torch`, or `vggface` with its `backbone_weights` file) are fine-tuned
    together with the head on `views` views per image (default patience 5, at most 40
    epochs; see `facerace.finetune`).

    Holds out a stratified `val_fraction` of the data (seed `seed`) for early stopping,
    temperature calibration and the uncertainty threshold (the lowest confidence above
    which validation faces are right `threshold_target` of the time).
    """
    settings = {k: v for k, v in locals().items() if k not in ("out", "cache_dir", "workers", "quiet", "resume")}
    settings["data"] = list(data)
    classes = get_scheme(scheme).classes
    patience = patience or (5 if unfreeze else 15)
    max_epochs = max_epochs or (40 if unfreeze else 200)
    if unfreeze and backbone not in NETWORKS:
        raise InvalidParameterError(f"--unfreeze needs a PyTorch backbone ({', '.join(NETWORKS)}), not {backbone}")
    if unfreeze and views < 2:
        raise InvalidParameterError(f"fine-tuning needs --views >= 2 (the face and its mirror image), got {views}")
    if unfreeze and not flip_average:
        raise InvalidParameterError("fine-tuning always averages each face with its mirror image; drop --no-flip-average")
    if unfreeze:
        load_network(backbone, backbone_weights)[0].split(unfreeze)  # fails early on a bad count or file
    run = Path(out) if resume else new_run_dir(out, "train")
    write_json(run / "config.json", {**settings, "environment": environment()})

    started = time.perf_counter()
    if unfreeze:
        store, y, rows, report = load_views(
            data, split, scheme, ViewEmbedder(backbone, backbone_weights, unfreeze, views, detector),
            path_column=path_column, label_column=label_column, cache_dir=cache_dir, workers=workers, quiet=quiet)
        tr, va = (rows[i] for i in stratified_split(y[rows], val_fraction, seed))
    else:
        x, y, _, report = load_embeddings(data, split, scheme, detector=detector, backbone=backbone,
                                          weights=backbone_weights,
                                          flip_average=flip_average, path_column=path_column,
                                          label_column=label_column, cache_dir=cache_dir, workers=workers, quiet=quiet)
        tr, va = stratified_split(y, val_fraction, seed)
    y_val, tuned = y[va], None
    seconds = {"data": time.perf_counter() - started}
    with tqdm(total=max_epochs, desc="training", unit="epoch", disable=quiet) as bar:
        def on_epoch(epoch, h):
            bar.n = epoch + 1
            bar.set_postfix(train=f"{h.train_loss[-1]:.3f}", val=f"{h.val_loss[-1]:.3f}", best=h.best_epoch + 1)

        if unfreeze:
            try:
                fitted = fit(store, y, tr, va, network=backbone, weights=backbone_weights, unfreeze=unfreeze,
                             classes=classes, hidden=hidden, learning_rate=learning_rate,
                             backbone_learning_rate=backbone_learning_rate, weight_decay=weight_decay,
                             dropout=dropout, batch_size=batch_size, patience=patience, max_epochs=max_epochs,
                             seed=seed, checkpoint=run / "checkpoint.pt", on_epoch=on_epoch)
            except KeyboardInterrupt:
                raise Interrupted(f"training stopped; every finished epoch is in {run / 'checkpoint.pt'}: "
                                  f"continue with `facerace train --resume {run}`") from None
            head, tuned, probs = fitted.head, fitted.tuned, fitted.val_probs
        else:
            head = RaceHead(classes, hidden=hidden, learning_rate=learning_rate, weight_decay=weight_decay,
                            dropout=dropout, patience=patience, max_epochs=max_epochs, random_state=seed)
            head.fit(x[tr], y[tr], x[va], y_val, on_epoch=on_epoch)
            probs = head.predict_proba(x[va])
    seconds["fit"] = time.perf_counter() - started - seconds["data"]
    val_metrics = classification_metrics(y_val, probs, classes)
    confidence, correct = probs.max(1), (probs.argmax(1) == y_val).astype(float)
    threshold = choose_threshold(confidence, correct, threshold_target)

    predict_backbone = NETWORKS[backbone] if unfreeze else backbone
    runner = create_backbone(predict_backbone, backbone_weights)
    config = ModelConfig(
        name=run.name, version=run.name, scheme=scheme, classes=classes, backbone=predict_backbone,
        backbone_version=runner.version, detector=detector, chip_size=runner.input_spec.chip_size,
        chip_padding=runner.input_spec.padding, threshold=round(threshold, 4), flip_average=flip_average,
        backbone_weights=str(Path(backbone_weights).resolve()) if backbone_weights else "",
        threshold_rule=f"lowest confidence at which held-out validation faces are right >= {threshold_target:.0%}"
                       f" of the time (coverage {float((confidence >= threshold).mean()):.1%} of validation faces)",
        trained_on=", ".join(data) + f" (split {split}, {len(tr)} train / {len(va)} validation images)"
                   + (f"; last {unfreeze} units of {backbone} fine-tuned" if unfreeze else ""),
        metrics={"validation_accuracy": round(val_metrics["accuracy"], 4),
                 "validation_macro_f1": round(val_metrics["macro_f1"], 4)},
    )
    save_model(run / "model", config, head, tuned)
    h = head.history_
    plot_loss(h.train_loss, h.val_loss, h.best_epoch, run / "loss.png")
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "val_loss", "val_accuracy"])
        for i, row in enumerate(zip(h.train_loss, h.val_loss, h.val_accuracy), start=1):
            w.writerow([i, *(round(v, 5) for v in row)])
    write_json(run / "metrics.json", {
        "validation": val_metrics, "best_epoch": h.best_epoch + 1, "epochs_run": len(h.train_loss),
        "temperature": head.temperature_, "threshold": threshold, "data": report,
        "n_train": int(len(tr)), "n_validation": int(len(va)),
        "seconds_this_session": {k: round(v, 1) for k, v in seconds.items()},
    })
    return run


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during fine-tuning; the message says how to resume."""


def resume(run: str | Path, *, cache_dir: str | Path | None = None, workers: int | None = None,
           quiet: bool = False) -> Path:
    """Continue the interrupted training run in folder `run` with its own settings (config.json)."""
    config = Path(run) / "config.json"
    if not config.is_file():
        raise InvalidParameterError(f"{run} is not a training run folder (no config.json)")
    settings = json.loads(config.read_text())
    settings.pop("environment", None)
    unknown = set(settings) - set(inspect.signature(train).parameters)
    if unknown or "data" not in settings:
        raise InvalidParameterError(f"{config} was not written by this facerace version (settings "
                                    f"{sorted(unknown) or ['data missing']}); start a new run instead")
    return train(settings.pop("data"), **settings, out=run, cache_dir=cache_dir, workers=workers, quiet=quiet,
                 resume=True)
