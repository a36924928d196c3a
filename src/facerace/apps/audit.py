"""facerace audit: the composition of a photo collection, per group, with adjusted estimates and 95% intervals.

images -> per-face rows (as `facerace predict` writes them, or read back with `predictions=`)
-> groups -> class shares per group (`facerace.quantify`) -> composition.csv / .json / .png,
faces.jsonl and report.md. `composition()` needs only the per-face rows, so any engine that
produces them can reuse it.
"""

from __future__ import annotations

import csv
import json
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from facerace.errors import (
    InvalidParameterError,
    LabelsWarning,
    MissingDependencyError,
    NoFaceFoundError,
    ShiftWarning,
    SmallGroupWarning,
    check_choice,
)
from facerace.labels import SCHEMES, convert_label, convert_probabilities, get_scheme, mapping_matrix
from facerace.quantify import (
    ADJUSTED,
    METHODS,
    NEEDS_HELDOUT,
    HeldOut,
    estimate,
    shares,
    shift_test,
    validated_strata,
)
from facerace.textout import CsvWriter, progress_bar

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
PREDICTION_FORMATS = (".jsonl", ".csv", ".parquet")

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
                      "probability vector) over the labelled faces with the finite-population correction (1 - n/N) "
                      "(the labelled faces are n of the group's N faces, drawn without replacement)")


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
            ax.set_title(f"{g.name}: {g.faces} faces, {g.method}"
                         + (f" ({g.labelled} labelled)" if self.method == "validated" else ""), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[-1, 0].set_xticks(x, self.classes, rotation=30, ha="right")
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
            lines += ["", f"### {g.name} ({g.faces} faces{labelled}; method `{g.method}`)", "",
                      "| class | count share | estimate | 95% interval |", "|---|---|---|---|"]
            lines += [f"| {c} | {g.count_share[i]:.1%} | {g.estimate[i]:.1%} | {g.ci_low[i]:.1%} - {g.ci_high[i]:.1%} |"
                      for i, c in enumerate(self.classes)]
        if self.labels is not None:
            lines += ["", *label_report(self.labels, self.classes)]
        if self.sampled is not None:
            lines += ["", "## A sample to label", "",
                      f"{sum(self.sampled.values())} faces drawn uniformly at random (seeded) for labelling: "
                      + ", ".join(f"{k}: {v}" for k, v in self.sampled.items()) + ". `sample.csv` lists them, "
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
            lines += ["", "## Warnings", "", *(f"- {w}" for w in self.warnings)]
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
        """Write composition.csv, composition.json, composition.png and report.md into folder `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "composition.csv", "w", newline="") as f:
            w = CsvWriter(f, CSV_COLUMNS)
            w.writeheader()
            w.writerows(self.rows())
        (out / "composition.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.plot(out / "composition.png")
        (out / "report.md").write_text(self.report())
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
             f"`{labels['file']}`: {labels['used']} labelled faces used ("
             + ", ".join(f"{k}: {v}" for k, v in used.items()) + f"); {labels['skipped']} rows skipped by the "
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
        lines += [f"  - {row}" for row in v["rows"]]
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

    Rows with status `ok` are faces; `too_small`, `no_face` and `error` rows are counted per
    group. `scheme` (default: that of the rows' probabilities, or with `labels` the one the labels
    fit best) may be coarser than the rows'. The adjusted methods use `heldout` (the model's
    held-out statistics in `model_scheme`). `labels` (a read labels CSV): `method` defaults to
    `validated`, which uses each group's labelled faces (a group without any keeps the adjusted
    method). `sampler`: offered every classified face with its group, to draw a sample to label.
    """
    from facerace.apps.sample import Collector

    method = check_choice("method", method or ("validated" if labels is not None else "adjusted"), AUDIT_METHODS)
    if method == "validated" and labels is None:
        raise InvalidParameterError("method 'validated' needs labels: --labels FILE (a CSV of path,label[,face]; "
                                    "--sample N draws the faces to label)")
    if replicates < 1:
        raise InvalidParameterError(f"replicates must be at least 1, got {replicates}")
    images: set[str] = set()
    probs: dict[str, list[np.ndarray]] = {ALL: []}
    skipped: dict[str, dict[str, int]] = {ALL: dict.fromkeys(SKIPPED, 0)}
    source: str | None = None
    extra = Collector(labels, sampler, scheme)
    for row in rows:
        images.add(str(row.get("path")))
        group = row.get("group")
        names = [ALL] if group is None else [ALL, f"{group} (group)" if str(group) == ALL else str(group)]
        for name in names:
            probs.setdefault(name, [])
            skipped.setdefault(name, dict.fromkeys(SKIPPED, 0))
        vector = _vector(row, source)
        if vector is not None:
            source = source or vector[0]
            for name in names:
                probs[name].append(vector[1])
            extra.add(row, names, source, vector[1])
        else:
            for name in names:
                skipped[name][row.get("status") if row.get("status") in SKIPPED else "error"] += 1
    if source is None:
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped[ALL].items())
        raise NoFaceFoundError(f"no face could be classified in {len(images)} image(s) ({counts}); see the per-face rows")
    out_scheme = extra.scheme or source
    merge = mapping_matrix(source, out_scheme)
    if method in NEEDS_HELDOUT and heldout is None:
        raise InvalidParameterError(f"method {method!r} needs the model's held-out statistics")
    held = convert_heldout(heldout, model_scheme, source) if heldout is not None else None
    fallback = method if method != "validated" else "adjusted" if held is not None else "probability"
    matched = extra.matched()
    names = [ALL, *sorted(k for k in probs if k != ALL)]
    strata = extra.strata(matched) if matched is not None else {}  # groups with at least 2 labelled faces
    pooled = None
    if method == "validated" and len(names) > 1 and ALL in strata:  # grouped: combine the groups' estimates?
        pooled = not all(g in strata for g in names[1:] if probs[g])
    groups, notes = [], []
    for name in names:
        n = len(probs[name])
        if n == 0:
            notes.append((SmallGroupWarning, f"group {name!r} has no classified face; it is left out of the "
                                             "composition"))
            groups.append(GroupShares(name, 0, skipped[name]))
            continue
        if n < SMALL_GROUP:
            notes.append((SmallGroupWarning, f"group {name!r} has only {n} faces (< {SMALL_GROUP}): its intervals "
                                             "are wide"))
        labelled = extra.labelled(name)
        if method == "validated" and name in strata:
            parts = [strata[g] for g in names[1:] if probs[g]] if name == ALL and pooled is False else [strata[name]]
            est, low, high = validated_strata(parts)
            count = estimate(convert_probabilities(np.stack(probs[name]), source, out_scheme), "count")
            used = "validated"
            if labelled < FEW_LABELS:
                notes.append((LabelsWarning, f"group {name!r} has only {labelled} labelled faces (< {FEW_LABELS}): "
                                             "its validated interval rests on few labels; label more (--sample)"))
        else:
            chosen = fallback if method == "validated" else method
            s = shares(np.stack(probs[name]), chosen, held, merge=merge, replicates=replicates, random_state=seed)
            count, est, low, high = s.count, s.estimate, s.low, s.high
            used = ADJUSTED if chosen == "adjusted" else chosen
            if method == "validated":
                notes.append((LabelsWarning, f"group {name!r} has {labelled or 'no'} labelled face"
                                             f"{'s' * (labelled != 1)}: its rows use the adjusted method ({used})"))
        groups.append(GroupShares(name, n, skipped[name], *(tuple(round(float(v), 4) for v in a)
                                                             for a in (count, est, low, high)), used, labelled))
    summary = None
    if matched is not None:
        summary = _label_summary(matched, out_scheme, scheme is None, extra.labelled_faces(ALL), held, source)
        summary["labelled_per_group"] = {g.name: g.labelled for g in groups if g.faces}
        if pooled is not None:
            summary["all"] = ("pools the labelled faces of every group: right only if they are a uniform random "
                              "sample of all the faces (some group has fewer than 2 labelled faces)" if pooled else
                              "combines the groups' estimates weighted by their numbers of faces (stratified), "
                              "right however unequally the groups were sampled")
        bad = {k: len(v) for k, v in matched.problems.items() if v}
        if bad:
            notes.append((LabelsWarning, f"{matched.file}: {sum(bad.values())} label row(s) not used ("
                                         + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in bad.items())
                                         + "); report.md lists them"))
    shift = _shift(extra.top, np.stack(probs[ALL]), held, seed) if held is not None else None
    if shift is not None and shift["differs"] and method != "validated":
        notes.append((ShiftWarning, f"the faces' top probabilities are distributed unlike those of the model's "
                                    f"held-out faces (distance {shift['distance']:.3f}, p = {shift['p_value']:.3f}): "
                                    "these photos may differ from the training photos, and the adjusted estimate "
                                    "may then be biased beyond its interval; for an estimate that holds, label a "
                                    "random sample: --sample 200, then `facerace label OUT`, then --labels"))
    return AuditResult(get_scheme(out_scheme).classes, out_scheme, method, model, tuple(groups), len(images),
                       replicates, seed, len(held.labels) if held is not None else None,
                       tuple(text for _, text in notes), labels=summary, shift=shift,
                       warning_kinds=tuple(kind for kind, _ in notes))


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


