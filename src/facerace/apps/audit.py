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
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from facerace.apps.predictions import PREDICTION_FORMATS, RowBatch, batches_of, read_batches, read_predictions
from facerace.errors import (
    FaceraceWarning,
    InvalidParameterError,
    LabelsWarning,
    NoFaceFoundError,
    ShiftWarning,
    SmallGroupWarning,
    check_choice,
)
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
    Shares,
    check_replicates,
    em_sample,
    estimate,
    merged,
    resampled_confusion,
    shares_of,
    shift_test,
    top_histogram,
    validated_strata,
)
from facerace.textout import CsvWriter, json_text, markdown_text, plot_text, printable, progress_bar

if TYPE_CHECKING:
    from facerace.apps.sample import LabelFile, Matched, Sampler
    from facerace.apps.sources import Source
    from facerace.predictor import Predictor

#: The columns of composition.csv, in order (`method` and `labelled` came last, after the first seven).
CSV_COLUMNS = ("group", "class", "faces", "count_share", "estimate", "ci_low", "ci_high", "method", "labelled")
#: An audit's methods: quantify's, and `validated` (with a labelled sample of the faces, `labels=`).
AUDIT_METHODS = (*METHODS, "validated")
#: Groups with fewer labelled faces get a warning: their validated intervals rest on few labels.
FEW_LABELS = 30
#: The label-free shift test runs on collections of at least this many faces, at this level.
SHIFT_MIN_FACES = 50
SHIFT_LEVEL = 0.05
#: Why the labelled faces must be a uniform random sample (help, README and report say it).
UNIFORM = ("the labelled faces must be a uniform random sample of each group's audited faces (as --sample draws "
           "them): faces picked by hand, or skipped because they were hard to label, make a sample that is not "
           "like the rest, and the estimate and its interval lose their guarantee")
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
__all__ = ["PREDICTION_FORMATS", "AuditResult", "Engine", "GroupShares", "SmallGroupWarning", "Tally", "audit",
           "composition", "read_predictions"]

