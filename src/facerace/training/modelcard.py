"""MODEL_CARD.md for a model folder, written from `facerace evaluate` metrics (never by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from facerace.labels import reachable
from facerace.model import ModelConfig, gender_words
from facerace.textout import printable
from facerace.training.metrics import MIN_GROUP_FACES, wilson


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def interval(ci: list[float] | None) -> str:
    """A Wilson 95% interval as `60.5%–64.0%`."""
    return "-" if ci is None else f"{ci[0]:.1%}–{ci[1]:.1%}"


def rate(k: int, n: int, ci: list[float] | None) -> str:
    """A rate with its count and 95% interval: `62.3% (1,788 of 2,871; 95% CI 60.5%–64.0%)`."""
    return "-" if not n else f"{k / n:.1%} ({k:,} of {n:,}; 95% CI {interval(ci)})"


def too_few(n: int, noun: str = "face") -> str:
    """What a group of fewer than MIN_GROUP_FACES faces gets instead of a rate: "too few to measure (12 faces)"."""
    return f"too few to measure ({n:,} {noun}{'s' if n != 1 else ''})"


def group_rate(k: int, n: int, ci: list[float] | None = None, noun: str = "face") -> str:
    """`rate`, or `too_few` for a group of fewer than MIN_GROUP_FACES faces (or predictions: `noun`)."""
    return too_few(n, noun) if n < MIN_GROUP_FACES else rate(k, n, ci or wilson(k, n))


def f1_text(v: dict[str, Any]) -> str:
    """A class's F1, or "-" when its recall or precision rests on fewer than MIN_GROUP_FACES faces."""
    return f"{v['f1']:.3f}" if min(v["support"], v["predicted"]) >= MIN_GROUP_FACES else "-"


def headline(m: dict[str, Any], text: Callable[[object], str] = str) -> list[str]:
    """The headline figures of one evaluation, one line each, labels from the data passed through `text` (`md`
    for Markdown): overall accuracy, the worst race x gender group, the gap between genders, ECE per gender."""
    lines = [f"accuracy {rate(m['correct'], m['n'], m['accuracy_ci95'])}"]
    w, gap = m["worst_group"], m["gender_gap"]
    lines.append(f"worst race x gender group (of those with >= {m['min_group_faces']} faces): "
                 + (f"{text(w['race'])} {text(gender_words(w['gender']))} {rate(w['correct'], w['n'], w['accuracy_ci95'])}" if w else
                    "none measured (no gender labels, or no group that large)"))
    if gap:
        sides = " vs ".join(f"{text(gender_words(g))} {rate(v['correct'], v['n'], v['accuracy_ci95'])}"
                            for g, v in ((g, gap["per_gender"][g]) for g in (gap["higher"], gap["lower"])))
        lines.append(f"gap between genders: {gap['points']:.1f} points (95% CI {gap['points_ci95'][0]:.1f} to "
                     f"{gap['points_ci95'][1]:.1f}): {sides}")
    else:
        lines.append(f"gap between genders: not measured (needs two genders of >= {m['min_group_faces']} faces)")
    if m["ece_per_gender"]:
        lines.append("calibration error (ECE, 15 bins) per gender: " + ", ".join(
            f"{text(g)} " + (f"{e:.3f} (n = {m['per_gender'][g]['n']:,})" if e is not None
                             else too_few(m["per_gender"][g]["n"])) for g, e in m["ece_per_gender"].items()))
    return lines


