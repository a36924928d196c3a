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
- `adjusted`: the recommended adjusted method, `ADJUSTED` (`pacc`: its error is as low as
  `em`'s and only its intervals include the uncertainty of the held-out statistics).

- `validated`: prediction-powered inference (Angelopoulos, Bates, Fannjiang, Jordan & Zrnic,
  Science 2023) from a uniform random sample of the faces whose true class a person labelled:
  the mean probability vector of all the faces, corrected by the mean of (one-hot true class -
  probability vector) over the labelled ones. Unbiased whatever the shift between the training
  photos and these; see `validated`.

Intervals (`bootstrap`) are percentile intervals over replicates that resample the faces
and, for `pacc`, the held-out faces within each true class (the way the held-out split was
drawn), so they include the uncertainty of M. `em` uses the held-out faces only through
their class mix, which that resampling keeps fixed: its intervals resample the faces.

Many faces (`GroupStats`, `shares_of`): a group is kept as sufficient statistics, fed batch by
batch (face count, probability sums and sums of squares, predicted-label counts), plus its
rows while it has at most `EXACT_FACES` faces. Resampling the faces then draws, per
replicate: the label counts from the multinomial of the observed label shares (`count`; the
same distribution as resampling faces), and the mean probability vector by resampling the kept
rows, or, for larger groups, from the normal distribution of the mean (mean, covariance / n:
the bootstrap distribution of a mean of thousands of bounded vectors; `probability`, `pacc`).
`em` needs rows: it keeps a uniform sample of at most `em_sample(replicates)` faces per group
(all of them in smaller groups) and estimates from it; its interval, that of the sample, is
then wider than the whole group's would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

from facerace.errors import InvalidParameterError, check_choice

#: The adjusted method `adjusted` stands for: the one whose intervals resample both the faces and the
#: held-out set (see docs/BENCHMARKS.md, "Auditing a collection").
ADJUSTED = "pacc"
METHODS = ("adjusted", "pacc", "em", "count", "probability")
#: Methods that need the model's held-out statistics.
NEEDS_HELDOUT = ("adjusted", "pacc", "em")
#: Upper bound on the floats one bootstrap chunk holds (faces x replicates x classes).
_CHUNK_FLOATS = 4_000_000
#: Groups of at most this many faces keep their rows: their intervals resample the faces themselves.
EXACT_FACES = 2_000
#: The most bootstrap replicates an interval may take.
MAX_REPLICATES = 10_000
#: Bound on em's interval work per group (sampled faces x replicates): see `em_sample`.
EM_WORK = 10_000_000
#: Probabilities of a usable face sum to 1 within this (rows are written rounded to 4 decimals).
SUM_TOLERANCE = 0.01


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


def check_replicates(replicates: int) -> int:
    """`replicates` if it is a whole number from 1 to MAX_REPLICATES, else InvalidParameterError."""
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) \
            or not 1 <= replicates <= MAX_REPLICATES:
        raise InvalidParameterError(f"replicates must be a whole number from 1 to {MAX_REPLICATES:,}, got "
                                    f"{replicates!r} (1,000 give intervals stable to about half a point)")
    return int(replicates)


