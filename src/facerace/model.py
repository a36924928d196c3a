"""Model directories: a safetensors head, a JSON config with its SHA-256, and a model card.

A model is a folder holding `config.json`, the weights file it names, the model's
probabilities on its held-out training faces (`heldout.safetensors`, for `facerace audit`)
and, for shipped models, `MODEL_CARD.md`. Shipped models live in the package under `weights/<name>/`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from facerace.backbones import BACKBONES, FUSE, InputSpec, chip_spec, split_backbones
from facerace.detect import DETECTORS
from facerace.errors import ModelIntegrityError, ModelNotFoundError
from facerace.faces import MAX_FACES, MIN_FACE, FacePipeline
from facerace.files import sha256_file
from facerace.head import RaceHead
from facerace.labels import SCHEMES
from facerace.textout import json_text

if TYPE_CHECKING:
    from facerace.quantify import HeldOut

SHIPPED = ("default", "fast")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "head.safetensors"
TUNED_FILE = "backbone.safetensors"
DIGESTS_FILE = "training_files.npy"
HELDOUT_FILE = "heldout.safetensors"
#: Bounds on a config.json: its size, its classes, and the length of a problem (or class name) quoted in an error.
MAX_CONFIG_BYTES = 1 << 20
MAX_CLASSES = 1000
MAX_QUOTE = 200
#: The config keys that name a file of the model folder (confined to it), and the key of each one's SHA-256.
FILE_KEYS = {"weights": "sha256", "tuned": "tuned_sha256", "heldout": "heldout_sha256",
             "training_files": "training_files_sha256"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's pipeline and read its weights.

    A model on fused networks (`backbone` "a+b") holds a list of chip sizes, paddings and flip settings, one per network.
    """

    name: str
    version: str
    scheme: str
    classes: tuple[str, ...]
    backbone: str
    backbone_version: str
    detector: str
    chip_size: int | list[int]
    chip_padding: float | list[float]
    threshold: float
    threshold_rule: str
    flip_average: bool | list[bool] = False
    weights: str = WEIGHTS_FILE
    sha256: str = ""
    backbone_weights: str = ""
    tuned: str = ""
    tuned_sha256: str = ""
    heldout: str = ""
    heldout_sha256: str = ""
    trained_on: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    training_files: str = ""
    training_files_sha256: str = ""
    caveat: str = ""
    #: what the model was trained on, per gender and per class x gender (written by `facerace train`; None for
    #: models saved before it was kept): {"data": ["FairFace train"], "images": N, "per_gender": {gender: n},
    #: "per_race_gender": {class: {gender: n}}}, counting every image used (fitted or held out)
    training_mix: dict[str, Any] | None = None

    def mix_summary(self) -> str | None:
        """The training mix in words, e.g. "FairFace train: 30,100 faces, 12,011 women and 18,089 men"; None
        when the config does not record it."""
        mix = self.training_mix
        if mix is None:
            return None
        genders = [f"{n:,} {gender_words(g)}" for g, n in sorted(mix["per_gender"].items(), key=_unknown_last)]
        return (f"{' + '.join(mix['data'])}: {mix['images']:,} faces" + (", " if genders else "")
                + " and ".join([", ".join(genders[:-1]), genders[-1]] if len(genders) > 1 else genders))

    def threshold_for(self, scheme: str) -> float:
        """The uncertainty threshold of `scheme`: its own when stored (coarser schemes have higher
        probabilities), else the model's (`threshold`, for configs written before per-scheme ones)."""
        return self.thresholds.get(scheme, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = CONFIG_FILE) -> ModelConfig:
        """The config in JSON data `d`; ModelIntegrityError naming `source` for a missing or unknown key,
        a value of the wrong type, or a weights file name that is not a plain file name."""
        problems = _config_problems(d)
        if problems:
            listed = "; ".join(_short(p) for p in problems[:5]) + (f"; and {len(problems) - 5} more"
                                                                   if len(problems) > 5 else "")
            raise ModelIntegrityError(f"{source}: {listed}. The model folder is damaged: "
                                      "retrain the model (`facerace train`) or reinstall facerace")
        return cls(**{**d, "classes": tuple(d["classes"])})


