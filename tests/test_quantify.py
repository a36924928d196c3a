"""Quantification maths against hand-computed cases and synthetic data with a known mix."""

import numpy as np
import pytest

from facerace.errors import InvalidParameterError
from facerace.quantify import (
    ADJUSTED,
    HeldOut,
    bootstrap,
    em_priors,
    estimate,
    interval,
    Stratum,
    shift_test,
    top_histogram,
    simplex_least_squares,
    validated,
    validated_strata,
)

# Held-out faces of a 2-class model: every class-0 face gets (0.8, 0.2), every class-1 face (0.3, 0.7),
# so the soft confusion matrix is M = [[0.8, 0.3], [0.2, 0.7]] (columns: true classes).
HELDOUT2 = HeldOut(np.array([[0.8, 0.2]] * 5 + [[0.3, 0.7]] * 5), np.array([0] * 5 + [1] * 5))


def test_confusion_and_prior():
    np.testing.assert_allclose(HELDOUT2.confusion(), [[0.8, 0.3], [0.2, 0.7]])
    np.testing.assert_allclose(HELDOUT2.prior, [0.5, 0.5])


def test_count_and_probability_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.3, 0.7]])
    np.testing.assert_allclose(estimate(probs, "count"), [0.75, 0.25])
    np.testing.assert_allclose(estimate(probs, "probability"), [0.6, 0.4])


def test_pacc_by_hand():
    # q = (0.7, 0.3) = M pi  ->  0.5 pi0 + 0.3 = 0.7  ->  pi = (0.8, 0.2); counting says (1, 0)
    probs = np.array([[0.7, 0.3]] * 4)
    np.testing.assert_allclose(estimate(probs, "pacc", HELDOUT2), [0.8, 0.2], atol=1e-8)
    np.testing.assert_allclose(estimate(probs, "count"), [1.0, 0.0])
    # q = (0.9, 0.1) has no solution in the simplex (pi0 = 1.2): the nearest share vector is (1, 0)
    np.testing.assert_allclose(estimate(np.array([[0.9, 0.1]]), "pacc", HELDOUT2), [1.0, 0.0], atol=1e-8)


def test_em_by_hand():
    # Uniform training mix; half the faces at p0 = 0.9, half at 0.3. The fixed point of
    # pi = mean(pi p / (pi p + (1 - pi)(1 - p))) inside (0, 1) solves 0.32 pi^2 - 0.58 pi + 0.26 = 0:
    # pi = (0.58 - 0.06) / 0.64 = 0.8125 (the likelihood falls toward the other root, pi = 1).
    probs = np.array([[0.9, 0.1], [0.3, 0.7]] * 3)
    np.testing.assert_allclose(estimate(probs, "em", HELDOUT2), [0.8125, 0.1875], atol=1e-4)


def test_em_uses_the_training_mix():
    # Probabilities calibrated under a 25/75 training mix that average exactly to it: nothing to correct.
    probs = np.array([[0.25, 0.75]] * 4)
    held = HeldOut(probs, np.array([0, 1, 1, 1]))
    np.testing.assert_allclose(em_priors(probs, np.full((1, 4), 0.25), held.prior), [[0.25, 0.75]], atol=1e-9)


def test_simplex_least_squares_with_the_identity_is_the_projection_onto_the_simplex():
    b = np.array([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -1.0], [0.2, 0.3, 0.5], [0.9, 0.4, 0.0]])
    got = simplex_least_squares(np.broadcast_to(np.eye(3), (5, 3, 3)), b)
    np.testing.assert_allclose(got, [[1 / 3] * 3, [1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [0.75, 0.25, 0]],
                               atol=1e-12)


def test_simplex_least_squares_with_a_singular_matrix():
    a = np.array([[[0.5, 0.5], [0.5, 0.5]]])  # both classes look the same: any split fits, one is returned
    got = simplex_least_squares(a, np.array([[0.5, 0.5]]))
    assert got.shape == (1, 2) and got.sum() == pytest.approx(1) and got.min() >= 0


def test_simplex_least_squares_matches_the_inverse_inside_the_simplex():
    rng = np.random.default_rng(1)
    a = np.eye(4) * 0.6 + 0.1
    truth = rng.dirichlet(np.ones(4), size=20)
    got = simplex_least_squares(np.broadcast_to(a, (20, 4, 4)), truth @ a.T)
    np.testing.assert_allclose(got, truth, atol=1e-7)


def _gaussian_faces(rng, means, n, mix):
    """Faces of a classifier whose probabilities are exactly calibrated under a uniform class mix."""
    y = rng.choice(len(means), n, p=mix)
    x = means[y] + rng.standard_normal((n, means.shape[1]))
    loglik = -((x[:, None, :] - means[None]) ** 2).sum(-1) / 2
    p = np.exp(loglik - loglik.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.8, (5, 8))  # weakly separated: about 65% right per face
    held = HeldOut(*_gaussian_faces(rng, means, 5000, np.full(5, 0.2)))
    probs, y = _gaussian_faces(rng, means, 20000, np.array([0.55, 0.25, 0.1, 0.07, 0.03]))
    return held, probs, np.bincount(y, minlength=5) / len(y), means


@pytest.mark.parametrize("method", ["pacc", "em", "adjusted"])
def test_adjusted_methods_recover_a_shifted_mix(synthetic, method):
    held, probs, truth, _ = synthetic
    assert np.abs(estimate(probs, method, held) - truth).max() < 0.02


@pytest.mark.parametrize("method", ["count", "probability"])
def test_naive_methods_are_biased_toward_the_training_mix(synthetic, method):
    held, probs, truth, _ = synthetic
    # the largest class is under-estimated and the smallest over-estimated by several points
    est = estimate(probs, method, held)
    assert est[0] < truth[0] - 0.05 and est[-1] > truth[-1] + 0.02


def test_bootstrap_is_seeded_and_covers_the_estimate(synthetic):
    held, probs, _, _ = synthetic
    probs = probs[:300]
    a = bootstrap(probs, "pacc", held, replicates=200, random_state=3)
    np.testing.assert_array_equal(a, bootstrap(probs, "pacc", held, replicates=200, random_state=3))
    assert a.shape == (200, 5)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-9)
    low, high = interval(a)
    est = estimate(probs, "pacc", held)
    assert np.all(low <= est + 1e-9) and np.all(est <= high + 1e-9)


