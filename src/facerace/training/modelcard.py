"""MODEL_CARD.md for a model folder, written from `facerace evaluate` metrics (never by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from facerace.model import ModelConfig


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def evaluation_markdown(m: dict[str, Any]) -> list[str]:
    """Markdown lines for one `facerace evaluate` result: summary, per-class and per-group tables."""
    d = m["data"]
    lines = [
        f"### {d['spec'].split(':')[0]} {d['split']}, scored as `{m['scheme']}` (n = {m['n']:,})",
        "",
        f"Accuracy **{_pct(m['accuracy'])}**, macro-F1 {m['macro_f1']:.3f}, loss {m['loss']:.3f}, "
        f"expected calibration error {m['ece']:.3f} (15 bins). Faces found by the detector: "
        f"{_pct(d['face_detected_fraction'])} (the dataset's known face region was used for the rest). "
        f"Below the threshold ({m['threshold']}): {_pct(m['uncertain_fraction'])} of faces marked uncertain; "
        f"accuracy on the others {_pct(m['accuracy_when_certain'])}.",
        "",
    ]
    if m.get("merged"):
        lines += ["Merged for this score: " + "; ".join(f"{k} = {' + '.join(v)}" for k, v in m["merged"].items()), ""]
    lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for c, v in m["per_class"].items()]
    for key, title in (("per_gender", "gender"), ("per_age", "age group")):
        if m.get(key):
            lines += ["", f"| {title} | n | accuracy | macro-F1 |", "|---|---|---|---|"]
            lines += [f"| {g} | {v['n']} | {_pct(v['accuracy'])} | {v['macro_f1']:.3f} |" for g, v in m[key].items()]
    env = m.get("environment", {})
    lines += ["", f"_Measured {env.get('date', '?')} on {env.get('machine', '?')}, facerace {env.get('facerace', '?')}._", ""]
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
        "## Model",
        f"- Pipeline: detector `{config.detector}` -> dlib 5-point alignment ({config.chip_size} px chip, "
        f"padding {config.chip_padding}) -> "
        + ("backbone" if config.tuned else "frozen backbone") + f" `{config.backbone}` ({config.backbone_version})"
        + (f" with its last layers fine-tuned (`{config.tuned}`, SHA-256 in `config.json`)" if config.tuned else "")
        + (", each face embedded as the mean of it and its mirror image" if config.flip_average else "") + " -> "
        "a small trained head (standardise, 512 ReLU units with dropout, softmax) with temperature scaling.",
        f"- Classes (`{config.scheme}`): {', '.join(config.classes)}. Coarser schemes (`race6`, `utk5`, `race4`) "
        "are sums of these probabilities through the tables in `facerace/labels.py`.",
        f"- Uncertain: a face whose top probability is below **{config.threshold}** is returned with "
        f"`uncertain: true`. Rule: {config.threshold_rule}.",
        "- Weights: `head.safetensors` (no pickle), SHA-256 in `config.json`, checked at every load.",
        "",
        "## Training data",
        f"- {config.trained_on}.",
        "- FairFace (Kärkkäinen & Joo, WACV 2021), CC BY 4.0: the subset available to this project, "
        "2,300 images per race, **male faces only**. UTKFace (non-commercial) is not used for training.",
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
        "- Trained and measured on male FairFace faces only; accuracy on women is measured only through UTKFace.",
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
