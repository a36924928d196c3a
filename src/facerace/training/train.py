"""facerace train: datasets -> cached embeddings (or stored views, to fine-tune) -> a model with early stopping -> a run folder."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from facerace.backbones import BACKBONES, InputSpec, create_backbone, create_network, fine_tunable
from facerace.errors import DatasetError, FaceraceWarning, InvalidParameterError, TrainingInterrupted
from facerace.faces import FacePipeline
from facerace.head import RaceHead, group_weights
from facerace.labels import convert_label, get_scheme
from facerace.model import ModelConfig, save_model
from facerace.quantify import HeldOut
from facerace.textout import CsvWriter, progress_bar
from facerace.training.config import BALANCE, TrainConfig
from facerace.training.datasets import Dataset, Sample, open_dataset, race_gender_counts
from facerace.training.embeddings import CropEmbedder, embed_files, file_digests
from facerace.training.finetune import ViewActivations, compute_views, fit
from facerace.training.metrics import classification_metrics, scheme_thresholds
from facerace.training.plots import plot_loss, try_plot
from facerace.training.runs import environment, new_run_dir, write_json


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


def labelled(config: TrainConfig, split: str | None = None) -> Iterator[tuple[str, Dataset, list[Sample]]]:
    """(spec, dataset, its samples whose class exists in the config's scheme) for every dataset of `config`;
    warns (FaceraceWarning) when a dataset has no such split and all of its images are used."""
    for spec in config.data:
        ds = open_dataset(spec, split or config.split, path_column=config.path_column,
                          label_column=config.label_column)
        if ds.split == "all" and (split or config.split) != "all":
            warnings.warn(FaceraceWarning(
                f"{spec} has no split {split or config.split!r} (no split sub-folders or column): all of its "
                f"{len(ds.samples)} images are used for training; evaluate the model on other images"), stacklevel=2)
        yield spec, ds, [s for s in ds.samples if convert_label(s.label, ds.scheme, config.scheme) is not None]


def _report(ds: Dataset, keep: list[Sample], used: int, unreadable: int, detected: np.ndarray) -> dict[str, Any]:
    genders: dict[str, int] = {}
    for s in keep:
        genders[s.gender or "unknown"] = genders.get(s.gender or "unknown", 0) + 1
    return {"split": ds.split, "images": len(ds.samples), "used": used, "per_gender": genders,
            "dropped_no_class_in_scheme": len(ds.samples) - len(keep), "unreadable": unreadable,
            "layout_problems": len(ds.problems),
            "face_detected_fraction": float(detected.mean()) if len(detected) else 0.0,
            "known_region_used": int((~detected).sum())}


def _mix(ds: Dataset, used: list[Sample], scheme: str) -> dict[str, Any]:
    """The title of a dataset and its used images counted per class (in `scheme`) x gender."""
    converted = [replace(s, label=convert_label(s.label, ds.scheme, scheme)) for s in used]
    return {"title": ds.title, "per_race_gender": race_gender_counts(converted, get_scheme(scheme).classes)}


def training_mix(report: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig.training_mix from the datasets' reports: titles, images, per gender, per class x gender."""
    cells: dict[str, dict[str, int]] = {}
    for r in report.values():
        for c, row in r["per_race_gender"].items():
            for g, n in row.items():
                cells.setdefault(c, {})[g] = cells.get(c, {}).get(g, 0) + n
    genders: dict[str, int] = {}
    for row in cells.values():
        for g, n in row.items():
            genders[g] = genders.get(g, 0) + n
    return {"data": [r["title"] for r in report.values()], "images": sum(genders.values()),
            "per_gender": dict(sorted(genders.items(), key=lambda kv: (kv[0] == "unknown", kv[0]))),
            "per_race_gender": cells}


def train_pipeline(config: TrainConfig) -> FacePipeline:
    """The face pipeline a training run embeds its images with (detector, network, its chips, flip)."""
    return FacePipeline(config.detector, config.backbone, config.backbone_weights, flip_average=config.flip_average)


def load_embeddings(config: TrainConfig, pipeline: FacePipeline, *, cache_dir=None, workers=None, quiet=False
                    ) -> tuple[np.ndarray, np.ndarray, list[Sample], list[str], dict[str, Any]]:
    """Embeddings, class indices in the config's scheme, samples, their files' SHA-256s and a report, for every
    usable sample of its datasets."""
    classes = get_scheme(config.scheme).classes
    xs, ys, samples, digests, report = [], [], [], [], {}
    for spec, ds, keep in labelled(config):
        emb = embed_files([s.path for s in keep], CropEmbedder(pipeline, ds.face_padding), cache_dir=cache_dir,
                          workers=workers, progress=not quiet, desc=f"embedding {ds.kind}")
        kept = [s for s, ok in zip(keep, emb.ok) if ok]
        digests += [d for d, ok in zip(emb.digests, emb.ok) if ok]
        xs.append(emb.vectors)
        ys.extend(classes.index(convert_label(s.label, ds.scheme, config.scheme)) for s in kept)
        samples.extend(kept)
        report[spec] = {**_report(ds, keep, len(kept), len(emb.errors), emb.detected), "computed_now": emb.computed,
                        **_mix(ds, kept, config.scheme)}
    if not samples:
        raise DatasetError(f"no usable images in {', '.join(config.data)} for scheme {config.scheme!r}")
    return np.concatenate(xs), np.array(ys), samples, digests, report


def load_views(config: TrainConfig, activations: ViewActivations, *, cache_dir=None, workers=None, quiet=False):
    """(FeatureStore of every labelled image's views, class indices, usable rows, their files' SHA-256s, report)."""
    classes = get_scheme(config.scheme).classes
    paths, digests, paddings, ys, spans = [], [], [], [], []
    for spec, ds, keep in labelled(config):
        hashes, _ = file_digests([s.path for s in keep], progress=not quiet)  # unreadable files: None, left out
        readable = [(s, h) for s, h in zip(keep, hashes) if h]
        spans.append((spec, ds, keep, [s for s, _ in readable], len(paths)))
        paths += [str(s.path) for s, _ in readable]
        digests += [h for _, h in readable]
        paddings += [ds.face_padding] * len(readable)
        ys += [classes.index(convert_label(s.label, ds.scheme, config.scheme)) for s, _ in readable]
    store = compute_views(paths, digests, paddings, activations, cache_dir=cache_dir, workers=workers,
                          progress=not quiet)
    report = {}
    for spec, ds, keep, readable, start in spans:
        count = len(readable)
        done = store.done[start : start + count]
        detected = store.detected[start : start + count][done]
        report[spec] = {**_report(ds, keep, int(done.sum()), len(keep) - int(done.sum()), detected),
                        "computed_now": store.computed,
                        **_mix(ds, [s for s, d in zip(readable, done) if d], config.scheme),
                        "views": {"path": str(store.directory), "shape": list(store.features.shape),
                                  "gigabytes": round(store.features.nbytes / 1e9, 3)}}
    rows = np.nonzero(store.done)[0]
    if not len(rows):
        raise DatasetError(f"no usable images in {', '.join(config.data)} for scheme {config.scheme!r}")
    return store, np.array(ys), rows, [digests[i] for i in rows], report


def training_caveat(report: dict[str, Any]) -> str:
    """"Trained on male faces only" when every training image of known gender has the same one, else ""."""
    genders: dict[str, int] = {}
    for r in report.values():
        for g, n in r["per_gender"].items():
            genders[g] = genders.get(g, 0) + n
    known = sorted(set(genders) - {"unknown"})
    if len(known) != 1:
        return ""
    return (f"Trained on {known[0].lower()} faces only"
            + (f" ({genders['unknown']} of unknown gender)" if "unknown" in genders else "")
            + ": accuracy on other faces is not measured by its validation split.")


def balance_groups(balance: str, y: np.ndarray, samples: list[Sample]) -> np.ndarray | None:
    """The group of every sample that `balance` weighs equally (class, or class and gender; a face of unknown
    gender is its own group), None for "none"."""
    if balance == "none":
        return None
    if balance == "race":
        return np.asarray(y).astype(str)
    return np.array([f"{c}|{s.gender or 'unknown'}" for c, s in zip(y, samples)])


def fit_head(config: TrainConfig, x: np.ndarray, y: np.ndarray, samples: list[Sample],
             split: tuple[np.ndarray, np.ndarray], *, on_epoch=None) -> RaceHead:
    """A head trained as `config` says on rows `split[0]` of (x, y), early-stopped and calibrated on rows
    `split[1]`; with `config.balance`, each group's faces are weighed equally in both."""
    tr, va = split
    groups = balance_groups(config.balance, y, samples)
    weights = (None, None) if groups is None else (group_weights(groups[tr]), group_weights(groups[va]))
    head = RaceHead(get_scheme(config.scheme).classes, config.head_params, random_state=config.seed)
    return head.fit(x[tr], y[tr], x[va], y[va], sample_weight=weights[0], val_weight=weights[1], on_epoch=on_epoch)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, before any work."""
    if not config.data:
        raise InvalidParameterError("train needs at least one dataset: --data KIND:PATH")
    get_scheme(config.scheme)
    if config.balance not in BALANCE:
        raise InvalidParameterError(f"--balance must be one of {', '.join(BALANCE)}, got {config.balance!r}")
    if config.unfreeze and config.balance != "none":
        raise InvalidParameterError("--balance is for heads on frozen networks; fine-tuning (--unfreeze) does not "
                                    "weigh groups yet: drop one of the two")
    train_pipeline(config).members  # checks a fused backbone's names and its flip settings
    if config.unfreeze and config.backbone not in fine_tunable():
        raise InvalidParameterError(f"--unfreeze needs a PyTorch backbone ({', '.join(fine_tunable())}), "
                                    f"not {config.backbone}")
    if config.unfreeze and config.views < 2:
        raise InvalidParameterError(f"fine-tuning needs --views >= 2 (the face and its mirror image), got {config.views}")
    if config.unfreeze and not config.flip_average:
        raise InvalidParameterError("fine-tuning always averages each face with its mirror image; drop --no-flip-average")
    if config.unfreeze:  # fails early on a bad count or file
        create_network(config.backbone, config.backbone_weights)[0].split(config.unfreeze)


def train(config: TrainConfig, *, out: str | Path | None = None, cache_dir: str | Path | None = None,
          workers: int | None = None, quiet: bool = False, resume: bool = False) -> Path:
    """Train a model as `config` says; return the run folder.

    The run folder is `out` (new or empty) or else `runs/train/expN`; its `model/`
    subfolder is a model usable as `--model RUN`. `resume=True` continues the interrupted
    run in folder `out` (see `resume`). With `config.unfreeze=0` the network stays frozen and a
    head is trained on cached embeddings; with N > 0 the last N units of a PyTorch network
    are fine-tuned with the head (see `facerace.training.finetune`). The model's calibrated
    probabilities on the held-out faces are stored with it (`heldout.safetensors`), for
    the adjusted estimates of `facerace audit`.
    """
    check_config(config)
    classes = get_scheme(config.scheme).classes
    params = config.head_params
    run = Path(out) if resume else new_run_dir(out, "train")
    write_json(run / "config.json", {**config.to_dict(), "environment": environment()})

    started = time.perf_counter()
    pipeline = train_pipeline(config)
    if config.unfreeze:
        store, y, rows, digests, report = load_views(config, ViewActivations(pipeline, config.unfreeze, config.views),
                                            cache_dir=cache_dir, workers=workers, quiet=quiet)
        tr, va = (rows[i] for i in stratified_split(y[rows], config.val_fraction, config.seed))
    else:
        x, y, samples, digests, report = load_embeddings(config, pipeline, cache_dir=cache_dir, workers=workers,
                                                         quiet=quiet)
        tr, va = stratified_split(y, config.val_fraction, config.seed)
    y_val, tuned = y[va], None
    seconds = {"data": time.perf_counter() - started}
    with progress_bar(total=params.max_epochs, quiet=quiet, desc="training", unit="epoch") as bar:
        def on_epoch(epoch, h):
            bar.n = epoch + 1
            bar.set_postfix(train=f"{h.train_loss[-1]:.3f}", val=f"{h.val_loss[-1]:.3f}", best=h.best_epoch + 1)

        if config.unfreeze:
            try:
                fitted = fit(store, y, (tr, va), config, classes, run / "checkpoint.pt", on_epoch=on_epoch)
            except KeyboardInterrupt:
                raise TrainingInterrupted(f"training stopped; every finished epoch is in {run / 'checkpoint.pt'}: "
                                          f"continue with `facerace train --resume {run}`") from None
            head, tuned, probs = fitted.head, fitted.tuned, fitted.val_probs
        else:
            head = fit_head(config, x, y, samples, (tr, va), on_epoch=on_epoch)
            probs = head.predict_proba(x[va])
    seconds["fit"] = time.perf_counter() - started - seconds["data"]
    val_metrics = classification_metrics(y_val, probs, classes)
    thresholds = scheme_thresholds(y_val, probs, config.scheme, config.threshold_target)
    own = thresholds[config.scheme]

    predict_backbone = BACKBONES[config.backbone].fine_tuned_by if config.unfreeze else config.backbone
    runner = create_backbone(predict_backbone, config.backbone_weights)
    specs: tuple[InputSpec, ...] = getattr(runner, "input_specs", (runner.input_spec,))
    fused = len(specs) > 1
    model_config = ModelConfig(
        name=run.name, version=run.name, scheme=config.scheme, classes=classes, backbone=predict_backbone,
        backbone_version=runner.version, detector=config.detector,
        chip_size=[s.chip_size for s in specs] if fused else specs[0].chip_size,
        chip_padding=[s.padding for s in specs] if fused else specs[0].padding, threshold=own["threshold"],
        flip_average=list(pipeline.flips) if fused else config.flip_average,
        thresholds={s: t["threshold"] for s, t in thresholds.items()}, caveat=training_caveat(report),
        training_mix=training_mix(report),
        backbone_weights=str(Path(config.backbone_weights).resolve()) if config.backbone_weights else "",
        threshold_rule=f"per scheme, the lowest confidence at which held-out validation faces scored in that "
                       f"scheme are right >= {config.threshold_target:.0%} of the time (coverage in "
                       f"{config.scheme}: {own['coverage']:.1%} of validation faces)",
        trained_on=", ".join(config.data) + f" (split {config.split}, {len(tr)} train / {len(va)} validation images)"
                   + (f"; last {config.unfreeze} units of {config.backbone} fine-tuned" if config.unfreeze else ""),
        metrics={"validation_accuracy": round(val_metrics["accuracy"], 4),
                 "validation_macro_f1": round(val_metrics["macro_f1"], 4)},
    )
    save_model(run / "model", model_config, head, tuned, training_files=digests, heldout=HeldOut(probs, y_val))
    h = head.history_
    failed = try_plot(plot_loss, h.train_loss, h.val_loss, h.best_epoch, run / "loss.png")
    if failed:
        warnings.warn(FaceraceWarning(failed), stacklevel=2)
    with open(run / "history.csv", "w", newline="") as f:
        w = CsvWriter(f)
        w.writerow(["epoch", "train_loss", "val_loss", "val_accuracy"])
        for i, row in enumerate(zip(h.train_loss, h.val_loss, h.val_accuracy), start=1):
            w.writerow([i, *(round(v, 5) for v in row)])
    write_json(run / "metrics.json", {
        "validation": val_metrics, "best_epoch": h.best_epoch + 1, "epochs_run": len(h.train_loss),
        "temperature": head.temperature_, "threshold": own["threshold"], "thresholds": thresholds, "data": report,
        "n_train": int(len(tr)), "n_validation": int(len(va)),
        "seconds_this_session": {k: round(v, 1) for k, v in seconds.items()},
    })
    return run


def resume(run: str | Path, *, cache_dir: str | Path | None = None, workers: int | None = None,
           quiet: bool = False) -> Path:
    """Continue the interrupted training run in folder `run` with its own settings (config.json)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise InvalidParameterError(f"{run} is not a training run folder (no config.json)")
    try:
        settings = json.loads(path.read_text(encoding="utf-8-sig"))
        settings.pop("environment", None)
        config = TrainConfig.from_dict(settings)
    except (InvalidParameterError, TypeError, ValueError, AttributeError) as exc:  # also: not JSON, not an object
        raise InvalidParameterError(f"{path} was not written by this facerace version ({exc}); "
                                    "start a new run instead") from None
    return train(config, out=run, cache_dir=cache_dir, workers=workers, quiet=quiet, resume=True)