def test_bootstrap_includes_the_heldout_uncertainty(synthetic):
    held, probs, _, _ = synthetic
    small = HeldOut(held.probabilities[:100], held.labels[:100])
    width = {name: np.ptp(interval(bootstrap(probs[:2000], "pacc", h, replicates=300)), axis=0).mean()
             for name, h in (("small", small), ("large", held))}
    assert width["small"] > 1.3 * width["large"]


def test_bootstrap_covers_the_truth(synthetic):
    """About 95% of the 95% intervals of repeated small collections hold the true shares."""
    held, _, _, means = synthetic
    rng = np.random.default_rng(7)
    hits = []
    for _ in range(20):
        probs, y = _gaussian_faces(rng, means, 500, rng.dirichlet(np.ones(5)))
        low, high = interval(bootstrap(probs, ADJUSTED, held, replicates=300, random_state=rng))
        truth = np.bincount(y, minlength=5) / len(y)
        hits += list((low <= truth + 1e-9) & (truth <= high + 1e-9))
    assert 0.85 <= np.mean(hits) <= 1.0


def _shifted_collection(rng, means, n):
    """Faces whose photos differ from the training ones: every class's faces drift toward class 0's."""
    y = rng.choice(len(means), n, p=rng.dirichlet(np.full(len(means), 0.7)))
    x = means[y] + 0.6 * (means[0] - means[y]) + rng.standard_normal((n, means.shape[1]))
    loglik = -((x[:, None, :] - means[None]) ** 2).sum(-1) / 2
    p = np.exp(loglik - loglik.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


@pytest.mark.parametrize("weight", [1.0, None])
def test_validated_is_unbiased_and_covers_under_a_strong_shift(synthetic, weight):
    """Collections of 1,000 faces whose photos differ from the training ones, 200 labelled at random: pacc is
    biased by points, validated is not and about 95% of its 95% intervals hold the true shares."""
    held, _, _, means = synthetic
    rng = np.random.default_rng(11)
    errors, pacc_errors, hits = [], [], []
    for _ in range(400):
        probs, y = _shifted_collection(rng, means, 1000)
        truth = np.bincount(y, minlength=5) / len(y)
        sample = rng.choice(1000, 200, replace=False)
        est, low, high = validated(probs.mean(0), 1000, probs[sample], y[sample], weight=weight)
        errors.append(est - truth)
        pacc_errors.append(estimate(probs, "pacc", held) - truth)
        hits.append((low <= truth + 1e-9) & (truth <= high + 1e-9))
    assert np.abs(np.mean(pacc_errors, 0)).max() > 0.05  # the shift biases the adjusted estimate
    assert np.abs(np.mean(errors, 0)).max() < 0.005  # bias near 0 (standard error of a mean over 400: ~0.1 point)
    assert np.mean(np.abs(errors)) < 0.02
    assert 0.93 <= np.mean(hits) <= 0.97


def test_validated_covers_with_few_labels(synthetic):
    """300 faces, 50 labelled, rare classes (2-5%): a class with few faces in the sample must not get too small a
    variance (without the pseudo-faces: 93% coverage here)."""
    _, _, _, means = synthetic
    rng = np.random.default_rng(13)
    hits = []
    for _ in range(400):
        probs, y = _gaussian_faces(rng, means, 300, np.array([0.8, 0.1, 0.05, 0.03, 0.02]))
        truth = np.bincount(y, minlength=5) / len(y)
        sample = rng.choice(300, 50, replace=False)
        _, low, high = validated(probs.mean(0), 300, probs[sample], y[sample])
        hits.append((low <= truth + 1e-9) & (truth <= high + 1e-9))
    assert 0.95 <= np.mean(hits) <= 0.985


def test_validated_strata_are_right_however_unequally_they_were_sampled(synthetic):
    """Two groups of 900 and 100 faces with 50 labelled in each: pooling the labelled faces over-weights the small
    group; the stratified estimate does not, and covers the truth."""
    _, _, _, means = synthetic
    rng = np.random.default_rng(5)
    errors, hits = [], []
    for _ in range(200):
        big, small = _gaussian_faces(rng, means, 900, np.array([0.8, 0.05, 0.05, 0.05, 0.05])), \
            _gaussian_faces(rng, means, 100, np.array([0.05, 0.05, 0.05, 0.05, 0.8]))
        strata = [Stratum(p.mean(0), len(p), p[:50], y[:50]) for p, y in (big, small)]
        truth = np.bincount(np.concatenate([big[1], small[1]]), minlength=5) / 1000
        est, low, high = validated_strata(strata)
        errors.append(est - truth)
        hits.append((low <= truth + 1e-9) & (truth <= high + 1e-9))
    assert np.abs(np.mean(errors, 0)).max() < 0.005
    assert 0.92 <= np.mean(hits) <= 0.98


def test_shift_test_fires_under_a_shift_and_rarely_without(synthetic):
    held, _, _, means = synthetic
    rng = np.random.default_rng(9)
    fired = {}
    for name, make in (("mix only", lambda: _gaussian_faces(rng, means, 1000, rng.dirichlet(np.full(5, 0.7)))),
                       ("shift", lambda: _shifted_collection(rng, means, 1000))):
        p_values = []
        for _ in range(60):
            probs, _ = make()
            p_values.append(shift_test(top_histogram(probs), held, estimate(probs, "pacc", held), replicates=100,
                                       random_state=rng)[1])
        fired[name] = np.mean(np.array(p_values) < 0.05)
    assert fired["mix only"] <= 0.15 and fired["shift"] >= 0.7


def test_validated_by_hand():
    # 4 faces, 2 labelled: mean probability (0.5, 0.5); labelled residuals (1-0.8, 0-0.2) and (0-0.4, 1-0.6)
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    est, low, high = validated(np.array([0.5, 0.5]), 4, probs, np.array([0, 1]))
    np.testing.assert_allclose(est, [0.5 + (0.2 - 0.4) / 2, 0.5 + (-0.2 + 0.4) / 2])
    # the variance also counts one pseudo-face per class: residuals (1, 0) - (0.5, 0.5) and (0, 1) - (0.5, 0.5)
    se = np.sqrt((1 - 2 / 4) * np.var([0.2, -0.4, 0.5, -0.5], ddof=1) / 2)
    np.testing.assert_allclose(low, np.clip(est - 1.959964 * se, 0, 1), atol=1e-6)  # intervals inside [0, 1]
    np.testing.assert_allclose(high, np.clip(est + 1.959964 * se, 0, 1), atol=1e-6)
    # every face labelled: the labelled shares, exactly
    est, low, high = validated(np.array([0.6, 0.4]), 2, probs, np.array([0, 0]))
    np.testing.assert_allclose([est, low, high], [[1, 0]] * 3)
    # weight 0: the labelled faces' own shares
    np.testing.assert_allclose(validated(np.array([0.5, 0.5]), 10, probs, np.array([0, 1]), weight=0)[0], [0.5, 0.5])
    with pytest.raises(InvalidParameterError, match="at least 2 labelled"):
        validated(np.array([0.5, 0.5]), 10, probs[:1], np.array([0]))
    with pytest.raises(InvalidParameterError, match="true classes"):
        validated(np.array([0.5, 0.5]), 10, probs, np.array([0, 2]))


def test_errors_are_clear():
    probs = np.array([[0.5, 0.5]])
    with pytest.raises(InvalidParameterError, match="held-out"):
        estimate(probs, "adjusted")
    with pytest.raises(InvalidParameterError, match="Did you mean 'pacc'"):
        estimate(probs, "pac", HELDOUT2)
    with pytest.raises(InvalidParameterError, match="no face of class"):
        estimate(probs, "em", HeldOut(np.array([[0.5, 0.5]]), np.array([0])))
    with pytest.raises(InvalidParameterError, match="3 classes"):
        estimate(probs, "pacc", HeldOut(np.full((3, 3), 1 / 3), np.arange(3)))