def _shift(top: np.ndarray, probs: np.ndarray, held: HeldOut, seed: int) -> dict[str, Any] | None:
    """composition.json's `shift_test` of all the faces (top-probability histogram `top`, probabilities `probs` in
    the held-out statistics' scheme); None under SHIFT_MIN_FACES faces or when the held-out statistics cannot
    give the mix to compare with."""
    if top.sum() < SHIFT_MIN_FACES:
        return None
    try:
        mix = estimate(probs, ADJUSTED, held)
    except InvalidParameterError:  # a class without held-out faces
        return None
    distance, p = shift_test(top, held, mix, random_state=seed)
    return {"test": "Kolmogorov-Smirnov distance between the faces' top probabilities and those of the model's "
                    "held-out faces mixed in the estimated shares (parametric bootstrap p-value, 200 replicates)",
            "faces": int(top.sum()), "distance": round(distance, 4), "p_value": round(p, 4), "level": SHIFT_LEVEL,
            "differs": p < SHIFT_LEVEL}


def _vector(row: dict[str, Any], scheme: str | None) -> tuple[str, np.ndarray] | None:
    """(scheme, probability vector) of an `ok` row whose probabilities are those of `scheme` (any scheme if
    None); None for any other row."""
    probs = row.get("probabilities")
    if row.get("status") != "ok" or not isinstance(probs, dict):
        return None
    try:
        found = rows_scheme(probs)
        vector = np.array([float(probs[c]) for c in SCHEMES[found].classes])
    except (InvalidParameterError, TypeError, ValueError):
        return None
    if scheme not in (None, found) or not np.all(np.isfinite(vector)) or vector.min() < 0 or vector.sum() <= 0:
        return None
    return found, vector / vector.sum()