def evaluation_markdown(m: dict[str, Any]) -> list[str]:
    """Markdown lines for one `facerace evaluate` result: warnings, headline figures, per-class and per-group
    tables (gender, age group, race x gender, age x gender), every rate with its count and Wilson 95% interval,
    groups of fewer than MIN_GROUP_FACES faces marked too few to measure."""
    d = m["data"]
    found = m["n"] - d["known_region_used"]
    lines = [f"### {d['spec'].split(':')[0]} {d['split']}, scored as `{m['scheme']}` (n = {m['n']:,})", ""]
    lines += [f"> **Warning:** {md(w)}" for w in m.get("warnings", [])] + ([""] if m.get("warnings") else [])
    lines += [f"- **{h[0].upper()}{h[1:]}**" if i < 3 else f"- {h[0].upper()}{h[1:]}"
              for i, h in enumerate(headline(m, md))] + [""]
    lines += [
        f"Macro-F1 {m['macro_f1']:.3f}, loss {m['loss']:.3f}, expected calibration error {m['ece']:.3f} (15 bins). "
        f"Faces found by the detector: "
        f"{rate(found, m['n'], wilson(found, m['n']))} (the dataset's known face region was used for the rest). "
        f"Below the threshold ({m['threshold']}): {rate(m['uncertain'], m['n'], m['uncertain_ci95'])} marked "
        f"uncertain; accuracy on the others "
        f"{rate(m['correct_when_certain'], m['certain'], m['accuracy_when_certain_ci95'])}.",
        "",
    ]
    if "training_overlap" in m:
        o = m["training_overlap"]
        lines += ["Evaluated images byte-identical to images of the model's training data: "
                  + ("unknown (the model stores no digests of its training images)." if o is None else
                     f"{o['images']:,} of {o['of']:,}."), ""]
    if m.get("merged"):
        lines += ["Merged for this score: " + "; ".join(f"{k} = {' + '.join(v)}" for k, v in m["merged"].items()), ""]
    lines += ["| class | support | recall (95% CI) | precision (95% CI) | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['support']:,} | {group_rate(v['correct'], v['support'], v['recall_ci95'])} "
              f"| {group_rate(v['correct'], v['predicted'], v['precision_ci95'], 'prediction')} | {f1_text(v)} |"
              for c, v in m["per_class"].items()]
    lines += _group_tables(m)
    env = m.get("environment", {})
    lines += ["", f"_Intervals: Wilson 95% score intervals of each rate (binomial; wide when n is small); the gap "
              f"between genders: Newcombe's interval of the difference. Groups of fewer than {MIN_GROUP_FACES} "
              "faces are too few to measure: their counts are shown, not their rates, and the worst group is "
              "chosen among the others._",
              f"_Measured {env.get('date', '?')} on {env.get('machine', '?')}, "
              f"facerace {env.get('facerace', '?')}._", ""]
    return lines


def _group_tables(m: dict[str, Any]) -> list[str]:
    """Markdown tables per gender, age group, race x gender and age group x gender."""
    lines: list[str] = []
    ece = "ece" in next(iter(m.get("per_gender", {}).values()), {})
    for key, title in (("per_gender", "gender"), ("per_age", "age group")):
        if m.get(key):
            extra = ece and key == "per_gender"
            lines += ["", f"| {title} | n | accuracy (95% CI) | macro-F1 |" + (" ECE |" if extra else ""),
                      "|---|---|---|---|" + ("---|" if extra else "")]
            lines += [f"| {md(g)} | {v['n']:,} | {group_rate(v['correct'], v['n'], v['accuracy_ci95'])} "
                      f"| {_num(v['macro_f1'])} |" + (f" {_num(v['ece'])} |" if extra else "")
                      for g, v in m[key].items()]
    if m.get("per_race_gender"):
        lines += ["", "Race x gender: accuracy is the class's recall among faces of that gender; precision is "
                  "among faces of that gender predicted as the class.", "",
                  "| class | gender | n | accuracy (95% CI) | precision (95% CI) |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {md(g)} | {v['n']:,} | {group_rate(v['correct'], v['n'], v['accuracy_ci95'])} "
                  f"| {group_rate(v['correct'], v['predicted'], v['precision_ci95'], 'prediction')} |"
                  for c, row in m["per_race_gender"].items() for g, v in row.items()]
    if m.get("per_age_gender"):
        lines += ["", "| age group | gender | n | accuracy (95% CI) | macro-F1 |", "|---|---|---|---|---|"]
        lines += [f"| {md(a)} | {md(g)} | {v['n']:,} | {group_rate(v['correct'], v['n'], v['accuracy_ci95'])} "
                  f"| {_num(v['macro_f1'])} |" for a, row in m["per_age_gender"].items() for g, v in row.items()]
    return lines


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def md(text: object) -> str:
    """Text from data (a gender or age label, a warning naming a file) for one Markdown line or table cell:
    control characters escaped, Markdown and HTML syntax characters backslash-escaped."""
    return "".join("\\" + ch if ch in "\\`*_[]<>|~&" else ch for ch in printable(text))