def em_sample(replicates: int) -> int:
    """The most faces per group `em` keeps (a uniform sample of larger groups): EM_WORK / replicates, at least
    EXACT_FACES, so that one group's interval work is bounded."""
    return max(EXACT_FACES, EM_WORK // max(1, replicates))


class GroupStats:
    """Sufficient statistics of one group's faces, fed batch by batch with `add`.

    `n` faces; `total` (K,) and `squares` (K, K) the sums of their probability vectors and of
    their outer products (mean and covariance); `counts` (L,) how many faces got each predicted
    label; `rows` the faces' probability vectors (float32) while the group has at most `keep`
    faces (None after), or with `sample` a uniform sample of `keep` of them (reservoir sampling,
    seeded by `seed`).
    """

    def __init__(self, classes: int, labels: int | None = None, *, keep: int = EXACT_FACES, sample: bool = False,
                 seed: int = 0) -> None:
        self.n = 0
        self.total = np.zeros(classes)
        self.squares = np.zeros((classes, classes))
        self.counts = np.zeros(labels or classes, np.int64)
        self.keep, self.sample = keep, sample
        self._rows: np.ndarray | None = np.empty((min(keep, 256), classes), np.float32)
        self._rng = np.random.default_rng(seed) if sample else None

    @classmethod
    def of(cls, probs: np.ndarray, predicted: np.ndarray | None = None, labels: int | None = None) -> GroupStats:
        """The statistics of `probs` (n, K), every row kept."""
        probs = np.asarray(probs, np.float64)
        stats = cls(probs.shape[1], labels, keep=max(1, len(probs)))
        stats.add(probs, predicted)
        return stats

    def add(self, probs: np.ndarray, predicted: np.ndarray | None = None) -> None:
        """Add faces with probabilities `probs` (m, K) and predicted labels `predicted` (m,; default: argmax)."""
        probs = np.asarray(probs, np.float64)
        if not len(probs):
            return
        self.total += probs.sum(0)
        self.squares += probs.T @ probs
        labels = probs.argmax(1) if predicted is None else predicted
        self.counts += np.bincount(labels, minlength=len(self.counts))[:len(self.counts)]
        if self._rows is not None:
            self._keep_rows(probs)
        self.n += len(probs)

    def _keep_rows(self, probs: np.ndarray) -> None:
        assert self._rows is not None
        held = min(self.n, self.keep)
        fill = min(len(probs), self.keep - held)
        if self.n + len(probs) > self.keep and not self.sample:
            self._rows = None  # too many faces to keep: the statistics stand for them
            return
        if held + fill > len(self._rows):
            grown = np.empty((min(self.keep, max(2 * len(self._rows), held + fill)), self._rows.shape[1]), np.float32)
            grown[:held] = self._rows[:held]
            self._rows = grown
        self._rows[held:held + fill] = probs[:fill]
        if fill < len(probs):  # reservoir sampling (algorithm R): face t replaces a random slot with chance keep/(t+1)
            assert self._rng is not None
            seen = self.n + fill + np.arange(len(probs) - fill)
            slots = self._rng.integers(0, seen + 1)
            chosen = slots < self.keep
            self._rows[slots[chosen]] = probs[fill:][chosen]

    @property
    def rows(self) -> np.ndarray | None:
        """The kept probability vectors (float64), or None if the group outgrew `keep` without `sample`."""
        return None if self._rows is None else self._rows[:min(self.n, self.keep)].astype(np.float64)

    @property
    def sampled(self) -> bool:
        """Whether `rows` is a sample of the faces (the group has more than `keep`)."""
        return self.sample and self.n > self.keep

    @property
    def mean(self) -> np.ndarray:
        """The mean probability vector (K,)."""
        return self.total / max(self.n, 1)

    @property
    def covariance(self) -> np.ndarray:
        """The covariance (K, K) of the probability vectors (over the faces, divided by n)."""
        mean = self.mean
        return self.squares / max(self.n, 1) - np.outer(mean, mean)


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
    coarse = merged(probs, merge)
    fed = probs if check_choice("quantification method", method, METHODS) in NEEDS_HELDOUT else coarse
    return shares_of(GroupStats.of(fed, coarse.argmax(1), merge.shape[1]), method, heldout, merge=merge,
                     replicates=replicates, level=level, random_state=random_state)


def shares_of(stats: GroupStats, method: str = "adjusted", heldout: HeldOut | None = None, *,
              merge: np.ndarray | None = None, replicates: int = 1000, level: float = 0.95,
              random_state: int | np.random.Generator | None = 0, confusions: np.ndarray | None = None) -> Shares:
    """`shares` of a group given by its statistics: `stats` hold the faces' probabilities in the held-out
    statistics' K classes for the adjusted methods, else in the merged classes; its `counts` are of the
    merged labels. `confusions` (B, K, K): `pacc`'s resampled confusion matrices (`resampled_confusion`),
    to share them between groups; default: drawn here."""
    method = check_choice("quantification method", method, METHODS)
    used = ADJUSTED if method == "adjusted" else method
    rng = np.random.default_rng(random_state)
    replicates, n = check_replicates(replicates), stats.n
    if not n:
        raise InvalidParameterError("need probabilities of at least one face")
    count = stats.counts / n
    if used == "count":
        point, boot = count, rng.multinomial(n, count, size=replicates) / n
    elif used == "probability":
        point, boot = stats.mean, resampled_means(stats, replicates, rng)
    elif used == "em":
        rows = stats.rows
        assert rows is not None, "em needs GroupStats(sample=True)"
        point = estimate(rows, used, heldout)
        boot = bootstrap(rows, used, heldout, replicates=replicates, random_state=rng)
    else:
        _check(stats.mean[None], used, heldout)
        assert heldout is not None
        point = simplex_least_squares(heldout.confusion()[None], stats.mean[None])[0]
        if confusions is None:
            confusions = resampled_confusion(heldout, replicates, rng)
        boot = simplex_least_squares(confusions, resampled_means(stats, replicates, rng))
    if used in NEEDS_HELDOUT and merge is not None:
        point, boot = merged(point[None], merge)[0], merged(boot, merge)
    low, high = interval(boot, level)
    return Shares(count, point, low, high)


def resampled_means(stats: GroupStats, b: int, rng: np.random.Generator) -> np.ndarray:
    """Mean probability vectors (b, K) of b resamples of the group's faces: resampled rows while the group keeps
    all of them, else draws from the normal distribution of the mean (clipped into the simplex)."""
    rows = stats.rows
    if rows is not None and not stats.sampled:
        chunk = max(1, _CHUNK_FLOATS // len(rows))
        parts = []
        for first in range(0, b, chunk):
            weights = resample_counts(len(rows), min(chunk, b - first), rng)
            parts.append(weights @ rows / len(rows))
        return np.concatenate(parts)
    values, vectors = np.linalg.eigh(stats.covariance)
    root = vectors * np.sqrt(np.clip(values, 0, None))
    draws = np.clip(stats.mean + rng.standard_normal((b, len(values))) @ root.T / np.sqrt(stats.n), 0, None)
    return draws / np.where(draws.sum(1, keepdims=True) > 0, draws.sum(1, keepdims=True), 1.0)


def merged(x: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """Rows of shares or probabilities (n, K) mapped onto coarser classes by `merge` (K, K') and renormalised."""
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
    """Shares (replicates, K) re-estimated on resampled faces (and, for pacc, held-out faces per true class)."""
    probs, method = _check(probs, method, heldout)
    rng = np.random.default_rng(random_state)
    n, k = probs.shape
    chunk = max(1, _CHUNK_FLOATS // (n * (k if method == "em" else 1)))
    out = []
    for first in range(0, replicates, chunk):
        b = min(chunk, replicates - first)
        weights = resample_counts(n, b, rng)
        confusion = resampled_confusion(heldout, b, rng) if heldout is not None else None
        out.append(_shares(method, probs, weights, confusion, heldout.prior if heldout is not None else None))
    return np.concatenate(out)


def resample_counts(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n items is drawn in each of b resamples of size n with replacement, (b, n) floats."""
    draws = rng.integers(0, n, (b, n)) + n * np.arange(b)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


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


def resampled_confusion(heldout: HeldOut, b: int, rng: np.random.Generator) -> np.ndarray:
    """Soft confusion matrices (b, K, K) of held-out faces resampled with replacement within each class."""
    k = heldout.probabilities.shape[1]
    out = np.empty((b, k, k))
    for i in range(k):
        rows = heldout.probabilities[heldout.labels == i]
        out[:, :, i] = resample_counts(len(rows), b, rng) @ rows / len(rows)
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


def simplex_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over the probability simplex, exactly, for each of B problems (a: (B, K, K), b: (B, K)).

    The minimiser is the equality-constrained least-squares solution on its own support. An
    active-set search finds that support for all problems at once (drop the negative
    coordinates, add back one whose KKT multiplier is negative, until the KKT conditions hold,
    which for this convex problem proves the minimum); the few problems it does not settle
    within 3 K rounds (degenerate ones) have every support tried (K <= 12).
    """
    n, k = b.shape
    if k > 12:
        raise InvalidParameterError(f"simplex_least_squares tries every support: at most 12 classes, got {k}")
    a = np.broadcast_to(a, (n, k, k))
    whole = _support_solution(a, b, tuple(range(k)))[0]
    out = whole / whole.sum(1, keepdims=True)
    outside = np.flatnonzero(whole.min(1) < 0)  # only these need a search for their support
    if not len(outside):
        return out
    found, settled = _active_set(a[outside], b[outside])
    out[outside[settled]] = found[settled]
    rest = outside[~settled]
    if len(rest):
        out[rest] = _every_support(a[rest], b[rest])
    return out


def _active_set(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x (m, K), settled (m,)): the simplex least-squares solutions found by an active-set search, and which
    problems it proved optimal (KKT conditions met)."""
    m, k = b.shape
    gram = 2 * np.einsum("bji,bjk->bik", a, a)
    linear = 2 * np.einsum("bji,bj->bi", a, b)
    support = np.ones((m, k), bool)
    x, settled = np.zeros((m, k)), np.zeros(m, bool)
    rows = np.arange(m)
    for _ in range(3 * k):
        todo = ~settled
        sub = support[todo]
        kkt = np.zeros((int(todo.sum()), k + 1, k + 1))
        both = sub[:, :, None] & sub[:, None, :]
        kkt[:, :k, :k] = np.where(both, gram[todo], 0) + np.eye(k) * ~sub[:, :, None]
        kkt[:, :k, k] = kkt[:, k, :k] = sub
        rhs = np.concatenate([np.where(sub, linear[todo], 0), np.ones((len(sub), 1))], axis=1)
        try:
            sol = np.linalg.solve(kkt, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break  # a singular support: leave the rest to the search over every support
        xs, nu = sol[:, :k], sol[:, k]
        negative = sub & (xs < -1e-12)
        multiplier = np.einsum("bij,bj->bi", gram[todo], xs) - linear[todo] + nu[:, None]  # >= 0 off the support
        violated = ~sub & (multiplier < -1e-9)
        idx = rows[todo]
        x[idx] = np.where(sub, xs, 0)
        drop = negative.any(1)
        support[idx[drop]] &= ~negative[drop]
        grow = ~drop & violated.any(1)
        worst = np.argmin(np.where(violated, multiplier, np.inf), axis=1)
        support[idx[grow], worst[grow]] = True
        settled[idx[~drop & ~grow]] = True
        if settled.all():
            break
    x = np.clip(x, 0, None)
    total = x.sum(1, keepdims=True)
    return x / np.where(total > 0, total, 1.0), settled & (total[:, 0] > 0)


def _every_support(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Simplex least squares by trying every support: the feasible support solution of least residual."""
    from itertools import combinations

    m, k = b.shape
    best, best_loss = np.full((m, k), 1 / k), np.full(m, np.inf)
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            x, loss = _support_solution(a, b, support)
            better = (x.min(1) >= -1e-12) & (loss < best_loss - 1e-15)
            full = np.zeros((m, k))
            full[:, support] = np.clip(x, 0, None)
            best = np.where(better[:, None], full, best)
            best_loss = np.where(better, loss, best_loss)
    return best / best.sum(1, keepdims=True)


def _support_solution(a: np.ndarray, b: np.ndarray, support: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(x, residual) of min ||a[:, :, support] x - b|| subject to sum(x) = 1 (signs free), per problem."""
    n, size = len(b), len(support)
    cols = a[:, :, support]
    kkt = np.zeros((n, size + 1, size + 1))
    kkt[:, :size, :size] = 2 * np.einsum("bji,bjk->bik", cols, cols)
    kkt[:, :size, size] = kkt[:, size, :size] = 1
    rhs = np.concatenate([2 * np.einsum("bji,bj->bi", cols, b), np.ones((n, 1))], axis=1)
    try:
        x = np.linalg.solve(kkt, rhs[..., None])[..., :size, 0]
    except np.linalg.LinAlgError:  # a singular sub-matrix: its least-norm solution
        x = (np.linalg.pinv(kkt) @ rhs[..., None])[..., :size, 0]
    return x, ((np.einsum("bjk,bk->bj", cols, x) - b) ** 2).sum(1)


def em_priors(probs: np.ndarray, weights: np.ndarray, prior: np.ndarray, *, tol: float = 1e-6,
              max_iter: int = 500) -> np.ndarray:
    """Saerens-Latinne-Decaestecker EM: class shares (B, K) for B normalised face weightings (B, n).

    `probs` (n, K) are calibrated under the training class mix `prior` (K,). EM starts from the
    weighted mean probability (the first step from the training mix; never from an earlier
    estimate: a share that reached 0 could not grow again). Each cycle of
    two EM steps is extrapolated (SQUAREM, Varadhan & Roland 2008) and then stabilised by one
    more EM step; a cycle that would leave the simplex keeps the plain steps.
    """
    def em_step(shares: np.ndarray, w: np.ndarray) -> np.ndarray:
        post = probs[None] * (shares / prior)[:, None, :]
        post /= post.sum(-1, keepdims=True)
        return np.einsum("bn,bnk->bk", w, post)

    shares = weights @ probs
    active = np.arange(len(weights))
    for _ in range(max_iter):
        w, x0 = weights[active], shares[active]
        x1 = em_step(x0, w)
        x2 = em_step(x1, w)
        r, v = x1 - x0, x2 - 2 * x1 + x0
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.minimum(-np.linalg.norm(r, axis=1) / np.linalg.norm(v, axis=1), -1.0)[:, None]
        jump = x0 - 2 * alpha * r + alpha**2 * v
        plain = ~np.all(np.isfinite(jump) & (jump > 0), axis=1)
        new = em_step(np.where(plain[:, None], x2, jump), w)
        shares[active] = new
        active = active[np.abs(new - x0).max(1) >= tol]
        if not len(active):
            break
    return shares


@dataclass(frozen=True)
class Stratum:
    """A collection (or one group of it) of `faces` faces with mean probability vector `mean_probs` (K,), and the
    probabilities `probs` (n, K) and true classes `labels` (n,) of a uniform random sample of n of them."""

    mean_probs: np.ndarray
    faces: int
    probs: np.ndarray
    labels: np.ndarray


def validated(mean_probs: np.ndarray, faces: int, probs: np.ndarray, labels: np.ndarray, *,
              weight: float | None = 1.0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class shares (estimate, low, high), each (K,), of a collection of `faces` faces whose mean probability
    vector is `mean_probs` (K,), from the probabilities `probs` (n, K) and true classes `labels` (n,) of a
    uniform random sample of n of them, drawn without replacement.

    The estimate is w * mean_probs + mean(onehot(labels) - w * probs): prediction-powered inference
    (PPI) with `weight` w = 1, the labelled sample's own shares with w = 0, and PPI++'s power-tuned
    weight (Angelopoulos, Duchi & Zrnic 2023: the w in [0, 1] of least total variance, from the
    sample) with None. The collection itself is the population (its true shares are the target), so
    its mean probability is known exactly and the only error is the sample's: a normal interval
    with the finite-population variance (1 - n/N) s^2 / n of the corrected residuals (0 when every
    face is labelled). s^2 is taken over the residuals plus one pseudo-face per class (residual
    onehot(class) - w * mean_probs), as Agresti and Coull add pseudo-observations to a proportion: a
    class with few faces in the sample otherwise often gets too small a variance (at 100 labelled
    faces of 300 the intervals covered 92-94% without, 96% with; docs/BENCHMARKS.md). Estimates are
    projected onto the simplex (a negative share becomes 0) and intervals clipped to [0, 1].
    """
    return validated_strata([Stratum(mean_probs, faces, probs, labels)], weight=weight, level=level)


def validated_strata(strata: list[Stratum], *, weight: float | None = 1.0, level: float = 0.95,
                     others: Sequence[tuple[int, np.ndarray, np.ndarray]] = ()
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`validated` shares of the union of disjoint strata (groups), each with its own uniform random sample:
    the strata's estimates weighted by their numbers of faces (a stratified estimate, right however
    unequally the strata were sampled). `others`: strata estimated another way, each (faces, shares (K,),
    their variances (K,)), weighted the same way."""
    parts = [(s.faces, *_ppi(s, weight)) for s in strata] + [(n, np.asarray(p, np.float64), np.asarray(v, np.float64))
                                                             for n, p, v in others]
    total = sum(n for n, _, _ in parts)
    point = sum(n / total * p for n, p, _ in parts)
    se = np.sqrt(sum((n / total) ** 2 * v for n, _, v in parts))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    estimate = np.clip(point, 0, None)
    estimate = estimate / estimate.sum() if estimate.sum() > 0 else np.full(len(point), 1 / len(point))
    return estimate, np.clip(point - z * se, 0, 1), np.clip(point + z * se, 0, 1)


def _ppi(stratum: Stratum, weight: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(point estimate, variance), each (K,), of one stratum's class shares (see `validated`)."""
    probs, mean_probs = np.asarray(stratum.probs, np.float64), np.asarray(stratum.mean_probs, np.float64)
    labels, faces = np.asarray(stratum.labels, np.int64), stratum.faces
    n, k = probs.shape if probs.ndim == 2 else (0, len(mean_probs))
    if n < 2 or labels.shape != (n,) or faces < n or mean_probs.shape != (k,):
        raise InvalidParameterError(f"validated shares need at least 2 labelled faces among the collection's {faces} "
                                    f"and one true class each; got {n} probability rows, labels {labels.shape}")
    if labels.min() < 0 or labels.max() >= k:
        raise InvalidParameterError(f"true classes must be indices 0..{k - 1}, got {sorted(set(labels.tolist()))}")
    truth = np.eye(k)[labels]
    if weight is None:
        centred = probs - probs.mean(0)
        spread = float((centred**2).sum())
        weight = float(np.clip((centred * (truth - truth.mean(0))).sum() / spread, 0, 1)) if spread > 0 else 0.0
    residual = truth - weight * probs
    padded = np.concatenate([residual, np.eye(k) - weight * mean_probs])  # one pseudo-face per class (variance only)
    return weight * mean_probs + residual.mean(0), max(0.0, 1 - n / faces) * padded.var(0, ddof=1) / n


#: The top-probability bins the shift test compares (the test then costs the same for any number of faces).
SHIFT_BINS = 200


def top_histogram(probs: np.ndarray) -> np.ndarray:
    """How many of the faces with probabilities `probs` (n, K) have their top probability in each of SHIFT_BINS
    equal bins of [0, 1] (SHIFT_BINS,): what `shift_test` needs, summed batch by batch."""
    edges = np.linspace(0, 1, SHIFT_BINS + 1)[1:-1]
    return np.bincount(np.digitize(np.asarray(probs).max(1), edges), minlength=SHIFT_BINS).astype(np.float64)


def shift_test(top: np.ndarray, heldout: HeldOut, shares: np.ndarray, *, replicates: int = 200,
               random_state: int | np.random.Generator | None = 0) -> tuple[float, float]:
    """(distance, p-value): do faces whose top probabilities fall in the bins `top` (`top_histogram`) look unlike
    the model's held-out faces?

    Needs no labels. A collection that differs from the training data only in its class mix has
    the top probabilities of held-out faces mixed in its class `shares` (K,: the pacc estimate of
    the collection). The distance is the Kolmogorov-Smirnov distance between the faces'
    top-probability distribution and that mixture of the held-out faces'. Its p-value comes from a
    parametric bootstrap of the whole procedure, `replicates` times: a collection of as many faces
    drawn from the held-out faces mixed in `shares`, a held-out set resampled within each class (its
    finite size is uncertain too), the pacc estimate of the drawn collection with that set's
    confusion matrix, and the distance between the two (so that fitting the mix to the faces, which
    brings the mixture closer to them, is accounted for).
    """
    top = np.asarray(top, np.float64)
    rng = np.random.default_rng(random_state)
    probs, labels = heldout.probabilities, heldout.labels
    k = probs.shape[1]
    held_bins = np.digitize(probs.max(1), np.linspace(0, 1, SHIFT_BINS + 1)[1:-1])
    onehot = np.eye(k)[labels]

    def mixture(counts: np.ndarray, mix: np.ndarray) -> np.ndarray:
        """Weights of the held-out faces (drawn `counts` times each) mixed in shares `mix`."""
        per_class = onehot.T @ counts
        w = counts * (np.asarray(mix, np.float64) / np.where(per_class > 0, per_class, 1.0))[labels]
        return w / w.sum()

    def cdf(w: np.ndarray) -> np.ndarray:
        return np.cumsum(np.bincount(held_bins, w, minlength=SHIFT_BINS)) / w.sum()

    ones = np.ones(len(labels))
    weights = mixture(ones, shares)
    observed = np.abs(np.cumsum(top) / top.sum() - cdf(weights)).max()
    n = int(top.sum())
    resampled = np.zeros((replicates, len(labels)))
    for rows in (np.nonzero(labels == i)[0] for i in range(k)):
        if len(rows):
            resampled[:, rows] = resample_counts(len(rows), replicates, rng)
    drawn = rng.multinomial(n, weights, size=replicates).astype(np.float64)
    class_sums = np.einsum("bn,nj,ni->bji", resampled, probs, onehot)  # resampled confusion, unnormalised
    confusion = class_sums / np.maximum(np.einsum("bn,ni->bi", resampled, onehot), 1.0)[:, None, :]
    refit = simplex_least_squares(confusion, drawn @ probs / n)
    null = np.array([np.abs(cdf(drawn[b]) - cdf(mixture(resampled[b], refit[b]))).max() for b in range(replicates)])
    return float(observed), float((1 + np.sum(null >= observed)) / (1 + replicates))