def rows_scheme(probabilities: dict[str, float]) -> str:
    """The label scheme whose classes are exactly the keys of a row's probabilities."""
    for name, s in SCHEMES.items():
        if set(probabilities) == set(s.classes):
            return name
    raise InvalidParameterError(f"the probabilities' classes {sorted(probabilities)} are not those of a scheme "
                                f"({', '.join(SCHEMES)}); were they written by `facerace predict`?")


def convert_heldout(heldout: HeldOut, source: str, target: str) -> HeldOut:
    """Held-out statistics mapped from scheme `source` onto `target` (faces of dropped classes left out)."""
    if source == target:
        return heldout
    src, dst = SCHEMES[source].classes, get_scheme(target).classes
    labels = [convert_label(src[i], source, target) for i in heldout.labels]
    keep = np.array([c is not None for c in labels])
    return HeldOut(convert_probabilities(heldout.probabilities[keep], source, target),
                   np.array([dst.index(c) for c in labels if c is not None], np.int64))


# ---- reading per-face rows back ----------------------------------------------------------------------------
def read_predictions(path: str | Path) -> Iterator[dict[str, Any]]:
    """Per-face rows from a file `facerace predict` wrote (.jsonl or .csv) or a .parquet with the same columns.

    The file is checked now and read as the rows are consumed. A line or row that cannot be
    read becomes an `error` row, so one bad row never stops an audit.
    """
    path = Path(path)
    if path.is_dir():  # a Parquet folder, as `predict --format parquet` and the ray engine write
        from facerace.apps.tables import read_rows

        if not any(path.rglob("*.parquet")):
            raise InvalidParameterError(f"{path}: a folder of predictions must hold .parquet files")
        return (_parquet_row(row, f"{path}:row {n}") for n, row in enumerate(read_rows(path), 1))
    suffix = path.suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise InvalidParameterError(f"{path}: predictions must be {', '.join(PREDICTION_FORMATS)}, not {suffix!r}")
    if not path.is_file():
        raise InvalidParameterError(f"{path}: no such predictions file")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MissingDependencyError('reading .parquet needs pyarrow: pip install "facerace[parquet]"') from exc
        return (_parquet_row(row, f"{path}:row {n}") for n, row in enumerate(pq.read_table(path).to_pylist(), 1))
    return _text_rows(path, suffix)


