"""Quantification: the share of each class among many faces, from their calibrated probabilities.

Counting predicted labels estimates a collection's composition badly: a classifier that
confuses groups in systematic ways shifts the counts toward the groups it over-predicts,
and by how much depends on the true mix. The methods here (shares always sum to 1):

- `count`: the share of faces whose most probable class is each class (the naive count).
- `probability`: the mean of the faces' probability vectors.
- `pacc`: probabilistic adjusted counting (Bella et al., ICDM 2010). With q the mean
  probability vector of the collection and M the model's soft confusion matrix on held-out
  data (column i: the mean probability vector of held-out faces whose true class is i),
  q = M pi for the true shares pi; pi is solved by least squares on the simplex.
- `em`: prior re-estimation by expectation-maximisation (Saerens, Latinne & Decaestecker,
  Neural Computation 2002): each face's probabilities are rescaled by pi / pi_train and pi is
  re-estimated as their mean, until it stops moving; pi_train is the held-out class mix.
- `adjusted`: the recommended adjusted method, `ADJUSTED` (the one measured best and most
  stable in docs/BENCHMARKS.md).

Intervals (`bootstrap`) are percentile intervals over replicates that resample the faces
and, for the adjusted methods, the held-out faces within each true class (the way the
held-out split was drawn), so they include the uncertainty of M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facerace.errors import InvalidParameterError, check_choice

#: The adjusted method `adjusted` stands for (see docs/BENCHMARKS.md, "Auditing a collection").
ADJUSTED = "pacc"
METHODS = ("adjusted", "pacc", "em", "count", "probability")
#: Methods that need the model's held-out statistics.
NEEDS_HELDOUT = ("adjusted", "pacc", "em")
#: Upper bound on the floats one bootstrap chunk holds (faces x replicates x classes).
_CHUNK_FLOATS = 4_000_000


@dataclass(frozen=True)
class HeldOut:
    """A model's calibrated probabilities (m, K) on its held-out faces and their true classes (m,)."""

    probabilities: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        p, y = np.asarray(self.probabilities), np.asarray(self.labels)
        if p.ndim != 2 or y.shape != (len(p),):
            raise InvalidParameterError(f"held-out probabilities {p.shape} and labels {y.shape} do not match")

    @property
    def prior(self) -> np.ndarray:
        """The class mix of the held-out faces (K,)."""
        return np.bincount(self.labels, minlength=self.probabilities.shape[1]) / len(self.labels)

    def confusion(self) -> np.ndarray:
        """Soft confusion matrix M (K, K): M[j, i] = mean probability of class j over faces of true class i."""
        k = self.probabilities.shape[1]
        return np.stack([self.probabilities[self.labels == i].mean(0) for i in range(k)], axis=1)


@dataclass(frozen=True)
class Shares:
    """Class shares among faces: the naive share of predicted labels, an estimate and its interval, each (K,)."""

    count: np.ndarray
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray


def shares(probs: np.ndarray, method: str = "adjusted", heldout: HeldOut | None = None, *,
           merge: np.ndarray | None = None, replicates: int = 1000, level: float = 0.95,
           random_state: int | np.random.Generator | None = 0) -> Shares:
    """Estimate the class shares among faces with probabilities `probs` (n, K), with a bootstrap interval.

    `merge` (K, K') maps the classes onto coarser ones (rows summed, see `labels.mapping_matrix`;
    a class mapped nowhere is dropped and the rest renormalised). The adjusted methods estimate
    in the K classes the held-out statistics have and merge the result; `count` and
    `probability` merge each face's probabilities first, so `count` is the share of the labels
    the faces get in the coarser classes.
    """
    merge = np.eye(np.shape(probs)[1]) if merge is None else merge
    probs = np.asarray(probs, np.float64)
    coarse = _merged(probs, merge)
    if check_choice("quantification method", method, METHODS) in NEEDS_HELDOUT:
        point = _merged(estimate(probs, method, heldout)[None], merge)[0]
        boot = _merged(bootstrap(probs, method, heldout, replicates=replicates, random_state=random_state), merge)
    else:
        point = estimate(coarse, method)
        boot = bootstrap(coarse, method, replicates=replicates, random_state=random_state)
    low, high = interval(boot, level)
    return Shares(estimate(coarse, "count"), point, low, high)


def _merged(x: np.ndarray, merge: np.ndarray) -> np.ndarray:
    out = x @ merge
    total = out.sum(1, keepdims=True)
    return out / np.where(total > 0, total, 1.0)


def estimate(probs: np.ndarray, method: str = "adjusted", heldout: HeldOut | None = None) -> np.ndarray:
    """The estimated share of each class (K,) among faces with probabilities `probs` (n, K)."""
    probs, method = _check(probs, method, heldout)
    confusion = heldout.confusion()[None] if heldout is not None else None
    prior = heldout.prior if heldout is not None else None
    return _shares(method, probs, np.ones((1, len(probs))), confusion, prior)[0]