def gender_words(gender: str) -> str:
    """How a count of faces of `gender` reads: "women", "men", "of unknown gender", or the label itself."""
    return {"female": "women", "male": "men", "unknown": "of unknown gender"}.get(gender.lower(), gender)


def _unknown_last(item: tuple[str, Any]) -> tuple[bool, str]:
    return item[0] == "unknown", item[0]


def _json_types(annotation: str) -> tuple[type, ...] | None:
    """The JSON value types a ModelConfig field annotation allows (None: not checked)."""
    plain = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
    if " | " in annotation:  # a fused model's per-network lists: "int | list[int]"
        parts = [_json_types(a) for a in annotation.split(" | ")]
        return None if None in parts else tuple(t for p in parts for t in p)
    if annotation in plain:
        return plain[annotation]
    if annotation == "None":
        return (type(None),)
    return (list,) if annotation.startswith(("tuple", "list")) else (dict,) if annotation.startswith("dict") else None


def _config_problems(d: Any) -> list[str]:
    """What is wrong with config data `d` (empty if nothing)."""
    if not isinstance(d, dict):
        return [f"holds a JSON {type(d).__name__}, not an object"]
    known = {f.name: f for f in fields(ModelConfig)}
    missing = [n for n, f in known.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
    problems = [f"missing key(s) {', '.join(missing)}"] if missing else []
    if set(d) - set(known):
        problems.append(f"unknown key(s) {', '.join(sorted(set(d) - set(known)))}")
    for name, value in d.items():
        types = _json_types(str(known[name].type)) if name in known else None
        if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            problems.append(f"{name!r} is {type(value).__name__} {repr(value)[:40]}, not {known[name].type}")
    if isinstance(d.get("classes"), list) and (not d["classes"] or not all(isinstance(c, str) for c in d["classes"])):
        problems.append("'classes' must be a non-empty list of class names")
    elif isinstance(d.get("classes"), list) and len(d["classes"]) > MAX_CLASSES:
        problems.append(f"'classes' lists {len(d['classes']):,} classes (at most {MAX_CLASSES:,})")
    elif isinstance(d.get("classes"), list) and max(map(len, d["classes"])) > MAX_QUOTE:
        problems.append(f"'classes' has a name of {max(map(len, d['classes'])):,} characters (at most {MAX_QUOTE})")
    bounds = {"threshold": (0.0, 1.0), "chip_size": (16, 1024), "chip_padding": (0.0, 2.0)}
    numbers = [(name, d.get(name), limits) for name, limits in bounds.items() if not isinstance(d.get(name), list)]
    numbers += [(f"{name}[{i}]", v, limits) for name, limits in bounds.items() if isinstance(d.get(name), list)
                for i, v in enumerate(d[name])]
    if isinstance(d.get("thresholds"), dict):
        numbers += [(f"thresholds[{k!r}]", v, (0.0, 1.0)) for k, v in d["thresholds"].items()]
    for name, value, (low, high) in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if "[" in name:  # the fields' own types are checked above
                problems.append(f"{name} is not a number")
        elif not low <= value <= high:  # NaN too
            problems.append(f"{name} {value!r} is outside [{low}, {high}]")
    for name, known_names in (("scheme", SCHEMES), ("backbone", BACKBONES), ("detector", DETECTORS)):
        values = d[name].split(FUSE) if name == "backbone" and isinstance(d.get(name), str) else [d.get(name)]
        for value in values:
            if isinstance(value, str) and value not in known_names:
                problems.append(f"unknown {name} {value!r} (this facerace knows {', '.join(known_names)})")
    parts = len(d["backbone"].split(FUSE)) if isinstance(d.get("backbone"), str) else 1
    for name in ("chip_size", "chip_padding", "flip_average"):
        value = d.get(name)
        if (parts > 1) != isinstance(value, list) or (isinstance(value, list) and len(value) != parts):
            if name in d:
                problems.append(f"{name!r} must be one value per network of backbone {d['backbone']!r} ({parts})"
                                if parts > 1 else f"{name!r} must be a single value")
    if isinstance(d.get("training_mix"), dict):
        problems += _mix_problems(d["training_mix"])
    for name in FILE_KEYS:
        value = d.get(name)
        if isinstance(value, str) and value and (Path(value).name != value or value in (".", "..")):
            problems.append(f"{name!r} must name a file in the model folder, not {value!r}")
    return problems


def _mix_problems(mix: dict[str, Any]) -> list[str]:
    """What is wrong with a config's `training_mix` (empty if nothing)."""
    def counts(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items())

    ok = (set(mix) == {"data", "images", "per_gender", "per_race_gender"} and isinstance(mix["data"], list)
          and all(isinstance(v, str) for v in mix["data"]) and type(mix["images"]) is int and mix["images"] >= 0
          and counts(mix["per_gender"]) and isinstance(mix["per_race_gender"], dict)
          and all(isinstance(k, str) and counts(v) for k, v in mix["per_race_gender"].items()))
    return [] if ok else ["'training_mix' must hold data (names), images (a count), per_gender ({gender: count}) "
                          "and per_race_gender ({class: {gender: count}})"]


def _short(text: str) -> str:
    """`text` cut to MAX_QUOTE characters (a hostile config must not make a megabyte error message)."""
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE] + f"... ({len(text):,} characters)"


