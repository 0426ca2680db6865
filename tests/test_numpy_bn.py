"""bnlib.numpy_bn against PyTorch (float64), its own step-by-step backward, numerical
gradients, and the claims the book makes about it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlib import numpy_bn as nb
from bnlib.gradcheck import numerical_gradient, rel_error

SHAPES = [(8, 5), (6, 3, 7), (4, 3, 5, 6), (3, 2, 3, 4, 5)]
F = torch.nn.functional


def _params(rng, c, dtype=np.float64):
    return (rng.standard_normal(c).astype(dtype) + 1,
            rng.standard_normal(c).astype(dtype))


def _torch_train(x, gamma, beta, dy, eps=1e-5):
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    y = F.batch_norm(xt, None, None, gt, bt, True, 0.1, eps)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


def _assert_matches_torch(x, gamma, beta, dy, eps, y_tol, grad_tol, dbeta_tol):
    """numpy_bn's y, dx, dgamma, dbeta equal torch's; tolerances are (rtol, atol)."""
    y, cache = nb.batchnorm_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = nb.batchnorm_backward(dy, cache)
    y_t, dx_t, dg_t, db_t = _torch_train(x, gamma, beta, dy, eps)
    np.testing.assert_allclose(y, y_t, *y_tol)
    np.testing.assert_allclose(dx, dx_t, *grad_tol)
    np.testing.assert_allclose(dgamma, dg_t, *grad_tol)
    np.testing.assert_allclose(dbeta, db_t, *dbeta_tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_torch_float64(rng, shape):
    x = rng.standard_normal(shape) * 3 + 2
    gamma, beta = _params(rng, shape[1])
    dy = rng.standard_normal(shape)
    _assert_matches_torch(x, gamma, beta, dy, 1e-5, y_tol=(1e-12, 1e-12),
                          grad_tol=(1e-10, 1e-12), dbeta_tol=(1e-12, 1e-12))


@pytest.mark.parametrize("shape", SHAPES)
def test_step_by_step_backward_equals_closed_form(rng, shape):
    x = rng.standard_normal(shape)
    gamma, beta = _params(rng, shape[1])
    dy = rng.standard_normal(shape)
    _, cache = nb.batchnorm_forward(x, gamma, beta)
    for a, b in zip(nb.batchnorm_backward(dy, cache),
                    nb.batchnorm_backward_steps(dy, cache), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 2, 3)])
def test_backward_matches_numerical_gradient(rng, shape):
    x = rng.standard_normal(shape)
    gamma, beta = _params(rng, shape[1])
    dy = rng.standard_normal(shape)
    _, cache = nb.batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = nb.batchnorm_backward(dy, cache)
    assert rel_error(dx, numerical_gradient(
        lambda v: nb.batchnorm_forward(v, gamma, beta)[0], x, dy)) < 1e-7
    assert rel_error(dgamma, numerical_gradient(
        lambda g: nb.batchnorm_forward(x, g, beta)[0], gamma.copy(), dy)) < 1e-7
    assert rel_error(dbeta, numerical_gradient(
        lambda b: nb.batchnorm_forward(x, gamma, b)[0], beta.copy(), dy)) < 1e-7


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6), c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_match_torch(n, c, spatial, eps, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c, *spatial)
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
    gamma, beta = _params(rng, c)
    dy = rng.standard_normal(shape)
    _assert_matches_torch(x, gamma, beta, dy, eps, y_tol=(1e-9, 1e-10),
                          grad_tol=(1e-8, 1e-9), dbeta_tol=(1e-9, 1e-10))


@pytest.mark.parametrize("shape", SHAPES)
def test_inference_matches_torch_eval(rng, shape):
    x = rng.standard_normal(shape)
    c = shape[1]
    gamma, beta = _params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    y = nb.batchnorm_inference(x, gamma, beta, mean, var)
    y_t = F.batch_norm(*(torch.tensor(a) for a in (x, mean, var, gamma, beta)), False)
    np.testing.assert_allclose(y, y_t.numpy(), rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_and_close_to_float64(rng):
    x = rng.standard_normal((16, 4, 5, 5)).astype(np.float32)
    gamma, beta = _params(rng, 4, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, cache = nb.batchnorm_forward(x, gamma, beta)
    grads = nb.batchnorm_backward(dy, cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    y64, cache64 = nb.batchnorm_forward(x.astype(np.float64), gamma.astype(np.float64),
                                        beta.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, nb.batchnorm_backward(dy.astype(np.float64), cache64),
                      strict=True):
        np.testing.assert_allclose(g, g64, rtol=1e-4, atol=1e-4)
    inf = nb.batchnorm_inference(x, gamma, beta, np.zeros(4), np.ones(4))
    assert inf.dtype == np.float32


def test_float32_large_mean_normalizes_correctly(rng):
    """A float32 input with mean 1e4 and unit variance: the two-pass variance is right,
    where E[x^2] - E[x]^2 loses every significant digit. The reference computes in
    float32, so the float32 rounding of mu shifts y's mean by (mu error) / std, and
    by nothing else (numpy_fast corrects even that: tests/test_numpy_fast.py)."""
    x = (1e4 + rng.standard_normal((256, 8))).astype(np.float32)
    c = x.shape[1]
    y, cache = nb.batchnorm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32))
    x64 = x.astype(np.float64)  # the exact statistics of the same float32 values
    np.testing.assert_allclose(cache.var, x64.var(0), rtol=1e-3)
    mu_error = cache.mu - x64.mean(0)  # (C,): the float32 mean's rounding
    np.testing.assert_allclose(y.mean(0), -mu_error / x64.std(0), atol=1e-4)
    np.testing.assert_allclose(y.std(0), 1, atol=2e-3)
    naive_var = (x * x).mean(0) - x.mean(0) ** 2  # the cancelling formula, for contrast
    assert np.max(np.abs(naive_var - x64.var(0))) > 10 * np.max(np.abs(cache.var
                                                                       - x64.var(0)))


def test_normalize_step_gives_zero_mean_unit_variance(rng):
    """The book's claim for step 3: x_hat has mean 0 and variance 1 per feature."""
    x = rng.standard_normal((64, 6)) * rng.uniform(0.5, 5, 6) + rng.uniform(-3, 3, 6)
    _, cache = nb.batchnorm_forward(x, np.ones(6), np.zeros(6), eps=1e-12)
    np.testing.assert_allclose(cache.x_hat.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(cache.x_hat.var(0), 1, atol=1e-9)


def test_output_depends_on_batch_mates_in_training_not_in_eval(rng):
    """The book's claim: in training an example's output depends on the rest of its
    batch; in eval mode it does not."""
    layer = nb.BatchNorm(4)
    example = rng.standard_normal((1, 4))
    batch_a = np.concatenate([example, rng.standard_normal((7, 4))])
    batch_b = np.concatenate([example, rng.standard_normal((7, 4)) + 1])
    assert np.abs(layer.forward(batch_a)[0] - layer.forward(batch_b)[0]).max() > 1e-2
    layer.eval()
    np.testing.assert_array_equal(layer.forward(batch_a)[0], layer.forward(batch_b)[0])


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5)])
def test_layer_running_stats_match_torch(rng, momentum, shape):
    layer = nb.BatchNorm(shape[1], momentum=momentum)
    cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    ref = cls(shape[1], momentum=momentum, dtype=torch.float64)
    for _ in range(4):
        x = rng.standard_normal(shape) * 2 + 1
        y = layer.forward(x)
        np.testing.assert_allclose(y, ref(torch.tensor(x)).detach().numpy(), atol=1e-12)
    sd = layer.state_dict()
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(sd[key], value.numpy(), rtol=1e-12, atol=1e-14)
    layer.eval()
    ref.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(layer.forward(x), ref(torch.tensor(x)).detach().numpy(),
                               atol=1e-12)