METHOD_TEXT = {
    "count": "the share of faces whose most probable class is each class (counting predicted labels; biased "
             "toward the classes the model over-predicts)",
    "probability": "the mean of the faces' probability vectors (biased toward the model's training mix)",
    "pacc": "probabilistic adjusted counting: the shares pi that best solve q = M pi on the simplex, where q is the "
            "faces' mean probability vector and M the model's soft confusion matrix on its held-out training faces",
    "em": "Saerens-Latinne-Decaestecker prior re-estimation: expectation-maximisation of the class shares, "
          "rescaling each face's calibrated probabilities by the shares over the training mix",
    "validated": "prediction-powered inference (Angelopoulos, Bates, Fannjiang, Jordan & Zrnic, Science 2023): the "
                 "group's mean probability vector, corrected by the mean of (true class - probability vector) over "
                 "its labelled faces, a uniform random sample of them; unbiased however the photos differ from the "
                 "training photos",
}
VALIDATED_INTERVAL = ("normal interval, estimate +- 1.96 standard errors, from the variance of (true class - "
                      "probability vector) over the labelled faces plus one pseudo-face per class (so that a class "
                      "with few labelled faces does not get too small a variance), with the finite-population "
                      "correction (1 - n/N) (the labelled faces are n of the group's N faces, drawn without "
                      "replacement)")


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
    method: str = ""
    labelled: int = 0


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
    labels: dict[str, Any] | None = None
    shift: dict[str, Any] | None = None
    #: Faces drawn per group for labelling (sample.csv), when a sample was asked for.
    sampled: dict[str, int] | None = None
    warning_kinds: tuple[type[Warning], ...] = field(default=(), repr=False, compare=False)
    #: The folder the audit was written to (None when nothing was written).
    folder: Path | None = None

    @property
    def method_used(self) -> str:
        """The method that computed `estimate` (`adjusted` names the adjusted method it stands for; with
        `validated`, groups without labelled faces use `fallback`)."""
        return ADJUSTED if self.method == "adjusted" else self.method

    @property
    def fallback(self) -> str:
        """The method of the groups that have no (or one) labelled face: that of their rows."""
        methods = [g.method for g in self.groups if g.faces and g.method != "validated"]
        return methods[0] if methods else self.method_used

    def rows(self) -> list[dict[str, Any]]:
        """One row per group and class with exactly the keys CSV_COLUMNS; groups without faces have none."""
        return [{"group": g.name, "class": c, "faces": g.faces, "count_share": g.count_share[i],
                 "estimate": g.estimate[i], "ci_low": g.ci_low[i], "ci_high": g.ci_high[i], "method": g.method,
                 "labelled": g.labelled}
                for g in self.groups if g.faces for i, c in enumerate(self.classes)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the rows plus method, model, scheme, intervals, skipped counts, the labelled sample, the
        shift test and warnings."""
        intervals: dict[str, Any] = {"level": 0.95}
        if any(g.faces and g.method != "validated" for g in self.groups):
            intervals.update(bootstrap_replicates=self.replicates, seed=self.seed, resampled="faces" + (
                f" and the model's {self.heldout_faces} held-out faces (within each true class)"
                if self.fallback == "pacc" else ""))
        if self.method == "validated":
            intervals["validated"] = VALIDATED_INTERVAL
        return {
            "method": self.method, "method_used": self.method_used, "method_description": METHOD_TEXT[self.method_used],
            "model": dict(self.model), "scheme": self.scheme, "classes": list(self.classes),
            "images": self.images, "faces": self.groups[0].faces, "skipped": dict(self.groups[0].skipped),
            "intervals": intervals,
            "groups": [{"group": g.name, "faces": g.faces, "skipped": dict(g.skipped), "method": g.method,
                        "labelled": g.labelled} for g in self.groups],
            "labels": self.labels, "shift_test": self.shift,
            "sample": None if self.sampled is None else {"file": "sample.csv", "faces_per_group": self.sampled,
                                                         "uniform_sample": UNIFORM},
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
            ax.bar(x, est, color="tab:blue", alpha=0.7, label="estimate, 95% interval")
            ax.errorbar(x, est, yerr=err, fmt="none", ecolor="black", capsize=4, linewidth=1)
            ax.scatter(x, g.count_share, marker="_", s=300, color="tab:red", zorder=3, label="share of predicted labels")
            ax.set_ylim(0, min(1.0, max(0.1, float(np.max(g.ci_high)) * 1.15)))
            ax.set_ylabel("share")
            ax.set_title(plot_text(f"{g.name}: {g.faces} faces, {g.method}"
                                   + (f" ({g.labelled} labelled)" if self.method == "validated" else "")), fontsize=10)
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
        """report.md: what was measured, how, the numbers, the labelled sample, warnings and the limits."""
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
            *self._how(d),
            "- `count_share`: the naive share of predicted labels, for comparison.",
            "",
            "## Composition",
        ]
        for g in self.groups:
            if not g.faces:
                continue
            labelled = f", {g.labelled} labelled" if self.method == "validated" else ""
            lines += ["", f"### {md(g.name)} ({g.faces} faces{labelled}; method `{g.method}`)", "",
                      "| class | count share | estimate | 95% interval |", "|---|---|---|---|"]
            lines += [f"| {md(c)} | {g.count_share[i]:.1%} | {g.estimate[i]:.1%} | {g.ci_low[i]:.1%} - "
                      f"{g.ci_high[i]:.1%} |" for i, c in enumerate(self.classes)]
        if self.labels is not None:
            lines += ["", *label_report(self.labels, self.classes)]
        if self.sampled is not None:
            lines += ["", "## A sample to label", "",
                      f"{sum(self.sampled.values())} faces drawn uniformly at random (seeded) for labelling: "
                      + ", ".join(f"{md(k)}: {v}" for k, v in self.sampled.items()) + ". `sample.csv` lists them, "
                      "`sample/` holds their crops; label them with `facerace label` (this folder), then run the "
                      f"audit again with `--labels` (this folder)/labels.csv. Why uniformly at random: {UNIFORM}."]
        if self.shift is not None:
            lines += ["", "## Do these photos look like the training photos? (no labels needed)", "",
                      f"{self.shift['test']}: distance {self.shift['distance']:.3f}, p = {self.shift['p_value']:.3f} "
                      f"({self.shift['faces']} faces). " + (
                          "**They differ**: the adjusted estimate may be biased beyond its interval; a labelled "
                          "random sample (`--sample`, then `facerace label`, then `--labels`) gives an estimate "
                          "that holds." if self.shift["differs"] else
                          "No difference found at the 5% level (which does not prove there is none).")]
        if self.warnings:
            lines += ["", "## Warnings", "", *(f"- {md(w)}" for w in self.warnings)]
        lines += ["", "![composition](composition.png)", "", "## Limits", "", *(f"- {x}" for x in LIMITS), ""]
        return "\n".join(lines)

    def _how(self, d: dict[str, Any]) -> list[str]:
        """The report's lines on how the estimates and intervals were computed."""
        lines = []
        if self.method == "validated":
            lines += [f"- `estimate` (rows with method `validated`): {METHOD_TEXT['validated']}. "
                      f"Interval: {VALIDATED_INTERVAL}." + (f" `all` {self.labels['all']}." if self.labels and
                                                            self.labels.get("all") else ""),
                      f"- The guarantee needs a uniform random sample: {UNIFORM}."]
        if "bootstrap_replicates" in d["intervals"]:
            method = self.fallback
            lines += ["- `estimate`" + (f" (rows with method `{method}`: groups with fewer than 2 labelled faces)"
                                         if self.method == "validated" else f": method `{self.method}`"
                                         + (f" (= `{method}`)" if self.method == "adjusted" else ""))
                      + f": {METHOD_TEXT[method]}.",
                      f"- `ci_low`, `ci_high`: 95% percentile bootstrap interval, {self.replicates} replicates (seed "
                      f"{self.seed}) resampling the {d['intervals']['resampled']}."]
        return lines

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


def label_report(labels: dict[str, Any], classes: Sequence[str]) -> list[str]:
    """report.md's section on the labelled sample (`AuditResult.labels`)."""
    used = labels["labelled_per_group"]
    lines = ["## The labelled sample", "",
             f"{markdown_text(labels['file'])}: {labels['used']} labelled faces used ("
             + ", ".join(f"{markdown_text(k)}: {v}" for k, v in used.items()) + f"); {labels['skipped']} rows skipped by the "
             f"labeller (empty label or `skip`)" + (f"; {labels['duplicates']} repeated rows (same face, same label) "
                                                    "counted once" if labels["duplicates"] else "") + ".",
             f"Scheme `{labels['scheme']}`" + (" (chosen from the labels: the scheme reachable from the model's in "
                                               "which most labels are classes)" if labels["scheme_from_labels"]
                                               else "") + ".", "",
             f"Why a uniform random sample: {UNIFORM}."]
    bad = {k: v for k, v in labels["problems"].items() if v["count"]}
    lines += ["", f"Rows not used: {sum(v['count'] for v in bad.values())}" + (":" if bad else ".")]
    for kind, v in bad.items():
        lines.append(f"- {v['count']} {v['description']}" + (f" (the first {len(v['rows'])})" if len(v["rows"])
                                                                < v["count"] else "") + ":")
        lines += [f"  - {markdown_text(row)}" for row in v["rows"]]
    acc = labels.get("accuracy")
    if acc:
        on, held = acc["collection"], acc.get("heldout")
        lines += ["", "### What the labelled faces say about the model", "",
                  f"- Accuracy on this collection (its {on['n']} labelled faces, `{labels['scheme']}`): "
                  f"{on['accuracy']:.1%} (95% Wilson interval {on['ci95'][0]:.1%} - {on['ci95'][1]:.1%})."]
        if held:
            lines.append(f"- Accuracy on the model's {held['n']} held-out training faces: {held['accuracy']:.1%} "
                         f"({held['ci95'][0]:.1%} - {held['ci95'][1]:.1%}).")
        if acc.get("differs"):
            lines.append("- They differ beyond their intervals: **this collection's photos differ from the training "
                         "data**, so the adjusted estimate (which assumes they do not) would be biased here; the "
                         "validated estimate does not assume it.")
        lines += ["", "Confusion on the labelled faces (rows: the label given; columns: the model's top class):", "",
                  "| label \\ model | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                  for c, row in zip(classes, acc["confusion"])]
    return lines


def composition(rows: Iterable[dict[str, Any]], *, model: dict[str, str], model_scheme: str,
                heldout: HeldOut | None = None, scheme: str | None = None, method: str | None = None,
                replicates: int = 1000, seed: int = 0, labels: LabelFile | None = None,
                sampler: Sampler | None = None) -> AuditResult:
    """The composition of per-face rows (keys as `facerace predict` writes them, plus `group` when grouped).

    Rows with status `ok` whose probabilities are usable (see `Tally`) are faces; `too_small`,
    `no_face`, `error` and unusable rows are counted per group. `scheme` (default: that of the
    rows' probabilities, or with `labels` the one the labels fit best) may be coarser than the
    rows'. The adjusted methods use `heldout` (the model's held-out statistics in `model_scheme`).
    `labels` (a read labels CSV): `method` defaults to `validated`, which uses each group's
    labelled faces (a group without any keeps the adjusted method). `sampler`: offered every
    classified face with its group, to draw a sample to label.
    """
    tally = Tally(method=method, scheme=scheme, replicates=replicates, seed=seed, heldout=heldout,
                  model_scheme=model_scheme, labels=labels, sampler=sampler)
    for batch in batches_of(rows, "group", details=tally.details):
        tally.add(batch, batch.values)
    return tally.result(model)


class Tally:
    """Per-group statistics of per-face rows, fed batch by batch (`add`), so that memory does not grow with the rows.

    A row is a face if its status is `ok` and its probabilities are usable: finite, non-negative
    and summing to 1 within SUM_TOLERANCE, in the classes of the first such row; any other row is
    counted as skipped (`error` unless its status is `too_small` or `no_face`). Images are counted
    as runs of rows with the same path (the rows of one image are written together). Groups past
    MAX_GROUPS are pooled into OTHER_GROUPS. With `labels` or `sampler`, every face is also offered
    to an `apps.sample.Collector` (see `composition`).
    """

    def __init__(self, *, method: str | None = None, scheme: str | None = None, replicates: int = 1000,
                 seed: int = 0, heldout: HeldOut | None = None, model_scheme: str | None = None,
                 labels: LabelFile | None = None, sampler: Sampler | None = None) -> None:
        from facerace.apps.sample import Collector

        self.method = check_choice("method", method or ("validated" if labels is not None else "adjusted"),
                                   AUDIT_METHODS)
        if self.method == "validated" and labels is None:
            raise InvalidParameterError("method 'validated' needs labels: --labels FILE (a CSV of path,label[,face]; "
                                        "--sample N draws the faces to label)")
        if self.method in NEEDS_HELDOUT and heldout is None:
            raise InvalidParameterError(f"method {self.method!r} needs the model's held-out statistics")
        chosen = self.method if self.method != "validated" else "adjusted" if heldout is not None else "probability"
        self.used = ADJUSTED if chosen == "adjusted" else chosen  # the method of groups without labelled faces
        self.replicates, self.seed, self.scheme = check_replicates(replicates), seed, scheme
        self.heldout, self.model_scheme = heldout, model_scheme
        if scheme is not None:
            get_scheme(scheme)
        self.labels = labels
        self.collector = Collector(labels, sampler, scheme) if labels is not None or sampler is not None else None
        #: Whether the rows' face indices and boxes are needed (to match labels and to draw the sample).
        self.details = self.collector is not None
        self.source: tuple[str, ...] | None = None
        self.out_scheme: str | None = None
        self.merge: np.ndarray | None = None
        self.stats: dict[str, GroupStats] = {}
        self.skipped: dict[str, Counter[str]] = {ALL: Counter()}
        self.top: np.ndarray | float = 0.0
        self.total: np.ndarray | float = 0.0
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
        if groups is not None:
            named = {g: self._name(g) for g in dict.fromkeys(groups)}  # each distinct group once, in order
            names = [named[g] for g in groups]
        else:
            names = None
        usable = self._usable(batch)
        for i in np.flatnonzero(~usable):
            status = batch.statuses[i]
            kind = status if status in SKIPPED else "error"
            self.skipped[ALL][kind] += 1
            if names is not None and names[i] is not None:
                self.skipped.setdefault(names[i], Counter())[kind] += 1
        if not usable.any():
            return
        rows = np.flatnonzero(usable)
        probs = batch.probabilities[usable]
        probs = probs / probs.sum(1, keepdims=True)
        assert self.merge is not None
        coarse = merged(probs, self.merge)
        fed, labels = (probs if self.used in NEEDS_HELDOUT else coarse), coarse.argmax(1)
        self.top = self.top + top_histogram(probs)
        self.total = self.total + probs.sum(0)  # every face's probabilities in the rows' classes (shift test)
        self._group(ALL).add(fed, labels)
        if self.collector is not None:
            self._collect(batch, rows, probs, names)
        if names is None:
            return
        kept = [names[i] for i in rows]
        codes = np.array([self._codes.setdefault(name, len(self._codes)) for name in kept], np.int64)
        order = np.argsort(codes, kind="stable")
        _, starts = np.unique(codes[order], return_index=True)
        for start, end in zip(starts, [*starts[1:], len(order)]):
            part = order[start:end]
            if kept[part[0]] is not None:
                self._group(kept[part[0]]).add(fed[part], labels[part])

    def _collect(self, batch: RowBatch, rows: np.ndarray, probs: np.ndarray, names: list[str | None] | None) -> None:
        """Offer each face of the batch to the Collector (labels, sample)."""
        assert self.collector is not None and self.source is not None
        source = _scheme_name(self.source)
        faces, boxes = batch.faces or [None] * len(batch), batch.boxes or [None] * len(batch)
        for j, i in enumerate(rows):
            own = names[i] if names is not None else None
            self.collector.add({"path": batch.paths[i], "face": faces[i], "box": boxes[i]},
                               [ALL] if own is None else [ALL, own], source, probs[j])

    def _name(self, group: Any) -> str | None:
        if group is None:
            return None
        name = f"{group} (group)" if str(group) == ALL else str(group)
        if name not in self.skipped:
            if len(self.skipped) > MAX_GROUPS:
                self.pooled += 1
                self.skipped.setdefault(OTHER_GROUPS, Counter())
                return OTHER_GROUPS
            self.skipped[name] = Counter()
        return name

    def _usable(self, batch: RowBatch) -> np.ndarray:
        """Which rows are faces: status ok, usable probabilities in the source classes (fixed by the first)."""
        ok = np.fromiter((s == "ok" for s in batch.statuses), bool, len(batch))
        if batch.classes is None or not ok.any():
            return np.zeros(len(batch), bool)
        if self.source is None:
            self.source = batch.classes
            name = _scheme_name(batch.classes)
            self.out_scheme = get_scheme(self.scheme or (self.labels.scheme(name) if self.labels is not None
                                                         else name)).name
            if self.collector is not None:
                self.collector.scheme = self.out_scheme
            self.merge = mapping_matrix(name, self.out_scheme)
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

    def result(self, model: dict[str, str]) -> AuditResult:
        """The composition of the rows counted so far (`model`: its name, version and path, for the report)."""
        if self.source is None or ALL not in self.stats:
            counts = ", ".join(f"{self.skipped[ALL][k]} {k.replace('_', ' ')}" for k in SKIPPED)
            raise NoFaceFoundError(f"no face could be classified in {self.images} image(s) ({counts}); see the "
                                   "per-face rows")
        assert self.out_scheme is not None
        source = _scheme_name(self.source)
        held, confusions = None, None
        if self.heldout is not None:
            held = convert_heldout(self.heldout, self.model_scheme or source, source)
            if self.used == "pacc":  # one draw of the held-out faces for every group: the model's error is one
                estimate(self.stats[ALL].mean[None], "pacc", held)  # checks the held-out classes
                confusions = resampled_confusion(held, self.replicates, np.random.default_rng(self.seed))
        matched = self.collector.matched() if self.collector is not None else None
        names = [ALL, *sorted(k for k in self.skipped if k != ALL)]
        strata = self.collector.strata(matched) if self.collector is not None and matched is not None else {}
        grouped = [g for g in names[1:] if g in self.stats]
        if self.method == "validated" and grouped and not any(g in strata for g in grouped):
            strata.pop(ALL, None)  # no group has labels to build on: `all` keeps the adjusted method too
        others: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}  # groups without labels, for `all`
        done: dict[str, GroupShares] = {}
        for name in [*names[1:], ALL]:  # `all` last: it combines the groups
            stats, skipped = self.stats.get(name), {k: self.skipped[name][k] for k in SKIPPED}
            if stats is None:
                done[name] = GroupShares(name, 0, skipped)
                continue
            labelled = self.collector.labelled(name) if self.labels is not None and self.collector else 0
            if self.method == "validated" and name in strata:
                parts = [strata[g] for g in grouped if g in strata] if name == ALL and grouped else [strata[name]]
                point, low, high = validated_strata(parts, others=list(others.values()) if name == ALL else [])
                values, used = (stats.counts / stats.n, point, low, high), "validated"
            else:
                s = shares_of(stats, self.used, held, merge=self.merge, replicates=self.replicates,
                              random_state=self.seed, confusions=confusions)
                values, used = (s.count, s.estimate, s.low, s.high), self.used
                if self.method == "validated" and name != ALL:
                    others[name] = self._without_labels(name, stats.n, s)
            done[name] = GroupShares(name, stats.n, skipped, *(tuple(round(float(v), 4) for v in a) for a in values),
                                     used, labelled)
        groups = [done[name] for name in names]
        without = sorted(others) if self.method == "validated" and grouped and ALL in strata else None
        summary = self._label_summary(matched, groups, without, held, source) if matched is not None else None
        shift = _shift(self.top, self.total / self.stats[ALL].n, held, self.seed) if held is not None else None
        notes = self._notes(groups, matched, shift)
        return AuditResult(get_scheme(self.out_scheme).classes, self.out_scheme, self.method, model, tuple(groups),
                           self.images, self.replicates, self.seed, len(held.labels) if held is not None else None,
                           tuple(text for _, text in notes), labels=summary, shift=shift,
                           warning_kinds=tuple(kind for kind, _ in notes))

    def _without_labels(self, name: str, faces: int, s: Shares) -> tuple[int, np.ndarray, np.ndarray]:
        """A group without 2 labelled faces as a stratum of `all`: (faces, shares, variances): its labels if every
        face is labelled (exact), else its adjusted estimate with the variance its 95% interval implies."""
        assert self.collector is not None
        probs, truth = self.collector.labelled_faces(name)
        if len(truth) == faces:
            return faces, np.bincount(truth, minlength=probs.shape[1]) / faces, np.zeros(probs.shape[1])
        return faces, s.estimate, ((s.high - s.low) / (2 * NormalDist().inv_cdf(0.975))) ** 2

    def _label_summary(self, matched: Matched, groups: list[GroupShares], without: list[str] | None,
                       held: HeldOut | None, source: str) -> dict[str, Any]:
        """composition.json's `labels` (see `_label_summary`), with the labelled faces per group."""
        assert self.collector is not None and self.out_scheme is not None
        summary = _label_summary(matched, self.out_scheme, self.scheme is None, self.collector.labelled_faces(ALL),
                                 held, source)
        summary["labelled_per_group"] = {g.name: g.labelled for g in groups if g.faces}
        if without is not None:
            summary["all"] = ("combines the groups' estimates weighted by their numbers of faces (stratified), right "
                              "however unequally the groups were sampled" + (
                                  f"; {len(without)} group(s) with fewer than 2 labelled faces enter with their "
                                  f"{self.used} estimate and the variance of its interval (their labels if all their "
                                  "faces are labelled): " + ", ".join(map(repr, without[:_LISTED]))
                                  + (" ..." if len(without) > _LISTED else "") if without else ""))
        return summary

    def _notes(self, groups: list[GroupShares], matched: Matched | None, shift: dict[str, Any] | None
               ) -> list[tuple[type[Warning], str]]:
        """One summary warning per kind (kind, text): empty groups, small groups, groups with few or no labelled
        faces, unused label rows, em's sampled groups, pooled groups, a shift."""
        def listed(items: list[str]) -> str:
            shown = ", ".join(items[:_LISTED])
            return shown + (f" and {len(items) - _LISTED:,} more" if len(items) > _LISTED else "")

        empty = [_shown(g.name) for g in groups if not g.faces]
        small = [f"{_shown(g.name)} ({g.faces})" for g in groups if 0 < g.faces < SMALL_GROUP]
        sampled = [f"{_shown(name)} ({s.n:,})" for name, s in self.stats.items() if s.sampled]
        notes: list[tuple[type[Warning], str]] = []
        if empty:
            notes.append((SmallGroupWarning, f"{len(empty)} group(s) have no classified face and are left out of the "
                                             f"composition: {listed(empty)}"))
        if small:
            notes.append((SmallGroupWarning, f"{len(small)} group(s) have fewer than {SMALL_GROUP} faces, so their "
                                             f"intervals are wide: {listed(small)}"))
        if self.method == "validated":
            few = [f"{_shown(g.name)} (only {g.labelled} labelled faces)" for g in groups
                   if g.faces and g.method == "validated" and g.labelled < FEW_LABELS]
            none = [f"{_shown(g.name)} ({g.labelled} labelled)" for g in groups if g.faces and g.method != "validated"]
            if few:
                notes.append((LabelsWarning, f"{len(few)} group(s) have fewer than {FEW_LABELS} labelled faces, so "
                                             f"their validated intervals rest on few labels; label more (--sample): "
                                             f"{listed(few)}"))
            if none:
                notes.append((LabelsWarning, f"{len(none)} group(s) without labelled faces (each has no labelled face "
                                             f"or one), so their rows use the adjusted method ({self.used}): "
                                             f"{listed(none)}"))
        if matched is not None:
            bad = {k: len(v) for k, v in matched.problems.items() if v}
            if bad:
                notes.append((LabelsWarning, f"{matched.file}: {sum(bad.values())} label row(s) not used ("
                                             + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in bad.items())
                                             + "); report.md lists them"))
        if sampled:
            notes.append((SmallGroupWarning, f"method em estimated {len(sampled)} group(s) from a uniform sample of "
                                             f"{em_sample(self.replicates):,} of their faces (its interval is that of "
                                             "the sample, wider than the whole group's; --method pacc uses every "
                                             f"face): {listed(sampled)}"))
        if self.pooled:
            notes.append((SmallGroupWarning, f"more than {MAX_GROUPS:,} groups: the rows of the further groups are "
                                             f"pooled into {OTHER_GROUPS!r}; group by a coarser column"))
        if shift is not None and shift["differs"] and self.method != "validated":
            notes.append((ShiftWarning, f"the faces' top probabilities are distributed unlike those of the model's "
                                        f"held-out faces (distance {shift['distance']:.3f}, p = {shift['p_value']:.3f}): "
                                        "these photos may differ from the training photos, and the adjusted estimate "
                                        "may then be biased beyond its interval; for an estimate that holds, label a "
                                        "random sample: --sample 200, then `facerace label OUT`, then --labels"))
        return notes