def training_mix_markdown(config: ModelConfig) -> list[str]:
    """The model card's lines on what the model was trained on, per gender and class x gender, from its config;
    says so when the config does not record it."""
    mix = config.training_mix
    if mix is None:
        return ["- Training mix per gender: not recorded in this model's config (saved before facerace kept it)."]
    total = mix["images"]
    genders = sorted(mix["per_gender"], key=lambda g: (g == "unknown", g))
    lines = [f"- Training mix (every image used, fitted or held out): {md(config.mix_summary())}"
             + (" (" + ", ".join(f"{md(gender_words(g))} {mix['per_gender'][g] / total:.1%}" for g in genders) + ")"
                if total else "") + ".", "",
             "| class | " + " | ".join(md(gender_words(g)) for g in genders) + " | all |",
             "|---|" + "---|" * (len(genders) + 1)]
    lines += [f"| {md(c)} | " + " | ".join(f"{row.get(g, 0):,}" for g in genders) + f" | {sum(row.values()):,} |"
              for c, row in mix["per_race_gender"].items()]
    lines += ["| all | " + " | ".join(f"{mix['per_gender'][g]:,}" for g in genders) + f" | {total:,} |", ""]
    known = {g: n for g, n in mix["per_gender"].items() if g != "unknown"}
    if len(known) == 1:
        return lines + [f"- Trained on {md(gender_words(next(iter(known))))} only: accuracy on other faces is not "
                        "measured by its held-out training faces."]
    fewest = min(known, key=lambda g: known[g]) if known else ""
    if fewest and known[fewest] < max(known.values()):
        lines.append(f"- {md(gender_words(fewest)).capitalize()} are fewer in the training data "
                     f"({known[fewest] / sum(known.values()):.0%} of the faces of known gender).")
    cells = [(n, c, g) for c, row in mix["per_race_gender"].items() for g, n in row.items() if g != "unknown"]
    if len(known) > 1 and cells:
        n, c, g = min(cells)
        lines.append(f"- The smallest class x gender group is {md(c)} {md(gender_words(g))} ({n:,} faces): expect "
                     "the model to be less accurate for the smaller groups, and read each group's measured "
                     "accuracy below.")
    return lines


