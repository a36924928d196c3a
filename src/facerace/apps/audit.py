"""facerace audit: the composition of a photo collection, per group, with adjusted estimates and 95% intervals.

images -> per-face rows (as `facerace predict` writes them, or read back with `predictions=`)
-> groups -> class shares per group (`facerace.quantify`) -> composition.csv / .json / .png,
faces.jsonl and report.md. `composition()` needs only the per-face rows, so any engine that
produces them can reuse it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from facerace.apps.predictions import PREDICTION_FORMATS, RowBatch, batches_of, read_batches, read_predictions
from facerace.errors import FaceraceWarning, InvalidParameterError, NoFaceFoundError, SmallGroupWarning, check_choice
from facerace.files import notice
from facerace.labels import SCHEMES, convert_label, convert_probabilities, get_scheme, mapping_matrix
from facerace.quantify import (
    ADJUSTED,
    EXACT_FACES,
    METHODS,
    NEEDS_HELDOUT,
    SUM_TOLERANCE,
    GroupStats,
    HeldOut,
    check_replicates,
    em_sample,
    estimate,
    merged,
    resampled_confusion,
    shares_of,
)
from facerace.textout import CsvWriter, json_text, markdown_text, plot_text, printable, progress_bar

if TYPE_CHECKING:
    from facerace.apps.sources import Source
    from facerace.predictor import Predictor

#: The columns of composition.csv, in order.
CSV_COLUMNS = ("group", "class", "faces", "count_share", "estimate", "ci_low", "ci_high")
#: The group every face belongs to.
ALL = "all"
#: Groups with fewer faces get a warning: their intervals are wide.
SMALL_GROUP = 50
#: Row statuses that are counted but not classified.
SKIPPED = ("too_small", "no_face", "error")
#: The most groups an audit keeps apart; the faces of further groups are pooled into OTHER_GROUPS.
MAX_GROUPS = 10_000
OTHER_GROUPS = "(other groups)"
#: Group names listed in one summary warning.
_LISTED = 10
__all__ = ["PREDICTION_FORMATS", "AuditResult", "Engine", "GroupShares", "SmallGroupWarning", "audit", "composition",
           "read_predictions"]

METHOD_TEXT = {
    "count": "the share of faces whose most probable class is each class (counting predicted labels; biased "
             "toward the classes the model over-predicts)",
    "probability": "the mean of the faces' probability vectors (biased toward the model's training mix)",
    "pacc": "probabilistic adjusted counting: the shares pi that best solve q = M pi on the simplex, where q is the "
            "faces' mean probability vector and M the model's soft confusion matrix on its held-out training faces",
    "em": "Saerens-Latinne-Decaestecker prior re-estimation: expectation-maximisation of the class shares, "
          "rescaling each face's calibrated probabilities by the shares over the training mix",
}


@dataclass(frozen=True)
class GroupShares:
    """One group's faces, skipped rows and, per class, naive share, estimate and 95% interval."""

    name: str
    faces: int
    skipped: dict[str, int]
    count_share: tuple[float, ...] = ()
    estimate: tuple[float, ...] = ()
    ci_low: tuple[float, ...] = ()
    ci_high: tuple[float, ...] = ()