def shipped_dir(name: str) -> Path:
    """The package folder of the shipped model `name`."""
    return Path(str(resources.files("facerace") / "weights" / name))


def resolve(model: str | Path) -> Path:
    """Turn a shipped model name or a model/run folder into the folder holding config.json."""
    if str(model) in SHIPPED:
        path = shipped_dir(str(model))
    else:
        path = Path(model)
        if (path / "model" / CONFIG_FILE).is_file():  # a training run folder
            path = path / "model"
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"no facerace model at {str(model)!r}: expected a shipped name ({', '.join(SHIPPED)}) "
            f"or a folder with {CONFIG_FILE} (for example runs/train/NAME made by `facerace train`)"
        )
    return path


def load_config(model: str | Path) -> ModelConfig:
    """Read a model's config.json (ModelIntegrityError naming it if it is not a valid model config)."""
    file = resolve(model) / CONFIG_FILE
    damaged = "the model folder is damaged: retrain the model (`facerace train`) or reinstall facerace"
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ModelIntegrityError(f"{file}: larger than {MAX_CONFIG_BYTES:,} bytes (a model config is a few "
                                      f"kB); {damaged}")
        data = json.loads(raw.decode("utf-8-sig"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ModelIntegrityError(f"{file}: not valid JSON ({_short(str(exc))}); {damaged}") from None
    except RecursionError:
        raise ModelIntegrityError(f"{file}: JSON nested too deeply to be a model config; {damaged}") from None
    except OSError as exc:
        raise ModelNotFoundError(f"{file}: cannot be read ({exc.strerror})") from None
    if isinstance(data, dict) and "data" in data and "classes" not in data:
        raise ModelNotFoundError(f"{file.parent} is a training run whose model is not finished ({file.parent / 'model'}"
                                 f" is missing): continue it with `facerace train --resume {file.parent}`")
    return ModelConfig.from_dict(data, str(file))


def model_file(folder: Path, config: ModelConfig, key: str) -> Path:
    """The file config.json names under `key` (a FILE_KEYS key), refused (ModelIntegrityError) unless it lies
    inside the model folder (no `..`, no absolute path, no link to outside), exists, and has the SHA-256 the
    config records for it."""
    name = getattr(config, key)
    source = folder / CONFIG_FILE
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or not path.resolve().is_relative_to(folder.resolve()):
        raise ModelIntegrityError(f"{source}: {key!r} names {_short(repr(name))}, which is not a file inside the "
                                  "model folder (a link out of it counts); the model folder is damaged or hostile")
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing (named by {source}); retrain the model (`facerace train`) "
                                 "or reinstall facerace")
    expected = getattr(config, FILE_KEYS[key])
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelNotFoundError(f"{path}: cannot be read ({exc.strerror})") from None
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} has SHA-256 {actual}, but {source} expects {_short(expected) or '(none recorded)'}; "
            "the file is damaged or was replaced: reinstall facerace or retrain the model"
        )
    return path


