"""Named label schemes and the explicit tables that map a finer scheme onto a coarser one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facerace.errors import InvalidParameterError, check_choice


@dataclass(frozen=True)
class Scheme:
    """A named, ordered set of race categories."""

    name: str
    classes: tuple[str, ...]
    description: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "fairface7",
            ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"),
            "FairFace's seven categories",
        ),
        Scheme(
            "race6",
            ("White", "Black", "Latino_Hispanic", "Asian", "Indian", "Middle Eastern"),
            "FairFace with East and Southeast Asian merged into Asian (the classic tutorial's 6 classes)",
        ),
        Scheme("race4", ("White", "Black", "Asian", "Indian"), "four broad categories"),
        Scheme("utk5", ("White", "Black", "Asian", "Indian", "Others"), "UTKFace's five categories"),
    )
}

_ASIAN = {"East Asian": "Asian", "Southeast Asian": "Asian"}

#: MAPPINGS[(finer, coarser)][finer_class] -> coarser class, or None where the coarser
#: scheme has no counterpart (that probability mass is dropped and the rest renormalised).
MAPPINGS: dict[tuple[str, str], dict[str, str | None]] = {
    ("fairface7", "race6"): {c: _ASIAN.get(c, c) for c in SCHEMES["fairface7"].classes},
    ("fairface7", "utk5"): {
        "White": "White",
        "Black": "Black",
        "Latino_Hispanic": "Others",
        "East Asian": "Asian",
        "Southeast Asian": "Asian",
        "Indian": "Indian",
        "Middle Eastern": "Others",
    },
    ("fairface7", "race4"): {
        "White": "White",
        "Black": "Black",
        "Latino_Hispanic": None,
        "East Asian": "Asian",
        "Southeast Asian": "Asian",
        "Indian": "Indian",
        "Middle Eastern": None,
    },
    ("race6", "utk5"): {
        "White": "White",
        "Black": "Black",
        "Latino_Hispanic": "Others",
        "Asian": "Asian",
        "Indian": "Indian",
        "Middle Eastern": "Others",
    },
    ("race6", "race4"): {
        "White": "White",
        "Black": "Black",
        "Latino_Hispanic": None,
        "Asian": "Asian",
        "Indian": "Indian",
        "Middle Eastern": None,
    },
    ("utk5", "race4"): {"White": "White", "Black": "Black", "Asian": "Asian", "Indian": "Indian", "Others": None},
}


def get_scheme(name: str) -> Scheme:
    """Return the scheme called `name` (fairface7, race6, race4, utk5)."""
    return SCHEMES[check_choice("scheme", name, tuple(SCHEMES))]


def reachable(source: str) -> tuple[str, ...]:
    """`source` and every coarser scheme its probabilities map onto."""
    return (source, *(t for s, t in MAPPINGS if s == source))


def mapping(source: str, target: str) -> dict[str, str | None]:
    """Return the class table from scheme `source` to scheme `target` (identity if equal)."""
    get_scheme(source), get_scheme(target)
    if source == target:
        return {c: c for c in SCHEMES[source].classes}
    if (source, target) not in MAPPINGS:
        coarser = sorted(t for s, t in MAPPINGS if s == source)
        raise InvalidParameterError(
            f"scheme {source!r} cannot be mapped to {target!r}; from {source!r} the "
            f"coarser schemes are: {', '.join(coarser) or 'none'}"
        )
    return MAPPINGS[(source, target)]


def mapping_matrix(source: str, target: str) -> np.ndarray:
    """Return M (n_source x n_target) with M[i, j] = 1 where source class i maps to target j."""
    table = mapping(source, target)
    src, dst = SCHEMES[source].classes, SCHEMES[target].classes
    m = np.zeros((len(src), len(dst)), dtype=np.float64)
    for i, c in enumerate(src):
        if table[c] is not None:
            m[i, dst.index(table[c])] = 1.0
    return m


def convert_probabilities(probs: np.ndarray, source: str, target: str) -> np.ndarray:
    """Map probability rows from `source` classes to `target` classes by summing (then renormalising)."""
    out = np.asarray(probs, dtype=np.float64) @ mapping_matrix(source, target)
    total = out.sum(axis=-1, keepdims=True)
    return out / np.where(total > 0, total, 1.0)


def convert_label(label: str, source: str, target: str) -> str | None:
    """Map one class name from `source` to `target`; None where it has no counterpart."""
    return mapping(source, target)[label]