def write_model_card(model_dir: Path, config: ModelConfig, evaluations: Sequence[dict[str, Any]],
                     reproduce: str, figures: Sequence[tuple[str, str]] = ()) -> Path:
    """Write `model_dir/MODEL_CARD.md` from the config, evaluation metrics and (title, file) figures."""
    lines = [
        f"# Model card: facerace `{config.name}` (version {config.version})",
        "",
        "Predicts the **perceived** race category of a face, with a probability for each category. "
        "Race categories are social, coarse and contested: a prediction says how a face may be perceived "
        "in the terms of the training labels, never who a person is or how they identify.",
        "",
        *([f"**Caveat:** {config.caveat}", ""] if config.caveat else []),
        "## Model",
        f"- Pipeline: detector `{config.detector}` -> {_networks(config)} -> "
        f"a small trained head (standardise, {_head(model_dir, config)} softmax) with temperature scaling.",
        f"- Classes (`{config.scheme}`): {', '.join(config.classes)}. Coarser schemes (`race6`, `utk5`, `race4`) "
        "are sums of these probabilities through the tables in `facerace/labels.py`.",
        "- Uncertain: a face whose top probability is below its scheme's threshold is returned with "
        "`uncertain: true`; thresholds: " + ", ".join(f"`{s}` **{config.threshold_for(s)}**" for s in
                                                     reachable(config.scheme))
        + ("" if set(reachable(config.scheme)) <= {config.scheme, *config.thresholds} else
           f" (schemes without their own use the `{config.scheme}` one)") + f". Rule: {config.threshold_rule}.",
        "- Weights: `head.safetensors` (no pickle), SHA-256 in `config.json`, checked at every load.",
        *([f"- Held-out statistics: `{config.heldout}`, the model's calibrated probabilities on its held-out "
           "training faces with their true classes (SHA-256 in `config.json`), used by `facerace audit` to "
           "correct a collection's composition for the model's confusions."] if config.heldout else []),
        "",
        "## Training data",
        f"- {md(config.trained_on)}.",
        *training_mix_markdown(config),
        *(["- FairFace (Kärkkäinen & Joo, WACV 2021), CC BY 4.0: the subset available to this project. "
           "UTKFace (non-commercial) is not used for training."] if "fairface" in config.trained_on.lower() else []),
        "",
        "## Measured performance",
        "Every figure below comes from `facerace evaluate` (see Reproduce): overall accuracy, the worst race x "
        "gender group and the gap between genders first, then per class, gender, age group, race x gender and "
        "age group x gender. UTKFace figures, if any, are cross-dataset (labels mapped to `utk5`).",
        "",
    ]
    for m in evaluations:
        lines += evaluation_markdown(m)
    for title, filename in figures:
        lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    lines += [
        "## Intended use",
        "- Auditing the demographic balance of face datasets and the behaviour of face models per group.",
        "- Research on perceived-race classification, its errors and its biases.",
        "",
        "## Out of scope",
        "- Deciding anything about a person: access, hiring, credit, policing, surveillance, immigration, "
        "advertising targeting, or any use where a person is treated differently because of the prediction.",
        "- Inferring identity, ancestry, ethnicity as self-identified, nationality or religion.",
        "- Use on people who have not agreed to it where the law or ethics require consent.",
        "",
        "## Limits",
        *([f"- {config.caveat}"] if config.caveat else []),
        *_weakest_classes(evaluations),
        "- Crops from FairFace and UTKFace are aligned, mostly frontal photos; side views, occlusion, low light, "
        "very small faces and heavy make-up or filters are not measured.",
        "- Probabilities are calibrated (temperature scaling) on held-out training faces; on other data they may be over- or "
        "under-confident: check `facerace evaluate` on your own labelled data first.",
        "",
        "## Reproduce",
        "```",
        reproduce,
        "```",
        "",
    ]
    path = Path(model_dir) / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def _weakest_classes(evaluations: Sequence[dict[str, Any]]) -> list[str]:
    """A Limits line naming the two classes of lowest recall in the first evaluation (none without one)."""
    if not evaluations:
        return []
    m = evaluations[0]
    recall = sorted((v["recall"], c) for c, v in m["per_class"].items() if v["support"])
    names = " and ".join(f"{md(c)} ({r:.0%})" for r, c in recall[:2])
    return [f"- Categories are coarse: {names} have the lowest recall on {md(m['data']['spec'].split(':')[0])} "
            f"{md(m['data']['split'])}, and neighbouring categories are often confused (see the per-class tables "
            "and confusion matrices)."]


def _networks(config: ModelConfig) -> str:
    """The alignment and frozen network(s) of a model, in words (a fused model: each network, concatenated)."""
    from facerace.backbones import chip_spec, split_backbones

    names = split_backbones(config.backbone)
    one = len(names) == 1
    sizes, paddings, flips = ([v] if one else v for v in (config.chip_size, config.chip_padding, config.flip_average))
    parts = []
    for name, size, padding, flip in zip(names, sizes, paddings, flips):
        align = ("SFace alignment (OpenCV's alignCrop warp of YuNet's 5 landmarks, " if chip_spec(name).alignment == "sface"
                 else "dlib 5-point alignment (") + f"{size} px chip" + (f", padding {padding})" if padding else ")")
        parts.append(f"{align} -> " + ("backbone" if config.tuned else "frozen backbone") + f" `{name}`"
                     + (", each face embedded as the mean of it and its mirror image" if flip else ""))
    text = parts[0] if one else "[" + "] and [".join(parts) + "], their embeddings concatenated"
    return (text + f" ({config.backbone_version})"
            + (f" with its last layers fine-tuned (`{config.tuned}`, SHA-256 in `config.json`)" if config.tuned else ""))


def _head(model_dir: Path, config: ModelConfig) -> str:
    """The head's layers in words (read from its weights file)."""
    from facerace.head import RaceHead

    hidden = RaceHead.load(model_dir / config.weights, config.classes).params.hidden
    return f"{hidden} ReLU units with dropout," if hidden else "a linear layer,"