def _shown(name: str, width: int = 60) -> str:
    """A group name for a warning: quoted, control characters escaped, cut to `width` characters."""
    text = printable(name)
    return "'" + (text if len(text) <= width else text[:width - 1] + "…") + "'"


def _scheme_name(classes: tuple[str, ...]) -> str:
    """The name of the scheme whose classes (in order) are `classes`."""
    return next(name for name, s in SCHEMES.items() if s.classes == classes)


def _label_summary(matched: Matched, scheme: str, chosen: bool, faces: tuple[np.ndarray, np.ndarray],
                   held: HeldOut | None, source: str) -> dict[str, Any]:
    """composition.json's `labels`: the file, what was used and not, and the model's accuracy on the labelled
    `faces` (probabilities in `scheme`, true classes) beside its held-out accuracy (Wilson intervals), with their
    confusion."""
    from facerace.apps.sample import LISTED, PROBLEMS
    from facerace.training.metrics import wilson

    probs, truth = faces
    out: dict[str, Any] = {
        "file": matched.file, "scheme": scheme, "scheme_from_labels": chosen, "used": len(truth),
        "skipped": matched.skipped, "duplicates": matched.duplicates,
        "problems": {kind: {"count": len(matched.problems[kind]), "description": text,
                            "rows": matched.problems[kind][:LISTED]} for kind, text in PROBLEMS.items()},
        "interval": VALIDATED_INTERVAL, "uniform_sample": UNIFORM,
    }
    if not len(truth):
        return out
    k = probs.shape[1]
    predicted = probs.argmax(1)
    right = int((predicted == truth).sum())
    collection = {"n": len(truth), "correct": right, "accuracy": right / len(truth), "ci95": wilson(right, len(truth))}
    accuracy: dict[str, Any] = {
        "collection": collection,
        "confusion": np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k).tolist()}
    if held is not None:
        h = convert_heldout(held, source, scheme)
        hr = int((h.probabilities.argmax(1) == h.labels).sum())
        accuracy["heldout"] = {"n": len(h.labels), "correct": hr, "accuracy": hr / len(h.labels),
                               "ci95": wilson(hr, len(h.labels))}
        a, b = collection["ci95"], accuracy["heldout"]["ci95"]
        accuracy["differs"] = bool(a[1] < b[0] or b[1] < a[0])
    out["accuracy"] = accuracy
    return out


