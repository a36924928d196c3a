"""facerace train: datasets -> cached embeddings -> a head with early stopping -> a run folder."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from .align import CHIP_PADDING, CHIP_SIZE
from .datasets import open_dataset
from .embeddings import CropEmbedder, embed_files
from .errors import DatasetError
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


def load_embeddings(specs: Sequence[str], split: str, scheme: str, *, detector: str, backbone: str,
                    flip_average: bool = True,
                    path_column: str = "path", label_column: str = "label", cache_dir=None, workers=None,
                    quiet=False):
    """Embeddings, class indices in `scheme`, and a report, for every sample of the datasets."""
    classes = get_scheme(scheme).classes
    xs, ys, samples, report = [], [], [], {}
    for spec in specs:
        ds = open_dataset(spec, split, path_column=path_column, label_column=label_column)
        keep = [s for s in ds.samples if convert_label(s.label, ds.scheme, scheme) is not None]
        embedder = CropEmbedder(detector, backbone, CHIP_SIZE, CHIP_PADDING, ds.face_padding, flip_average)
        emb = embed_files([s.path for s in keep], embedder, cache_dir=cache_dir, workers=workers,
                          progress=not quiet, desc=f"embedding {ds.kind}")
        kept = [s for s, ok in zip(keep, emb.ok) if ok]
        xs.append(emb.vectors)
        ys.extend(classes.index(convert_label(s.label, ds.scheme, scheme)) for s in kept)
        samples.extend(kept)
        report[spec] = {
            "split": ds.split, "images": len(ds.samples), "used": len(kept),
            "dropped_no_class_in_scheme": len(ds.samples) - len(keep),
            "unreadable": len(emb.errors), "layout_problems": len(ds.problems),
            "face_detected_fraction": float(emb.detected.mean()) if len(emb.detected) else 0.0,
            "known_region_used": int((~emb.detected).sum()), "computed_now": emb.computed,
        }
    if not samples:
        raise DatasetError(f"no usable images in {', '.join(specs)} for scheme {scheme!r}")
    return np.concatenate(xs), np.array(ys), samples, report


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
    patience: int = 15,
    max_epochs: int = 200,
    detector: str = "yunet",
    backbone: str = "dlib-resnet-v1-onnx",
    flip_average: bool = True,
    threshold_target: float = 0.8,
    path_column: str = "path",
    label_column: str = "label",
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> Path:
    """Train a head on the datasets `data` (each `KIND:PATH`); return the run folder.

    The run folder is `out` (new or empty) or else `runs/train/expN`; its `model/`
    subfolder is a model usable as `--model RUN`.

    Holds out a stratified `val_fraction` of the data (seed `seed`) for early stopping,
    temperature calibration and the uncertainty threshold (the lowest confidence above
    which validation faces are right `threshold_target` of the time).
    """
    from tqdm import tqdm

    classes = get_scheme(scheme).classes
    run = new_run_dir(out, "train")
    x, y, samples, report = load_embeddings(data, split, scheme, detector=detector, backbone=backbone,
                                            flip_average=flip_average,
                                            path_column=path_column, label_column=label_column,
                                            cache_dir=cache_dir, workers=workers, quiet=quiet)
    tr, va = stratified_split(y, val_fraction, seed)
    head = RaceHead(classes, hidden=hidden, learning_rate=learning_rate, weight_decay=weight_decay, dropout=dropout,
                    patience=patience, max_epochs=max_epochs, random_state=seed)
    with tqdm(total=max_epochs, desc="training", unit="epoch", disable=quiet) as bar:
        def on_epoch(epoch, h):
            bar.update(1)
            bar.set_postfix(train=f"{h.train_loss[-1]:.3f}", val=f"{h.val_loss[-1]:.3f}", best=h.best_epoch + 1)

        head.fit(x[tr], y[tr], x[va], y[va], on_epoch=on_epoch)
    probs = head.predict_proba(x[va])
    val_metrics = classification_metrics(y[va], probs, classes)
    confidence, correct = probs.max(1), (probs.argmax(1) == y[va]).astype(float)
    threshold = choose_threshold(confidence, correct, threshold_target)

    settings = {"data": list(data), "scheme": scheme, "split": split, "val_fraction": val_fraction, "seed": seed,
                "hidden": hidden, "learning_rate": learning_rate, "weight_decay": weight_decay, "dropout": dropout,
                "patience": patience, "max_epochs": max_epochs, "detector": detector,
                "backbone": backbone, "flip_average": flip_average, "threshold_target": threshold_target}
    write_json(run / "config.json", {**settings, "environment": environment()})
    config = ModelConfig(
        name=run.name, version=run.name, scheme=scheme, classes=classes, backbone=backbone,
        backbone_version=_backbone_version(backbone), detector=detector, chip_size=CHIP_SIZE,
        chip_padding=CHIP_PADDING, threshold=round(threshold, 4), flip_average=flip_average,
        threshold_rule=f"lowest confidence at which held-out validation faces are right >= {threshold_target:.0%}"
                       f" of the time (coverage {float((confidence >= threshold).mean()):.1%} of validation faces)",
        trained_on=", ".join(data) + f" (split {split}, {len(tr)} train / {len(va)} validation images)",
        metrics={"validation_accuracy": round(val_metrics["accuracy"], 4),
                 "validation_macro_f1": round(val_metrics["macro_f1"], 4)},
    )
    save_model(run / "model", config, head)
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
    })
    return run


def _backbone_version(name: str) -> str:
    from .backbones import create_backbone

    return create_backbone(name).version