def bootstrap(probs: np.ndarray, method: str = "adjusted", heldout: HeldOut | None = None, *,
              replicates: int = 1000, random_state: int | np.random.Generator | None = 0) -> np.ndarray:
    """Shares (replicates, K) re-estimated on resampled faces (and held-out faces, per true class)."""
    probs, method = _check(probs, method, heldout)
    rng = np.random.default_rng(random_state)
    n, k = probs.shape
    chunk = max(1, _CHUNK_FLOATS // (n * (k if method == "em" else 1)))
    out = []
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        weights = rng.multinomial(n, np.full(n, 1 / n), size=b).astype(np.float64)
        confusion = _resampled_confusion(heldout, b, rng) if heldout is not None else None
        out.append(_shares(method, probs, weights, confusion, heldout.prior if heldout is not None else None))
    return np.concatenate(out)


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (low, high), each (K,), of bootstrap replicates (B, K)."""
    tail = (1 - level) / 2 * 100
    return np.percentile(replicates, tail, axis=0), np.percentile(replicates, 100 - tail, axis=0)


def _check(probs: np.ndarray, method: str, heldout: HeldOut | None) -> tuple[np.ndarray, str]:
    method = check_choice("quantification method", method, METHODS)
    method = ADJUSTED if method == "adjusted" else method
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or not len(probs):
        raise InvalidParameterError(f"need probabilities of at least one face, shape (n, K); got {probs.shape}")
    if method in NEEDS_HELDOUT:
        if heldout is None:
            raise InvalidParameterError(f"method {method!r} needs the model's held-out statistics; "
                                        "use method 'count' or 'probability', or a model trained by `facerace train`")
        if heldout.probabilities.shape[1] != probs.shape[1]:
            raise InvalidParameterError(f"the held-out data has {heldout.probabilities.shape[1]} classes, "
                                        f"the faces {probs.shape[1]}")
        missing = sorted(set(range(probs.shape[1])) - set(heldout.labels.tolist()))
        if missing:
            raise InvalidParameterError(f"the model's held-out data has no face of class(es) {missing}, which "
                                        f"method {method!r} needs; use --method count or --method probability")
    return probs, method


def _resampled_confusion(heldout: HeldOut, b: int, rng: np.random.Generator) -> np.ndarray:
    """Soft confusion matrices (b, K, K) of held-out faces resampled with replacement within each class."""
    k = heldout.probabilities.shape[1]
    out = np.empty((b, k, k))
    for i in range(k):
        rows = heldout.probabilities[heldout.labels == i]
        counts = rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)), size=b)
        out[:, :, i] = counts @ rows / len(rows)
    return out


def _shares(method: str, probs: np.ndarray, weights: np.ndarray, confusion: np.ndarray | None,
            prior: np.ndarray | None) -> np.ndarray:
    """Shares (B, K) for B weightings (B, n) of the faces."""
    w = weights / weights.sum(1, keepdims=True)
    if method == "count":
        return w @ np.eye(probs.shape[1])[probs.argmax(1)]
    if method == "em":
        assert prior is not None
        return em_priors(probs, w, prior)
    q = w @ probs
    if method == "probability":
        return q
    assert confusion is not None
    return simplex_least_squares(np.broadcast_to(confusion, (len(q), *confusion.shape[1:])), q)


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of `v` (B, K) onto the probability simplex (Duchi et al. 2008)."""
    k = v.shape[1]
    u = -np.sort(-v, axis=1)
    excess = np.cumsum(u, axis=1) - 1
    positive = u - excess / np.arange(1, k + 1) > 0
    last = k - 1 - np.argmax(positive[:, ::-1], axis=1)
    theta = excess[np.arange(len(v)), last] / (last + 1)
    return np.maximum(v - theta[:, None], 0)


def simplex_least_squares(a: np.ndarray, b: np.ndarray, *, tol: float = 1e-10, max_iter: int = 10_000
                          ) -> np.ndarray:
    """argmin ||a x - b|| over the simplex for each of B problems (a: (B, K, K), b: (B, K)).

    Accelerated projected gradient (FISTA, restarted per problem when momentum points uphill,
    O'Donoghue & Candes 2015); the problem is convex, so this is its minimiser up to `tol`.
    """
    ata = np.einsum("bji,bjk->bik", a, a)
    atb = np.einsum("bji,bj->bi", a, b)
    step = 1 / np.linalg.eigvalsh(ata)[:, -1:]
    x = np.full(b.shape, 1 / b.shape[1])
    y, t = x.copy(), np.ones((len(b), 1))
    for _ in range(max_iter):
        new = project_simplex(y - step * (np.einsum("bik,bk->bi", ata, y) - atb))
        moved = np.abs(new - x).max()
        uphill = (((y - new) * (new - x)).sum(1, keepdims=True) > 0)
        t = np.where(uphill, 1.0, t)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = new + (t - 1) / t_next * (new - x)
        x, t = new, t_next
        if moved < tol:
            break
    return x


def em_priors(probs: np.ndarray, weights: np.ndarray, prior: np.ndarray, *, tol: float = 1e-6,
              max_iter: int = 1000) -> np.ndarray:
    """Saerens-Latinne-Decaestecker EM: class shares (B, K) for B normalised face weightings (B, n).

    `probs` (n, K) are calibrated under the training class mix `prior` (K,).
    """
    shares = weights @ probs
    for _ in range(max_iter):
        post = probs[None] * (shares / prior)[:, None, :]
        post /= post.sum(-1, keepdims=True)
        new = np.einsum("bn,bnk->bk", weights, post)
        done = np.abs(new - shares).max() < tol
        shares = new
        if done:
            break
    return shares