def _text_rows(path: Path, suffix: str) -> Iterator[dict[str, Any]]:
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    yield _checked_row(_json(text), f"{path}:{line}")
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                yield _checked_row(_flat(row), f"{path}:{line}")


def _parquet_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(row.get("probabilities"), list):  # a parquet map column reads as (key, value) pairs
        row["probabilities"] = dict(row["probabilities"])
    return _checked_row(row if "probabilities" in row else _flat(row), where)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV-style row (`p_<class>` columns) with its probabilities gathered into a dict."""
    out = {k: v for k, v in row.items() if not k.startswith("p_")}
    probs = {k[2:]: v for k, v in row.items() if k.startswith("p_") and v not in (None, "")}
    out["probabilities"] = probs or None
    return out


def _checked_row(row: Any, where: str) -> dict[str, Any]:
    """`row` if it is a per-face row (its probabilities are checked by `composition`); else an error row."""
    if not isinstance(row, dict) or "status" not in row:
        return {"path": where, "status": "error", "error": "not a per-face row (no status)"}
    return row


# ---- the whole audit ------------------------------------------------------------------------------------
def grouper(by: str | None, paths: Sequence[str] = (), *, column: str | None = None
            ) -> Callable[[dict[str, Any]], str | None]:
    """The function giving a row's group: none, the folder holding its image, or a column.

    A column is looked up in the row itself (predictions files) or else in the CSVs among
    `paths` that listed the image (in CSV column `column`, default path or file).
    """
    if by in (None, "none"):
        return lambda row: None
    if by == "folder":
        return lambda row: str(Path(str(row.get("path"))).parent)
    lookup = _csv_column(paths, by, column) if paths else {}
    return lambda row: str(row[by]) if row.get(by) not in (None, "") else lookup.get(str(row.get("path")), "(none)")


def _csv_column(paths: Sequence[str], by: str, column: str | None) -> dict[str, str]:
    """image path (as `sources.expand` writes it) -> the value of column `by`, from every CSV in `paths`."""
    from facerace.apps.sources import expand

    lookup: dict[str, str] = {}
    for arg in paths:
        if not (Path(arg).is_file() and Path(arg).suffix.lower() == ".csv"):
            continue
        with open(arg, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if by not in (reader.fieldnames or []):
                raise InvalidParameterError(f"--by {by}: {arg} has no column {by!r}; its columns are: "
                                            f"{', '.join(reader.fieldnames or [])}")
            values = [r.get(by) or "(none)" for r in reader]
        lookup.update({s.path: v for s, v in zip(expand([arg], column=column), values)})
    if not lookup:
        raise InvalidParameterError(f"--by {by}: grouping by a column needs CSV inputs that have it, or --from "
                                    "a predictions file; use --by folder or --by none for images and folders")
    return lookup


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
    of an earlier `facerace predict` run (.jsonl, .csv, .parquet; made with model `model`)
    instead of predicting `paths`. `method`: one of AUDIT_METHODS (`adjusted` is `quantify.ADJUSTED`;
    the default is `validated` with `labels`, else `adjusted`); bootstrap intervals come from
    `replicates` replicates (seed 0). `engine`: how and where the faces are predicted (detector,
    CSV column, default this machine with all cores); with `Engine("ray")` the per-face rows are
    computed on a Ray cluster, written as Parquet (`faces/` in `out`, else a temporary folder) and
    the composition is computed here from them. Paths in CSVs must stay inside the CSV's folder.
    `labels`: a CSV of path,label[,face] (see `apps.sample.read_labels`) for a uniform random sample
    of the faces. `sample`: draw N faces per group at random (seeded) to label: `sample.csv` and
    their crops under `sample/` in `out` (needs `out`). `quiet`: no progress bar or notes on stderr.
    With `out`, writes composition.csv/.json/.png, report.md and (unless `predictions`)
    faces.jsonl there. Warnings: SmallGroupWarning, LabelsWarning, ShiftWarning.
    """
    from facerace.apps.sample import Sampler, read_labels
    from facerace.labels import mapping
    from facerace.model import load_config, load_heldout
    from facerace.training.runs import new_run_dir

    engine = engine or Engine()
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
    strs = [str(p) for p in paths]
    group = grouper(by, strs, column=engine.column)
    if predictions is not None:
        rows: Iterable[dict[str, Any]] = read_predictions(predictions)
    else:
        rows = _predicted_rows(strs, model=model, engine=engine, quiet=quiet)
    folder = new_run_dir(out, "audit") if out is not None else None  # after every check of the inputs
    if predictions is None and engine.kind == "ray":
        rows = _ray_rows(rows, folder)
    grouped = ({**r, "group": group(r)} for r in rows)
    if folder is not None and predictions is None and engine.kind == "local":
        grouped = _written(grouped, folder / "faces.jsonl")
    result = composition(grouped, model={"name": config.name, "version": config.version, "path": str(model)},
                         model_scheme=config.scheme, heldout=heldout, scheme=scheme, method=method,
                         replicates=replicates, labels=label_file, sampler=sampler)
    if sampler is not None:
        result = replace(result, sampled={g: len(f) for g, f in sorted(sampler.faces.items())})
    for note, kind in zip(result.warnings, result.warning_kinds):
        warnings.warn(note, kind, stacklevel=2)
    if folder is not None:
        result.save(folder)
        if sampler is not None:
            sampler.write(folder)
    return result


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


