import numpy as np
import pytest

from facerace.errors import InvalidParameterError
from facerace.labels import MAPPINGS, SCHEMES, convert_label, convert_probabilities, get_scheme, mapping


def test_schemes_have_the_documented_classes():
    assert len(get_scheme("fairface7").classes) == 7
    assert get_scheme("race6").classes == ("White", "Black", "Latino_Hispanic", "Asian", "Indian", "Middle Eastern")
    assert get_scheme("race4").classes == ("White", "Black", "Asian", "Indian")
    assert get_scheme("utk5").classes == ("White", "Black", "Asian", "Indian", "Others")


def test_every_mapping_covers_its_source_and_lands_in_its_target():
    for (src, dst), table in MAPPINGS.items():
        assert set(table) == set(SCHEMES[src].classes)
        assert {v for v in table.values() if v} <= set(SCHEMES[dst].classes)


def test_coarser_probabilities_are_sums_of_finer_ones():
    p7 = np.array([[0.1, 0.2, 0.05, 0.3, 0.15, 0.1, 0.1]])
    p6 = convert_probabilities(p7, "fairface7", "race6")
    assert np.allclose(p6, [[0.1, 0.2, 0.05, 0.45, 0.1, 0.1]])
    p5 = convert_probabilities(p7, "fairface7", "utk5")
    assert np.allclose(p5, [[0.1, 0.2, 0.45, 0.1, 0.15]])


def test_dropped_classes_renormalise():
    p7 = np.array([[0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1]])  # Latino and Middle Eastern have no race4 class
    p4 = convert_probabilities(p7, "fairface7", "race4")
    assert np.allclose(p4, np.array([[0.1, 0.2, 0.2, 0.1]]) / 0.6)
    assert convert_label("Middle Eastern", "fairface7", "race4") is None


def test_mapping_chain_agrees_with_direct_mapping():
    p7 = np.random.default_rng(0).dirichlet(np.ones(7), size=20)
    direct = convert_probabilities(p7, "fairface7", "utk5")
    chained = convert_probabilities(convert_probabilities(p7, "fairface7", "race6"), "race6", "utk5")
    assert np.allclose(direct, chained)


def test_unknown_scheme_and_impossible_mapping_are_clear():
    with pytest.raises(InvalidParameterError, match="Did you mean 'race6'"):
        get_scheme("race7")
    with pytest.raises(InvalidParameterError, match="cannot be mapped"):
        mapping("utk5", "fairface7")
