"""MODEL_CARD.md for a model folder, written from `facerace evaluate` metrics (never by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from facerace.labels import reachable
from facerace.model import ModelConfig
from facerace.training.metrics import wilson


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def interval(ci: list[float] | None) -> str:
    """A Wilson 95% interval as `60.5%–64.0%`."""
    return "-" if ci is None else f"{ci[0]:.1%}–{ci[1]:.1%}"


def rate(k: int, n: int, ci: list[float] | None) -> str:
    """A rate with its count and 95% interval: `62.3% (1,788 of 2,871; 95% CI 60.5%–64.0%)`."""
    return "-" if not n else f"{k / n:.1%} ({k:,} of {n:,}; 95% CI {interval(ci)})"


def evaluation_markdown(m: dict[str, Any]) -> list[str]:
    """Markdown lines for one `facerace evaluate` result: warnings, summary, per-class and per-group tables,
    every rate with its count and Wilson 95% interval."""
    d = m["data"]
    found = m["n"] - d["known_region_used"]
    lines = [f"### {d['spec'].split(':')[0]} {d['split']}, scored as `{m['scheme']}` (n = {m['n']:,})", ""]
    lines += [f"> **Warning:** {w}" for w in m.get("warnings", [])] + ([""] if m.get("warnings") else [])
    lines += [
        f"Accuracy **{rate(m['correct'], m['n'], m['accuracy_ci95'])}**, macro-F1 {m['macro_f1']:.3f}, "
        f"loss {m['loss']:.3f}, expected calibration error {m['ece']:.3f} (15 bins). Faces found by the detector: "
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
    lines += ["| class | support | recall | recall 95% CI | precision | precision 95% CI | F1 |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {c} | {v['support']} | {_pct(v['recall'])} ({v['correct']}/{v['support']}) | {interval(v['recall_ci95'])} "
              f"| {_pct(v['precision'])} ({v['correct']}/{v['predicted']}) | {interval(v['precision_ci95'])} "
              f"| {v['f1']:.3f} |" for c, v in m["per_class"].items()]
    for key, title in (("per_gender", "gender"), ("per_age", "age group")):
        if m.get(key):
            lines += ["", f"| {title} | n | accuracy | 95% CI | macro-F1 |", "|---|---|---|---|---|"]
            lines += [f"| {g} | {v['n']} | {_pct(v['accuracy'])} ({v['correct']}/{v['n']}) | {interval(v['accuracy_ci95'])} "
                      f"| {v['macro_f1']:.3f} |" for g, v in m[key].items()]
    env = m.get("environment", {})
    lines += ["", "_Intervals: Wilson 95% score intervals of each rate (binomial; wide when n is small)._",
              f"_Measured {env.get('date', '?')} on {env.get('machine', '?')}, "
              f"facerace {env.get('facerace', '?')}._", ""]
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
        f"- {config.trained_on}.",
        "- FairFace (Kärkkäinen & Joo, WACV 2021), CC BY 4.0: the subset available to this project, "
        "**male faces only**. UTKFace (non-commercial) is not used for training.",
        "",
        "## Measured performance",
        "Every figure below comes from `facerace evaluate` (see Reproduce). FairFace figures are on "
        "**male faces only**; UTKFace figures are cross-dataset (both genders, labels mapped to `utk5`).",
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
        "- Categories are coarse: Latino_Hispanic and Middle Eastern are the least accurate classes, and "
        "East vs Southeast Asian are often confused (see the per-class tables).",
        "- Crops from FairFace and UTKFace are aligned, mostly frontal photos; side views, occlusion, low light, "
        "very small faces and heavy make-up or filters are not measured.",
        "- Probabilities are calibrated on FairFace validation data; on other data they may be over- or "
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