def _predicted_rows(paths: list[str], *, model: str | Path, engine: Engine, quiet: bool
                    ) -> Iterator[dict[str, Any]] | Callable[[Path], Iterator]:
    """Per-face rows of the images in `paths`, predicted in the model's own scheme; bad inputs give error rows.

    The model, detector and paths are checked now; the images are predicted as the rows are consumed.
    With the ray engine, a function of the folder to write the Parquet rows into (see `_ray_rows`).
    """
    from facerace.apps.sources import expand
    from facerace.predictor import Predictor

    predictor = Predictor(model, detector=engine.detector).validate()
    if engine.kind == "ray":
        from facerace.apps import ray_engine

        def on_ray(folder: Path) -> Iterator[dict[str, Any]]:
            ray_engine.run("predict", paths, str(folder), predictor, ray_address=engine.ray_address,
                           workers=engine.workers, column=engine.column, quiet=quiet)
            return read_predictions(folder)

        return on_ray
    sources = expand(paths, column=engine.column, quiet=quiet)
    return _rows_of(predictor, sources, engine.workers, quiet)


def _ray_rows(run_on_ray: Callable[[Path], Iterator], folder: Path | None) -> Iterator[dict[str, Any]]:
    """The rows the cluster writes as Parquet into `folder`/faces (a temporary folder without `folder`)."""
    if folder is not None:
        yield from run_on_ray(folder / "faces")
        return
    with tempfile.TemporaryDirectory(prefix="facerace-audit-") as tmp:
        yield from run_on_ray(Path(tmp) / "faces")


def _rows_of(predictor: Predictor, sources: list[Source], workers: int | None, quiet: bool
             ) -> Iterator[dict[str, Any]]:
    from facerace.results import ImageResult

    results = iter(predictor.predict_paths([s.path for s in sources if s.error is None], workers=workers))
    for source in progress_bar(sources, quiet=quiet or len(sources) < 2, desc="predicting", unit="img"):
        yield from (ImageResult(path=source.path, error=source.error) if source.error else next(results)).rows()


def _written(rows: Iterable[dict[str, Any]], path: Path) -> Iterator[dict[str, Any]]:
    """Pass rows through, writing each as a JSON line to `path`."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            yield row