def test_layer_backward_stores_parameter_gradients(rng):
    layer = nb.BatchNorm(3)
    layer.gamma[:] = [1.0, 2.0, 0.5]
    x = rng.standard_normal((10, 3))
    dy = rng.standard_normal((10, 3))
    layer.forward(x)
    dx = layer.backward(dy)
    _, dx_t, dg_t, db_t = _torch_train(x, layer.gamma, layer.beta, dy)
    np.testing.assert_allclose(dx, dx_t, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, dg_t, atol=1e-12)
    np.testing.assert_allclose(layer.dbeta, db_t, atol=1e-12)


def _layer_state(layer):
    return {k: np.copy(v) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.zeros((4, 5)), ValueError, r"5 channels .* expected 3"),
        (np.zeros((1, 3)), ValueError, "more than 1 value per channel"),
        (np.zeros((1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
        (np.zeros(3), ValueError, r"shape \(N, C\)"),
        (np.zeros((4, 3), dtype=np.int64), TypeError, "float32 or float64"),
        ([[1.0, 2.0, 3.0]] * 4, TypeError, "NumPy array"),
    ],
)
def test_layer_errors_change_no_state(rng, bad, error, match):
    layer = nb.BatchNorm(3)
    layer.forward(rng.standard_normal((6, 3)))
    before = _layer_state(layer)
    with pytest.raises(error, match=match):
        layer.forward(bad)
    after = _layer_state(layer)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_function_errors(rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        nb.batchnorm_forward(x, np.ones(2), np.zeros(3))
    with pytest.raises(ValueError, match="eps must be positive"):
        nb.batchnorm_forward(x, np.ones(3), np.zeros(3), eps=0.0)
    _, cache = nb.batchnorm_forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"dy must have the forward input's shape"):
        nb.batchnorm_backward(np.zeros((4, 2)), cache)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        nb.batchnorm_inference(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="eps must be positive"):
        nb.BatchNorm(3, eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        nb.BatchNorm(3, momentum=1.5)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        nb.BatchNorm(3).backward(np.zeros((4, 3)))


def test_non_contiguous_input(rng):
    x = rng.standard_normal((5, 6, 4)).transpose(0, 2, 1)  # (5, 4, 6), not contiguous
    gamma, beta = _params(rng, 4)
    dy = rng.standard_normal(x.shape)
    y, cache = nb.batchnorm_forward(x, gamma, beta)
    dx, _, _ = nb.batchnorm_backward(dy, cache)
    y_t, dx_t, _, _ = _torch_train(np.ascontiguousarray(x), gamma, beta, dy)
    np.testing.assert_allclose(y, y_t, atol=1e-12)
    np.testing.assert_allclose(dx, dx_t, atol=1e-12)


def test_reset_running_stats(rng):
    layer = nb.BatchNorm(3, momentum=None)
    layer.forward(rng.standard_normal((8, 3)) + 2)
    layer.reset_running_stats()
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert layer.num_batches_tracked == 0
    x = rng.standard_normal((8, 3))
    layer.forward(x)  # momentum=None: the first batch's statistics exactly
    np.testing.assert_allclose(layer.running_mean, x.mean(0), atol=1e-15)