def load_model(model: str | Path) -> tuple[ModelConfig, RaceHead]:
    """Read config and head, refusing weights whose SHA-256 differs from the config's."""
    from safetensors import SafetensorError

    path = resolve(model)
    config = load_config(path)
    weights = model_file(path, config, "weights")
    try:
        return config, RaceHead.load(weights, config.classes)
    except (SafetensorError, KeyError, IndexError, ValueError) as exc:
        raise ModelIntegrityError(f"{weights}: not a head for the {len(config.classes)} classes of "
                                  f"{path / CONFIG_FILE} ({_short(str(exc))}); retrain the model (`facerace train`) "
                                  "or reinstall facerace") from None


def tuned_file(model: str | Path, config: ModelConfig) -> Path | None:
    """The model's fine-tuned backbone layers file (SHA-256 checked), or None for a frozen backbone."""
    return model_file(resolve(model), config, "tuned") if config.tuned else None


def training_digests(model: str | Path, config: ModelConfig) -> np.ndarray | None:
    """The sorted 8-byte SHA-256 prefixes (uint64) of the images `model` was trained on (SHA-256 checked),
    or None for a model saved without them."""
    if not config.training_files:
        return None
    path = model_file(resolve(model), config, "training_files")
    try:
        digests = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ModelIntegrityError(f"{path}: not a NumPy array file ({_short(str(exc))}); retrain the model") from None
    if not isinstance(digests, np.ndarray) or digests.dtype != np.uint64 or digests.ndim != 1:
        kind = f"{digests.dtype} array of shape {digests.shape}" if isinstance(digests, np.ndarray) else "an archive"
        raise ModelIntegrityError(f"{path}: holds {kind}, not the 1-D uint64 digest prefixes a model stores; "
                                  "retrain the model")
    return digests


def digest_prefixes(digests: Sequence[str]) -> np.ndarray:
    """The uint64 prefixes (first 8 bytes) of hex SHA-256 digests, in order: how model folders store files."""
    return np.array([int(d[:16], 16) for d in digests], dtype=np.uint64).reshape(-1)


def load_heldout(model: str | Path, config: ModelConfig) -> HeldOut:
    """The model's calibrated probabilities on its held-out training faces and their true classes."""
    from safetensors.numpy import load_file

    from facerace.quantify import HeldOut

    if not config.heldout:
        raise ModelNotFoundError(
            f"model {str(model)!r} has no held-out statistics (its folder predates them): the adjusted methods "
            "need them; retrain it with `facerace train`, or use --method count or --method probability")
    path = model_file(resolve(model), config, "heldout")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError, ... for a damaged file
        raise ModelIntegrityError(f"{path}: not a safetensors file ({_short(str(exc))}); retrain the model") from None
    problem = _heldout_problem(tensors, len(config.classes))
    if problem:
        raise ModelIntegrityError(f"{path}: {problem}; retrain the model (`facerace train`)")
    return HeldOut(tensors["probabilities"].astype(np.float64), tensors["labels"].astype(np.int64))


