"""bnlib.numpy_fast equals the reference bnlib.numpy_bn: the same outputs, gradients,
statistics, caches and errors, over shapes that exercise its cache blocks, and it
stays accurate in float32 where the reference's own rounding shows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlib import numpy_bn as nb
from bnlib import numpy_fast as nf

# 2D to 5D; (64, 8, 40, 40) and (256, 1024) span several cache blocks.
SHAPES = [(8, 5), (6, 3, 7), (4, 3, 5, 6), (3, 2, 3, 4, 5), (64, 8, 40, 40),
          (256, 1024)]
TOL = {np.float64: 1e-12, np.float32: 2e-5}  # relative to the largest magnitude


def _assert_same(ours, ref, tol):
    """Same shape and dtype, and max |ours - ref| <= tol * max(1, max |ref|)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= tol, f"relative difference {err:.1e} > {tol:.0e}"


def _inputs(rng, shape, dtype=np.float64, loc=2.0, scale=3.0):
    c = shape[1]
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (rng.standard_normal(c) + 1).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, dy, gamma, beta


def _assert_fast_equals_reference(x, dy, gamma, beta, eps, tol):
    """Forward, backward, inference and batch_stats of both modules agree; the fast
    kernels leave their inputs unchanged."""
    x_before, dy_before = x.copy(), dy.copy()
    y, cache = nf.batchnorm_forward(x, gamma, beta, eps)
    y_ref, cache_ref = nb.batchnorm_forward(x, gamma, beta, eps)
    _assert_same(y, y_ref, tol)
    for field in ("mu", "var", "inv_std", "gamma"):
        _assert_same(getattr(cache, field), getattr(cache_ref, field), tol)
    assert cache.eps == cache_ref.eps and cache.x is x
    for g, g_ref in zip(nf.batchnorm_backward(dy, cache),
                        nb.batchnorm_backward(dy, cache_ref), strict=True):
        _assert_same(g, g_ref, tol)
    for s, s_ref in zip(nf.batch_stats(x), nb.batch_stats(x), strict=True):
        _assert_same(s, s_ref, tol)
    running = (cache_ref.mu, cache_ref.var * 1.5)
    _assert_same(nf.batchnorm_inference(x, gamma, beta, *running, eps),
                 nb.batchnorm_inference(x, gamma, beta, *running, eps), tol)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dy, dy_before)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_reference(rng, shape, dtype):
    _assert_fast_equals_reference(*_inputs(rng, shape, dtype), 1e-5, TOL[dtype])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 6), c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    loc=st.floats(-100, 100), scale=st.floats(0.01, 100),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2**16),
)
def test_hypothesis_equals_reference(n, c, spatial, loc, scale, eps, seed):
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng, (n, c, *spatial), np.float64, loc, scale)
    _assert_fast_equals_reference(*inputs, eps, 1e-10)


@pytest.mark.parametrize("make", [
    lambda a: a.transpose(0, 2, 1),  # (5, 4, 6) from (5, 6, 4): channels strided
    lambda a: a[:, :, ::2],  # every other position
    lambda a: a[::2],  # every other sample
    np.asfortranarray,
], ids=["transposed", "strided-positions", "strided-samples", "fortran"])
def test_non_contiguous_input(rng, make):
    x, dy = (make(rng.standard_normal((10, 6, 4))) for _ in range(2))
    assert not x.flags.c_contiguous
    c = x.shape[1]
    gamma, beta = rng.standard_normal(c) + 1, rng.standard_normal(c)
    _assert_fast_equals_reference(x, dy, gamma, beta, 1e-5, TOL[np.float64])


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 6), (64, 8, 40, 40)])
def test_caches_are_interchangeable(rng, shape):
    """A cache from either module's forward works with either module's backward."""
    x, dy, gamma, beta = _inputs(rng, shape)
    _, cache_fast = nf.batchnorm_forward(x, gamma, beta)
    _, cache_ref = nb.batchnorm_forward(x, gamma, beta)
    assert type(cache_fast) is nb.Cache and nf.Cache is nb.Cache
    expected = nb.batchnorm_backward(dy, cache_ref)
    for backward in (nb.batchnorm_backward, nb.batchnorm_backward_steps,
                     nf.batchnorm_backward):
        for cache in (cache_fast, cache_ref):
            for g, g_ref in zip(backward(dy, cache), expected, strict=True):
                _assert_same(g, g_ref, 1e-10)
    _assert_same(cache_fast.x_hat, cache_ref.x_hat, 1e-12)


