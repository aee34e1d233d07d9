"""psi validation and the hierarchy maps: every error path names the bad entry."""

import jax.numpy as jnp
import numpy as np
import pytest

from maxl_jax import hierarchy


def test_valid_psi_is_normalised_to_python_ints():
    assert hierarchy.validate_psi(np.array([5, 5, 5])) == (5, 5, 5)
    assert hierarchy.validate_psi([4, 1, 1, 3, 1], num_primary=5) == (4, 1, 1, 3, 1)
    assert hierarchy.validate_psi([2.0, 3.0]) == (2, 3)


@pytest.mark.parametrize("psi, match", [
    ([], "empty"),
    ([5, 0, 5], r"psi\[1\] = 0 is not positive"),
    ([5, -2], r"psi\[1\] = -2 is not positive"),
    ([5, 2.5], r"psi\[1\] = 2.5 is not an integer"),
    ([5, "3"], r"psi\[1\] = '3' is not an integer"),
    ([True, 2], r"psi\[0\] = True is not an integer"),
    ("55", "sequence of positive integers"),
    (5, "sequence of positive integers"),
])
def test_bad_psi_raises_value_error_naming_the_entry(psi, match):
    with pytest.raises(ValueError, match=match):
        hierarchy.validate_psi(psi)


def test_psi_length_must_match_the_primary_classes():
    with pytest.raises(ValueError, match="psi has 3 entries but the primary task has 20 classes"):
        hierarchy.validate_psi([5, 5, 5], num_primary=20)


def test_auxiliary_to_primary_and_blocks():
    psi = (4, 1, 1, 3, 1)
    np.testing.assert_array_equal(hierarchy.auxiliary_to_primary(psi),
                                  [0, 0, 0, 0, 1, 2, 3, 3, 3, 4])
    np.testing.assert_array_equal(hierarchy.block_starts(psi), [0, 4, 5, 6, 9])
    ind = hierarchy.block_indicator(psi)
    assert ind.shape == (5, 10)
    np.testing.assert_array_equal(ind.sum(1), psi)
    np.testing.assert_array_equal(ind.sum(0), np.ones(10))


def test_batch_mask_is_one_on_the_true_block_and_1e8_elsewhere():
    psi = (2, 3)
    mask = np.asarray(hierarchy.batch_mask(jnp.array([1, 0]), psi))
    np.testing.assert_allclose(mask, [[1e-8, 1e-8, 1, 1, 1], [1, 1, 1e-8, 1e-8, 1e-8]])
    np.testing.assert_allclose(np.asarray(hierarchy.log_batch_mask(jnp.array([1, 0]), psi)),
                               np.log(mask), rtol=1e-6)
