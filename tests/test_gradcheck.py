"""bnlib.gradcheck: central differences agree with known derivatives."""

from __future__ import annotations

import numpy as np
import pytest

from bnlib.gradcheck import numerical_gradient, rel_error


def test_numerical_gradient_of_known_functions(rng):
    x = rng.standard_normal((3, 4))
    dout = rng.standard_normal((3, 4))
    grad = numerical_gradient(np.sin, x, dout)
    assert rel_error(grad, np.cos(x) * dout) < 1e-8
    w = rng.standard_normal((4, 2))
    grad = numerical_gradient(lambda v: v @ w, x, rng.standard_normal((3, 2)))
    assert grad.shape == x.shape


def test_x_is_restored_even_if_f_raises(rng):
    x = rng.standard_normal(5)
    before = x.copy()
    numerical_gradient(lambda v: v**2, x, np.ones(5))
    np.testing.assert_array_equal(x, before)

    def boom(v):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        numerical_gradient(boom, x, np.ones(5))
    np.testing.assert_array_equal(x, before)


def test_errors():
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(np.sin, np.ones(3, np.float32), np.ones(3))
    with pytest.raises(ValueError, match="contiguous"):
        numerical_gradient(np.sin, np.ones((3, 4)).T, np.ones((4, 3)))
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(np.ones(2), np.ones(3))


def test_rel_error():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0
    assert rel_error(np.array([1.0]), np.array([1.1])) == pytest.approx(0.1 / 2.1)