@pytest.mark.parametrize("shape", [(256, 8), (16, 4, 32, 32), (64, 8, 40, 40)])
def test_float32_large_mean_close_to_float64(rng, shape):
    """Mean 1e4, unit variance, float32: the variance is right (E[x^2] - E[x]^2 would
    lose every digit), and outputs and gradients stay close to the float64 computation
    on the same values, although mu itself rounds to float32 (an ulp of 1e-3 at 1e4);
    the reference's float32 y is off by up to that rounding / std, PyTorch's by 1e-3.
    dgamma's bound is looser: the rounded mu shifts every x - mu alike."""
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    y, cache = nf.batchnorm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32))
    dx, dgamma, _ = nf.batchnorm_backward(dy, cache)
    x64 = x.astype(np.float64)  # the same float32 values, computed in float64
    y64, cache64 = nb.batchnorm_forward(x64, np.ones(c), np.zeros(c))
    dx64, dgamma64, _ = nb.batchnorm_backward(dy.astype(np.float64), cache64)
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(cache.var, cache64.var, rtol=1e-5)
    np.testing.assert_allclose(nf.batch_stats(x)[1], cache64.var, rtol=1e-5)
    assert np.abs(y - y64).max() < 1e-5
    assert np.abs(dx - dx64).max() < 1e-4 * np.abs(dx64).max()
    assert np.abs(dgamma - dgamma64).max() < 1e-3 * np.abs(dgamma64).max()


def _outcome(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # the exception is what is compared
        return type(e), str(e)
    return None


X = np.zeros((4, 3))
V = np.ones(3)
_, CACHE = nb.batchnorm_forward(np.arange(12.0).reshape(4, 3), V, V)
BAD_CALLS = {
    "forward: list": ("batchnorm_forward", [[1.0, 2.0, 3.0]] * 4, V, V),
    "forward: int64": ("batchnorm_forward", X.astype(np.int64), V, V),
    "forward: 1D": ("batchnorm_forward", np.zeros(3), V, V),
    "forward: gamma shape": ("batchnorm_forward", X, np.ones(2), V),
    "forward: beta shape": ("batchnorm_forward", X, V, np.ones((3, 1))),
    "forward: eps 0": ("batchnorm_forward", X, V, V, 0.0),
    "forward: eps < 0": ("batchnorm_forward", X, V, V, -1e-5),
    "forward: one sample": ("batchnorm_forward", np.zeros((1, 3)), V, V),
    "forward: one value": ("batchnorm_forward", np.zeros((1, 3, 1, 1)), V, V),
    "forward: no channel": ("batchnorm_forward", np.zeros((4, 0)), V[:0], V[:0]),
    "backward: dy shape": ("batchnorm_backward", np.zeros((4, 2)), CACHE),
    "inference: running_var": ("batchnorm_inference", X, V, V, V, np.ones(4)),
    "inference: running_mean": ("batchnorm_inference", X, V, V, V[:2], V),
    "inference: 1D": ("batchnorm_inference", np.zeros(3), V, V, V, V),
    "inference: eps": ("batchnorm_inference", X, V, V, V, V, 0.0),
    "batch_stats: one sample": ("batch_stats", np.zeros((1, 3))),
    "batch_stats: float16": ("batch_stats", X.astype(np.float16)),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_same_errors_as_reference(call):
    name, *args = call
    expected = _outcome(getattr(nb, name), *args)
    assert expected is not None, "the reference accepts this call"
    assert _outcome(getattr(nf, name), *args) == expected