def _heldout_problem(tensors: dict[str, np.ndarray], classes: int) -> str:
    """What makes held-out tensors unusable for `classes` classes ("" if nothing)."""
    missing = [k for k in ("probabilities", "labels") if k not in tensors]
    if missing:
        return f"missing {' and '.join(repr(k) for k in missing)}"
    p, y = tensors["probabilities"], tensors["labels"]
    if p.ndim != 2 or p.shape[1] != classes or len(p) == 0 or y.shape != (len(p),):
        return f"probabilities {p.shape} and labels {y.shape} do not fit {classes} classes"
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
        return f"labels must be class indices 0..{classes - 1}"
    p = p.astype(np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        return "probabilities must be finite, non-negative and sum to 1 for every face"
    return ""


def model_pipeline(model: str | Path, config: ModelConfig, *, detector: str | None = None, min_face: int = MIN_FACE,
                   upsample: int = 1, backbone: str | None = None, backbone_weights: str | Path | None = None,
                   max_faces: int = MAX_FACES) -> FacePipeline:
    """The face pipeline of `model` (its detector, chips, network with fine-tuned layers, flip averaging), with
    another `detector`, or another `backbone` (weights file `backbone_weights`, its own chips) instead."""
    if backbone is not None:
        flips = config.flip_average  # kept per network when the other backbone has as many; else any
        flip = flips if isinstance(flips, bool) else tuple(flips) if len(split_backbones(backbone)) == len(flips) \
            else any(flips)
        return FacePipeline(detector or config.detector, backbone, str(backbone_weights) if backbone_weights else None,
                            flip_average=flip, min_face=min_face, upsample=upsample, max_faces=max_faces)
    tuned = tuned_file(model, config)
    names = split_backbones(config.backbone)
    if len(names) == 1:
        flip: bool | tuple[bool, ...] = bool(config.flip_average)
        chips: InputSpec | tuple[InputSpec, ...] = InputSpec(config.chip_size, config.chip_padding,
                                                             chip_spec(config.backbone).alignment)
    else:
        flip = tuple(config.flip_average) if isinstance(config.flip_average, list) else config.flip_average
        chips = tuple(InputSpec(size, padding, chip_spec(name).alignment)
                      for name, size, padding in zip(names, config.chip_size, config.chip_padding))
    return FacePipeline(detector or config.detector, config.backbone, config.backbone_weights or None,
                        str(tuned) if tuned else None, flip, min_face, upsample, chips, max_faces)


def save_model(path: Path, config: ModelConfig, head: RaceHead, tuned: dict[str, np.ndarray] | None = None,
               training_files: Sequence[str] = (), heldout: HeldOut | None = None) -> ModelConfig:
    """Write head weights, fine-tuned backbone layers (if any, as float16), the digests of the training
    images (`training_files`: hex SHA-256s, stored as 8-byte prefixes), the held-out probabilities and true
    classes (`heldout`, if given) and config (with SHA-256s) into `path`."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    head.save(path / config.weights)
    extra = {}
    if tuned:
        # float16 halves the file (the package ships one); layers are computed in float32 after loading
        save_file({k: np.ascontiguousarray(v, np.float16) for k, v in tuned.items()}, str(path / TUNED_FILE))
        extra = {"tuned": TUNED_FILE, "tuned_sha256": sha256_file(path / TUNED_FILE)}
    if training_files:
        extra.update(write_training_digests(path, training_files))
    if heldout is not None:
        extra.update(heldout=HELDOUT_FILE, heldout_sha256=save_heldout(path / HELDOUT_FILE, heldout))
    final = ModelConfig.from_dict({**config.to_dict(), "sha256": sha256_file(path / config.weights), **extra})
    (path / CONFIG_FILE).write_text(json_text(final.to_dict(), indent=2) + "\n")
    return final


def write_training_digests(path: Path, digests: Sequence[str]) -> dict[str, str]:
    """Write the training images' digest prefixes into model folder `path`; the config entries naming the file."""
    np.save(path / DIGESTS_FILE, np.unique(digest_prefixes(digests)), allow_pickle=False)
    return {"training_files": DIGESTS_FILE, "training_files_sha256": sha256_file(path / DIGESTS_FILE)}


def save_heldout(path: Path, heldout: HeldOut) -> str:
    """Write held-out probabilities (float32) and true classes (int32) to `path`; return its SHA-256."""
    from safetensors.numpy import save_file

    save_file({"probabilities": np.ascontiguousarray(heldout.probabilities, np.float32),
               "labels": np.ascontiguousarray(heldout.labels, np.int32)}, str(path))
    return sha256_file(path)


def list_models() -> list[dict[str, Any]]:
    """The shipped models: name, version, classes, backbone, thresholds per scheme, measured accuracy, the
    caveat of its model card and its training mix (counts per gender and class x gender, and in words)."""
    out = []
    for name in SHIPPED:
        try:
            c = load_config(name)
        except ModelNotFoundError:
            continue
        out.append({"name": name, "version": c.version, "scheme": c.scheme, "classes": list(c.classes),
                    "backbone": c.backbone, "detector": c.detector, "threshold": c.threshold,
                    "thresholds": {c.scheme: c.threshold, **c.thresholds}, "trained_on": c.trained_on,
                    "caveat": c.caveat, "training_mix": c.training_mix, "training_mix_summary": c.mix_summary(),
                    "metrics": c.metrics, "path": str(shipped_dir(name))})
    return out