def _shift(top: np.ndarray, mean: np.ndarray, held: HeldOut, seed: int) -> dict[str, Any] | None:
    """composition.json's `shift_test` of all the faces (top-probability histogram `top`, mean probability vector
    `mean` in the held-out statistics' scheme); None under SHIFT_MIN_FACES faces or when the held-out statistics
    cannot give the mix to compare with."""
    if top.sum() < SHIFT_MIN_FACES:
        return None
    try:
        mix = estimate(mean[None], ADJUSTED, held)
    except InvalidParameterError:  # a class without held-out faces
        return None
    distance, p = shift_test(top, held, mix, random_state=seed)
    return {"test": "Kolmogorov-Smirnov distance between the faces' top probabilities and those of the model's "
                    "held-out faces mixed in the estimated shares (parametric bootstrap p-value, 200 replicates)",
            "faces": int(top.sum()), "distance": round(distance, 4), "p_value": round(p, 4), "level": SHIFT_LEVEL,
            "differs": p < SHIFT_LEVEL}


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
    method: str | None = None,
    predictions: str | Path | None = None,
    engine: Engine | None = None,
    replicates: int = 1000,
    labels: str | Path | None = None,
    sample: int | None = None,
    quiet: bool = False,
) -> AuditResult:
    """The composition of the faces in `paths` (images, folders, globs, CSVs of paths) per group.

    `by`: `none` (one group, `all`), `folder` (the folder holding each image) or the name of
    a column of the CSVs (or of the `predictions` file). `predictions`: read the per-face rows
    of an earlier `facerace predict` run (.jsonl, .csv, .parquet file or folder; made with model
    `model`) instead of predicting `paths`. `method`: one of AUDIT_METHODS (`adjusted` is
    `quantify.ADJUSTED`; the default is `validated` with `labels`, else `adjusted`); bootstrap
    intervals come from `replicates` (1 to quantify.MAX_REPLICATES) replicates (seed 0).
    `engine`: how and where the faces are predicted (detector, CSV column, default this machine
    with all cores); with `Engine("ray")` the per-face rows are computed on a Ray cluster, written
    as Parquet (`faces/` in `out`, else a temporary folder) and the composition is computed here
    from them. Paths in CSVs must stay inside the CSV's folder, each image listed once.
    `labels`: a CSV of path,label[,face] (see `apps.sample.read_labels`) for a uniform random sample
    of the faces. `sample`: draw N faces per group at random (seeded) to label: `sample.csv` and
    their crops under `sample/` in `out` (needs `out`). `quiet`: no progress bar or notes on stderr.
    With `out` (a new or empty folder), writes composition.csv/.json/.png, report.md and (unless
    `predictions`) faces.jsonl into a temporary folder beside it, renamed to `out` when complete
    (`result.folder`). Warnings (one per kind): SmallGroupWarning, LabelsWarning, ShiftWarning.
    """
    from facerace.apps.sample import Sampler, read_labels
    from facerace.labels import mapping
    from facerace.model import load_config, load_heldout
    from facerace.training.runs import check_new_run_dir

    engine = engine or Engine()
    replicates = check_replicates(replicates)
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    if bool(paths) == (predictions is not None):
        raise InvalidParameterError("give images (PATH...) or --from a predictions file, not both or neither")
    if sample is not None and out is None:
        raise InvalidParameterError("--sample needs --out DIR: the sample's faces are written there to be labelled")
    sampler = Sampler(sample) if sample is not None else None
    label_file = read_labels(labels) if labels is not None else None
    method = check_choice("method", method or ("validated" if label_file is not None else "adjusted"), AUDIT_METHODS)
    if method == "validated" and label_file is None:
        raise InvalidParameterError("--method validated needs --labels FILE (a CSV of path,label[,face] for a "
                                    "uniform random sample of the faces; --sample N draws one to label)")
    config = load_config(model)
    if scheme is not None:
        get_scheme(scheme)
        if predictions is None:
            mapping(config.scheme, scheme)  # the model's classes must map onto it
    heldout = load_heldout(model, config) if method in NEEDS_HELDOUT or config.heldout else None
    by = by or "none"
    if out is not None:
        check_new_run_dir(out, "audit")
    tally = Tally(method=method, scheme=scheme, replicates=replicates, heldout=heldout, model_scheme=config.scheme,
                  labels=label_file, sampler=sampler)
    if predictions is not None:
        batches: Any = read_batches(predictions, by if by not in ("none", "folder") else None, details=tally.details)
        lookup: dict[str, str] = {}
    else:
        batches, lookup = _predicted(engine, [str(p) for p in paths], by, model=model, quiet=quiet,
                                     details=tally.details)
    staging = _staging(Path(out)) if out is not None else None  # after every check of the inputs
    stream = iter(batches(staging) if callable(batches) else batches)
    try:
        for batch in stream:
            tally.add(batch, _groups(batch, by, lookup))
        result = tally.result({"name": config.name, "version": config.version, "path": str(model)})
        if sampler is not None:
            result = replace(result, sampled={g: len(f) for g, f in sorted(sampler.faces.items())})
        for note, kind in zip(result.warnings, result.warning_kinds):
            warnings.warn(printable(note), kind, stacklevel=2)
        if staging is not None:
            result.save(staging)
            if sampler is not None:
                sampler.write(staging)
    except BaseException:
        getattr(stream, "close", lambda: None)()  # the rows written so far reach faces.jsonl
        if staging is not None:
            _abandon(staging)
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
    cut = path.rfind("/")
    return _parent(path[:cut] if cut > 0 else "/" if cut == 0 else "")