@dataclass(frozen=True)
class AuditResult:
    """The composition of a collection: every group (the first is `all`) and how it was measured."""

    classes: tuple[str, ...]
    scheme: str
    method: str
    model: dict[str, str]
    groups: tuple[GroupShares, ...]
    images: int
    replicates: int
    seed: int
    heldout_faces: int | None = None
    warnings: tuple[str, ...] = field(default=())
    #: The folder the audit was written to (None when nothing was written).
    folder: Path | None = None

    @property
    def method_used(self) -> str:
        """The method that computed `estimate` (`adjusted` names the adjusted method it stands for)."""
        return ADJUSTED if self.method == "adjusted" else self.method

    def rows(self) -> list[dict[str, Any]]:
        """One row per group and class with exactly the keys CSV_COLUMNS; groups without faces have none."""
        return [{"group": g.name, "class": c, "faces": g.faces, "count_share": g.count_share[i],
                 "estimate": g.estimate[i], "ci_low": g.ci_low[i], "ci_high": g.ci_high[i]}
                for g in self.groups if g.faces for i, c in enumerate(self.classes)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the rows plus method, model, scheme, intervals, skipped counts and warnings."""
        return {
            "method": self.method, "method_used": self.method_used, "method_description": METHOD_TEXT[self.method_used],
            "model": dict(self.model), "scheme": self.scheme, "classes": list(self.classes),
            "images": self.images, "faces": self.groups[0].faces, "skipped": dict(self.groups[0].skipped),
            "intervals": {"level": 0.95, "bootstrap_replicates": self.replicates, "seed": self.seed,
                          "resampled": "faces" + (f" and the model's {self.heldout_faces} held-out faces (within "
                                                  "each true class)" if self.method_used == "pacc" else "")},
            "groups": [{"group": g.name, "faces": g.faces, "skipped": dict(g.skipped)} for g in self.groups],
            "rows": self.rows(), "warnings": list(self.warnings),
        }

    def plot(self, path: str | Path, *, max_groups: int = 12) -> Path:
        """Bars of the estimates with 95% interval whiskers per group, the naive share marked; return `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = [g for g in self.groups if g.faces][:max_groups]
        x = np.arange(len(self.classes))
        fig, axes = plt.subplots(len(shown), 1, figsize=(max(6.0, 1.1 * len(x)), 2.6 * len(shown) + 0.6),
                                 dpi=110, squeeze=False, sharex=True)
        for ax, g in zip(axes[:, 0], shown):
            est = np.array(g.estimate)
            err = np.array([est - np.array(g.ci_low), np.array(g.ci_high) - est]).clip(0)
            ax.bar(x, est, color="tab:blue", alpha=0.7, label=f"estimate ({self.method_used}), 95% interval")
            ax.errorbar(x, est, yerr=err, fmt="none", ecolor="black", capsize=4, linewidth=1)
            ax.scatter(x, g.count_share, marker="_", s=300, color="tab:red", zorder=3, label="share of predicted labels")
            ax.set_ylim(0, min(1.0, max(0.1, float(np.max(g.ci_high)) * 1.15)))
            ax.set_ylabel("share")
            ax.set_title(plot_text(f"{g.name}: {g.faces} faces"), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[-1, 0].set_xticks(x, [plot_text(c) for c in self.classes], rotation=30, ha="right")
        hidden = sum(1 for g in self.groups if g.faces) - len(shown)
        top = 1 - 0.5 / fig.get_figheight()
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8,
                   title=f"first {len(shown)} groups; {hidden} more in composition.csv" if hidden else None,
                   title_fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, top - (0.2 / fig.get_figheight() if hidden else 0)))
        fig.savefig(path)
        plt.close(fig)
        return Path(path)

    def report(self) -> str:
        """report.md: what was measured, how, the numbers and the limits."""
        d = self.to_dict()
        skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in d["skipped"].items())
        md = markdown_text
        lines = [
            f"# Composition audit: {self.images} images, {d['faces']} faces",
            "",
            "## What was measured",
            f"The share of the faces in each group that would be perceived as each `{self.scheme}` class, in the "
            f"terms of the labels model `{self.model['name']}` (version {self.model['version']}) was trained on: "
            "**perceived** race categories, never anyone's identity, ancestry or self-identification. "
            f"Not counted: {skipped} (see faces.jsonl).",
            "",
            "## How",
            f"- `estimate`: method `{self.method}`" + (f" (= `{self.method_used}`)" if self.method == "adjusted" else "")
            + f": {METHOD_TEXT[self.method_used]}.",
            "- `count_share`: the naive share of predicted labels, for comparison.",
            f"- `ci_low`, `ci_high`: 95% percentile bootstrap interval, {self.replicates} replicates (seed "
            f"{self.seed}) resampling the {d['intervals']['resampled']}.",
            "",
            "## Composition",
        ]
        for g in self.groups:
            if not g.faces:
                continue
            lines += ["", f"### {md(g.name)} ({g.faces} faces)", "",
                      "| class | count share | estimate | 95% interval |", "|---|---|---|---|"]
            lines += [f"| {md(c)} | {g.count_share[i]:.1%} | {g.estimate[i]:.1%} | {g.ci_low[i]:.1%} - "
                      f"{g.ci_high[i]:.1%} |" for i, c in enumerate(self.classes)]
        if self.warnings:
            lines += ["", "## Warnings", "", *(f"- {md(w)}" for w in self.warnings)]
        lines += ["", "![composition](composition.png)", "", "## Limits", "", *(f"- {x}" for x in LIMITS), ""]
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        """Write composition.csv and composition.json, then composition.png and report.md, into folder `out`.

        The numbers are written first: a plot that fails is a warning (in report.md too), never a lost audit."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "composition.csv", "w", newline="") as f:
            w = CsvWriter(f, CSV_COLUMNS)
            w.writeheader()
            w.writerows(self.rows())
        (out / "composition.json").write_text(json_text(self.to_dict(), indent=2) + "\n")
        result = self
        try:
            self.plot(out / "composition.png")
        except Exception as exc:  # matplotlib's own errors on odd text or sizes: the numbers are already written
            note = f"composition.png could not be drawn ({type(exc).__name__}: {exc}); the numbers are in " \
                   "composition.csv"
            warnings.warn(printable(note), FaceraceWarning, stacklevel=2)
            result = replace(self, warnings=(*self.warnings, note))
        (out / "report.md").write_text(result.report())
        return out


LIMITS = (
    "The adjusted methods assume the collection differs from the model's training data only in its mix of "
    "groups, not in how the photos look (lighting, age, pose, resolution, make-up, filters). Under such shifts "
    "the estimate may be biased and the interval does not cover the bias: docs/BENCHMARKS.md measures it "
    "across datasets (UTKFace).",
    "The categories are perceived, coarse and contested social categories, not identity.",
    f"Groups with fewer than {SMALL_GROUP} faces get wide intervals and a warning.",
    "Only detected faces at least the minimum size are counted; faces the detector misses (profile, occluded, "
    "very small) are not in the composition.",
    "The error statistics come from the model's own held-out training faces (see its model card for what "
    "that data covers).",
)


def composition(rows: Iterable[dict[str, Any]], *, model: dict[str, str], model_scheme: str,
                heldout: HeldOut | None = None, scheme: str | None = None, method: str = "adjusted",
                replicates: int = 1000, seed: int = 0) -> AuditResult:
    """The composition of per-face rows (keys as `facerace predict` writes them, plus `group` when grouped).

    Rows with status `ok` whose probabilities are usable (`Tally`) are faces; `too_small`,
    `no_face`, `error` and unusable rows are counted per group. `scheme` (default: that of the
    rows' probabilities) may be coarser than the rows'. The adjusted methods use `heldout` (the
    model's held-out statistics in `model_scheme`).
    """
    tally = Tally(method=method, scheme=scheme, replicates=replicates, seed=seed)
    for batch in batches_of(rows, "group"):
        tally.add(batch, batch.values)
    return tally.result(model=model, model_scheme=model_scheme, heldout=heldout)


class Tally:
    """Per-group statistics of per-face rows, fed batch by batch (`add`), so that memory does not grow with the rows.

    A row is a face if its status is `ok` and its probabilities are usable: finite, non-negative
    and summing to 1 within SUM_TOLERANCE, in the classes of the first such row; any other row is
    counted as skipped (`error` unless its status is `too_small` or `no_face`). Images are counted
    as runs of rows with the same path (the rows of one image are written together). Groups past
    MAX_GROUPS are pooled into OTHER_GROUPS.
    """

    def __init__(self, *, method: str = "adjusted", scheme: str | None = None, replicates: int = 1000,
                 seed: int = 0) -> None:
        self.method = check_choice("method", method, METHODS)
        self.used = ADJUSTED if self.method == "adjusted" else self.method
        self.replicates, self.seed, self.scheme = check_replicates(replicates), seed, scheme
        if scheme is not None:
            get_scheme(scheme)
        self.source: tuple[str, ...] | None = None
        self.merge: np.ndarray | None = None
        self.stats: dict[str, GroupStats] = {}
        self.skipped: dict[str, Counter[str]] = {ALL: Counter()}
        self.images, self.rows, self.pooled = 0, 0, 0
        self._last_path: str | None = None
        self._codes: dict[str | None, int] = {}

    def add(self, batch: RowBatch, groups: list[Any] | None = None) -> None:
        """Count a batch of rows; `groups`: each row's group (None: only `all`)."""
        n = len(batch)
        if not n:
            return
        self.rows += n
        self.images += sum(1 for a, b in zip([self._last_path, *batch.paths[:-1]], batch.paths) if b is None or a != b)
        self._last_path = batch.paths[-1]
        names = [self._name(g) for g in groups] if groups is not None else None
        usable = self._usable(batch)
        for i in np.flatnonzero(~usable):
            status = batch.statuses[i]
            kind = status if status in SKIPPED else "error"
            self.skipped[ALL][kind] += 1
            if names is not None and names[i] is not None:
                self.skipped.setdefault(names[i], Counter())[kind] += 1
        if not usable.any():
            return
        probs = batch.probabilities[usable]
        probs = probs / probs.sum(1, keepdims=True)
        assert self.merge is not None
        coarse = merged(probs, self.merge)
        fed, labels = (probs if self.used in NEEDS_HELDOUT else coarse), coarse.argmax(1)
        self._group(ALL).add(fed, labels)
        if names is None:
            return
        kept = [names[i] for i in np.flatnonzero(usable)]
        codes = np.array([self._codes.setdefault(name, len(self._codes)) for name in kept], np.int64)
        order = np.argsort(codes, kind="stable")
        _, starts = np.unique(codes[order], return_index=True)
        for start, end in zip(starts, [*starts[1:], len(order)]):
            part = order[start:end]
            if kept[part[0]] is not None:
                self._group(kept[part[0]]).add(fed[part], labels[part])

    def _name(self, group: Any) -> str | None:
        if group is None:
            return None
        name = f"{group} (group)" if str(group) == ALL else str(group)
        if name not in self.skipped and len(self.skipped) > MAX_GROUPS:
            self.pooled += 1
            return OTHER_GROUPS
        self.skipped.setdefault(name, Counter())
        return name

    def _usable(self, batch: RowBatch) -> np.ndarray:
        """Which rows are faces: status ok, usable probabilities in the source classes (fixed by the first)."""
        ok = np.fromiter((s == "ok" for s in batch.statuses), bool, len(batch))
        if batch.classes is None or not ok.any():
            return np.zeros(len(batch), bool)
        if self.source is None:
            self.source = batch.classes
            name = next(n for n, sc in SCHEMES.items() if sc.classes == batch.classes)
            self.merge = mapping_matrix(name, get_scheme(self.scheme or name).name)
        if batch.classes != self.source:
            return np.zeros(len(batch), bool)
        p = batch.probabilities
        with np.errstate(invalid="ignore", over="ignore"):
            return ok & np.isfinite(p).all(1) & (p >= 0).all(1) & (np.abs(p.sum(1) - 1) <= SUM_TOLERANCE)

    def _group(self, name: str) -> GroupStats:
        stats = self.stats.get(name)
        if stats is None:
            assert self.source is not None and self.merge is not None
            k = len(self.source) if self.used in NEEDS_HELDOUT else self.merge.shape[1]
            em = self.used == "em"
            stats = self.stats[name] = GroupStats(k, self.merge.shape[1], keep=em_sample(self.replicates) if em
                                                  else EXACT_FACES, sample=em, seed=self.seed + len(self.stats))
        return stats

    def result(self, *, model: dict[str, str], model_scheme: str, heldout: HeldOut | None = None) -> AuditResult:
        """The composition of the rows counted so far."""
        if self.source is None or ALL not in self.stats:
            counts = ", ".join(f"{self.skipped[ALL][k]} {k.replace('_', ' ')}" for k in SKIPPED)
            raise NoFaceFoundError(f"no face could be classified in {self.images} image(s) ({counts}); see the "
                                   "per-face rows")
        source = next(n for n, sc in SCHEMES.items() if sc.classes == self.source)
        out_scheme = get_scheme(self.scheme or source).name
        held, confusions = None, None
        if self.used in NEEDS_HELDOUT:
            if heldout is None:
                raise InvalidParameterError(f"method {self.method!r} needs the model's held-out statistics")
            held = convert_heldout(heldout, model_scheme, source)
            if self.used == "pacc":  # one draw of the held-out faces for every group: the model's error is one
                estimate(self.stats[ALL].mean[None], self.method, held)  # checks the held-out classes
                confusions = resampled_confusion(held, self.replicates, np.random.default_rng(self.seed))
        groups = []
        for name in [ALL, *sorted(k for k in self.skipped if k != ALL)]:
            stats, skipped = self.stats.get(name), {k: self.skipped[name][k] for k in SKIPPED}
            if stats is None:
                groups.append(GroupShares(name, 0, skipped))
                continue
            s = shares_of(stats, self.method, held, merge=self.merge, replicates=self.replicates,
                          random_state=self.seed, confusions=confusions)
            groups.append(GroupShares(name, stats.n, skipped, *(tuple(round(float(v), 4) for v in a)
                                                                for a in (s.count, s.estimate, s.low, s.high))))
        return AuditResult(get_scheme(out_scheme).classes, out_scheme, self.method, model, tuple(groups), self.images,
                           self.replicates, self.seed, len(held.labels) if held is not None else None,
                           self._notes(groups))

    def _notes(self, groups: list[GroupShares]) -> tuple[str, ...]:
        """One summary warning per kind: empty groups, small groups, em's sampled groups, pooled groups."""
        def listed(items: list[str]) -> str:
            shown = ", ".join(items[:_LISTED])
            return shown + (f" and {len(items) - _LISTED:,} more" if len(items) > _LISTED else "")

        empty = [repr(g.name) for g in groups if not g.faces]
        small = [f"{g.name!r} ({g.faces})" for g in groups if 0 < g.faces < SMALL_GROUP]
        sampled = [f"{name!r} ({s.n:,})" for name, s in self.stats.items() if s.sampled]
        notes = []
        if empty:
            notes.append(f"{len(empty)} group(s) have no classified face and are left out of the composition: "
                         f"{listed(empty)}")
        if small:
            notes.append(f"{len(small)} group(s) have fewer than {SMALL_GROUP} faces, so their intervals are wide: "
                         f"{listed(small)}")
        if sampled:
            notes.append(f"method em estimated {len(sampled)} group(s) from a uniform sample of "
                         f"{em_sample(self.replicates):,} of their faces (its interval is that of the sample, wider "
                         f"than the whole group's; --method pacc uses every face): {listed(sampled)}")
        if self.pooled:
            notes.append(f"more than {MAX_GROUPS:,} groups: {self.pooled:,} rows of further groups are pooled "
                         f"into {OTHER_GROUPS!r}; group by a coarser column")
        return tuple(notes)


def convert_heldout(heldout: HeldOut, source: str, target: str) -> HeldOut:
    """Held-out statistics mapped from scheme `source` onto `target` (faces of dropped classes left out)."""
    if source == target:
        return heldout
    src, dst = SCHEMES[source].classes, get_scheme(target).classes
    labels = [convert_label(src[i], source, target) for i in heldout.labels]
    keep = np.array([c is not None for c in labels])
    return HeldOut(convert_probabilities(heldout.probabilities[keep], source, target),
                   np.array([dst.index(c) for c in labels if c is not None], np.int64))


# ---- the whole audit ------------------------------------------------------------------------------------
def audit(
    paths: str | Path | Sequence[str | Path] = (),
    *,
    out: str | Path | None = None,
    by: str = "none",
    scheme: str | None = None,
    model: str | Path = "default",
    method: str = "adjusted",
    detector: str | None = None,
    predictions: str | Path | None = None,
    column: str | None = None,
    engine: Engine | None = None,
    replicates: int = 1000,
    quiet: bool = False,
) -> AuditResult:
    """The composition of the faces in `paths` (images, folders, globs, CSVs of paths) per group.

    `by`: `none` (one group, `all`), `folder` (the folder holding each image) or the name of
    a column of the CSVs (or of the `predictions` file). `predictions`: read the per-face rows
    of an earlier `facerace predict` run (.jsonl, .csv, .parquet; made with model `model`)
    instead of predicting `paths`. `method`: one of METHODS (`adjusted` is `quantify.ADJUSTED`);
    intervals come from `replicates` (1 to quantify.MAX_REPLICATES) bootstrap replicates (seed 0). `engine`: where
    the faces are predicted (default: this machine, all cores); with `Engine("ray")` the per-face rows are
    computed on a Ray cluster, written as Parquet (`faces/` in `out`, else a temporary folder) and
    the composition is computed here from them. `quiet`: no progress bar or notes on stderr. Paths in CSVs
    must stay inside the CSV's folder, each image listed once.
    With `out` (a new or empty folder), writes composition.csv/.json/.png, report.md and (unless
    `predictions`) faces.jsonl into a temporary folder beside it, renamed to `out` when complete
    (`result.folder`). Groups under SMALL_GROUP faces give one SmallGroupWarning.
    """
    from facerace.labels import mapping
    from facerace.model import load_config, load_heldout
    from facerace.training.runs import check_new_run_dir

    method = check_choice("method", method, METHODS)
    replicates = check_replicates(replicates)
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    if bool(paths) == (predictions is not None):
        raise InvalidParameterError("give images (PATH...) or --from a predictions file, not both or neither")
    config = load_config(model)
    if scheme is not None:
        get_scheme(scheme)
        if predictions is None:
            mapping(config.scheme, scheme)  # the model's classes must map onto it
    heldout = load_heldout(model, config) if method in NEEDS_HELDOUT else None
    engine = engine or Engine()
    by = by or "none"
    if out is not None:
        check_new_run_dir(out, "audit")
    if predictions is not None:
        batches = read_batches(predictions, by if by not in ("none", "folder") else None)
        lookup: dict[str, str] = {}
    else:
        batches, lookup = _predicted(engine, [str(p) for p in paths], by, model=model, detector=detector,
                                     column=column, quiet=quiet)
    tally = Tally(method=method, scheme=scheme, replicates=replicates)
    staging = _staging(Path(out)) if out is not None else None  # after every check of the inputs
    try:
        for batch in batches(staging) if callable(batches) else batches:
            tally.add(batch, _groups(batch, by, lookup))
        result = tally.result(model={"name": config.name, "version": config.version, "path": str(model)},
                              model_scheme=config.scheme, heldout=heldout)
        for note in result.warnings:
            warnings.warn(printable(note), SmallGroupWarning, stacklevel=2)
        if staging is not None:
            result.save(staging)
    except BaseException:
        if staging is not None:
            _abandon(staging, quiet)
        raise
    return result if staging is None else replace(result, folder=_publish(staging, Path(out)))


def _groups(batch: RowBatch, by: str, lookup: dict[str, str]) -> list[str | None] | None:
    """Each row's group: None (`--by none`), its image's folder, or its cell of column `by` (else the group
    `lookup` gives its path, else `(none)`); None (only `all`) for a row that could not be read."""
    if by == "none":
        return None
    if by == "folder":
        return [_folder(p) if p is not None else None for p in batch.paths]
    values = batch.values or [None] * len(batch)
    return [None if p is None else str(v) if v not in (None, "") else lookup.get(p, "(none)")
            for v, p in zip(values, batch.paths)]


@lru_cache(maxsize=65536)
def _parent(folder: str) -> str:
    return str(Path(folder or "."))


def _folder(path: str) -> str:
    """The folder holding `path` (as Path(path).parent writes it)."""
    return _parent(os.path.dirname(path))


def _predicted(engine: Engine, paths: list[str], by: str, *, model: str | Path, detector: str | None,
               column: str | None, quiet: bool) -> tuple[Any, dict[str, str]]:
    """(the batches of the images' per-face rows, or with the ray engine a function of the run folder giving
    them; image path -> group for `--by COLUMN`). The model, detector, paths and CSVs are checked now; the
    images are predicted as the batches are consumed, the local rows written to faces.jsonl in the folder."""
    from facerace.apps.sources import expand
    from facerace.predictor import Predictor

    predictor = Predictor(model, detector=detector).validate()
    column_group = by if by not in ("none", "folder") else None
    sources = expand(paths, column=column, quiet=quiet, group=column_group)
    lookup = {s.path: s.group for s in sources if s.group is not None}
    if column_group is not None and not lookup:
        raise InvalidParameterError(f"--by {by}: grouping by a column needs CSV inputs that have it, or --from "
                                    "a predictions file; use --by folder or --by none for images and folders")
    if engine.kind == "ray":
        from facerace.apps import ray_engine

        def on_ray(folder: Path | None) -> Iterator[RowBatch]:
            with tempfile.TemporaryDirectory(prefix="facerace-audit-") as tmp:
                faces = (folder or Path(tmp)) / "faces"
                ray_engine.run("predict", paths, str(faces), predictor, ray_address=engine.ray_address,
                               workers=engine.workers, column=column, quiet=quiet)
                yield from read_batches(faces)

        return on_ray, lookup

    def local(folder: Path | None) -> Iterator[RowBatch]:
        rows = _rows_of(predictor, sources, engine.workers, quiet, by)
        if folder is not None:
            rows = _written(rows, folder / "faces.jsonl")
        return batches_of(rows, "group")

    return local, {}


def _staging(out: Path) -> Path:
    """A new hidden folder beside `out` that the audit is written into before it becomes `out`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0o022)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the audit folder gets the usual mode
        return staging
    except OSError as exc:
        raise InvalidParameterError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _publish(staging: Path, out: Path) -> Path:
    """Rename the complete `staging` folder to `out` (which may be an empty folder); if another run has
    filled `out` meanwhile, keep `staging` and say where it is."""
    try:
        os.rename(staging, out)
    except OSError:
        raise InvalidParameterError(f"--out {out} was filled by another run meanwhile; this audit is complete in "
                                    f"{staging}: rename it") from None
    return out


def _abandon(staging: Path, quiet: bool) -> None:
    """A failed or interrupted audit: keep its folder if per-face rows were computed (say where), else remove it."""
    rows = staging / "faces.jsonl"
    if (rows.is_file() and rows.stat().st_size) or any((staging / "faces").glob("*.parquet")):
        notice(f"the per-face rows computed so far are kept in {staging} (audit them with --from)")
    else:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Engine:
    """Where an audit predicts its faces: `kind` "local" (this machine, `workers` processes, default all
    cores) or "ray" (a Ray cluster at `ray_address`, default a local one; `workers` actors)."""

    kind: str = "local"
    ray_address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        check_choice("engine", self.kind, ("local", "ray"))
        if self.ray_address and self.kind != "ray":
            raise InvalidParameterError("a Ray address needs the ray engine (--engine ray)")


def _rows_of(predictor: Predictor, sources: list[Source], workers: int | None, quiet: bool, by: str
             ) -> Iterator[dict[str, Any]]:
    """The per-face rows of `sources`, each with its `group` (its CSV row's cell, or its folder)."""
    from facerace.results import ImageResult

    results = iter(predictor.predict_paths([s.path for s in sources if s.error is None], workers=workers))
    for source in progress_bar(sources, quiet=quiet or len(sources) < 2, desc="predicting", unit="img"):
        group = None if by == "none" else _folder(source.path) if by == "folder" else source.group or "(none)"
        for row in (ImageResult(path=source.path, error=source.error) if source.error else next(results)).rows():
            yield {**row, "group": group}


def _written(rows: Iterable[dict[str, Any]], path: Path) -> Iterator[dict[str, Any]]:
    """Pass rows through, writing each as a JSON line to `path`."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json_text(row) + "\n")
            yield row