def _predicted(engine: Engine, paths: list[str], by: str, *, model: str | Path, quiet: bool, details: bool
               ) -> tuple[Any, dict[str, str]]:
    """(the batches of the images' per-face rows, or with the ray engine a function of the run folder giving
    them; image path -> group for `--by COLUMN`). The model, detector, paths and CSVs are checked now; the
    images are predicted as the batches are consumed, the local rows written to faces.jsonl in the folder."""
    from facerace.apps.sources import expand
    from facerace.predictor import Predictor

    predictor = Predictor(model, detector=engine.detector).validate()
    column_group = by if by not in ("none", "folder") else None
    sources = expand(paths, column=engine.column, quiet=quiet, group=column_group)
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
                               workers=engine.workers, column=engine.column, quiet=quiet)
                yield from read_batches(faces, details=details)

        return on_ray, lookup

    def local(folder: Path | None) -> Iterator[RowBatch]:
        rows = _rows_of(predictor, sources, engine.workers, quiet, by)
        if folder is not None:
            rows = _written(rows, folder / "faces.jsonl")
        return batches_of(rows, "group", details=details)

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


def _abandon(staging: Path) -> None:
    """A failed or interrupted audit: keep its folder if per-face rows were computed (say where), else remove it."""
    rows = staging / "faces.jsonl"
    if (rows.is_file() and rows.stat().st_size) or any((staging / "faces").glob("*.parquet")):
        notice(f"the per-face rows computed so far are kept in {staging} (audit them with --from)")
    else:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Engine:
    """How and where an audit predicts its faces (unused with `predictions`): `kind` "local" (this machine,
    `workers` processes, default all cores) or "ray" (a Ray cluster at `ray_address`, default a local one;
    `workers` actors); `detector` (default: the model's); `column`: the CSV column holding paths (default
    path or file)."""

    kind: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    detector: str | None = None
    column: str | None = None

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
