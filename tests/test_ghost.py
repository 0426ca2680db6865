"""bnlib.nn.GhostBatchNorm1d/2d: against a float64 reference written from the
paper's equations (Hoffer et al., 2017: batch norm of each ghost batch, running
statistics from the ghost batches' mean statistics), equal to torch's BatchNorm when
there is one ghost batch, gradcheck and gradgradcheck, state_dict, errors with no state
changed, float32."""

from __future__ import annotations

import pytest
import torch
from checks import GRADS, assert_all_close, named
from torch.nn.modules.batchnorm import _BatchNorm

from bnlib import nn as bnn

D = torch.float64
KINDS = {  # (ours, torch's, input shape, virtual_batch_size): uneven ghost batches
    "1d-2D": (bnn.GhostBatchNorm1d, torch.nn.BatchNorm1d, (10, 4), 4),  # 4, 4, 2
    "1d-3D": (bnn.GhostBatchNorm1d, torch.nn.BatchNorm1d, (7, 4, 3), 3),  # 3, 3, 1
    "2d": (bnn.GhostBatchNorm2d, torch.nn.BatchNorm2d, (5, 4, 3, 2), 2),  # 2, 2, 1
}


# --------------------------------------------------------------- reference (the paper)


def _per_channel(v, x):
    """(C,) as (1, C, 1, ...), to broadcast against x (N, C, *spatial)."""
    return v.reshape(1, -1, *[1] * (x.dim() - 2))


def batch_norm_reference(x, gamma, beta, eps):
    """y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta over one batch; also mu_B and
    the unbiased variance m / (m - 1) * var_B."""
    values = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, m)
    m = values.shape[1]
    mu_B = values.sum(1) / m
    var_B = ((values - mu_B[:, None]) ** 2).sum(1) / m
    y = _per_channel(gamma, x) * (x - _per_channel(mu_B, x)) \
        / torch.sqrt(_per_channel(var_B, x) + eps) + _per_channel(beta, x)
    return y, mu_B, var_B * m / (m - 1)


def ghost_reference(x, gamma, beta, running_mean, running_var, virtual_batch_size,
                    eps, momentum):
    """Ghost BN, one training step: samples [0, B), [B, 2B), ... are ghost batches, each
    batch-normalized alone; running statistics move toward the ghost batches' mean
    mean and mean unbiased variance. Returns y and the new running statistics."""
    ys, means, variances = [], [], []
    for start in range(0, x.shape[0], virtual_batch_size):
        y_g, mu_g, var_g = batch_norm_reference(x[start:start + virtual_batch_size],
                                                gamma, beta, eps)
        ys.append(y_g)
        means.append(mu_g.detach())
        variances.append(var_g.detach())
    mean, var = sum(means) / len(means), sum(variances) / len(variances)
    return (torch.cat(ys), (1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * var)


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _reference_grads(x, dy, gamma, beta, rm, rv, virtual_batch_size, eps, momentum):
    x = x.detach().clone().requires_grad_()
    gamma = gamma.detach().clone().requires_grad_()
    beta = beta.detach().clone().requires_grad_()
    y, rm, rv = ghost_reference(x, gamma, beta, rm, rv, virtual_batch_size, eps,
                                momentum)
    y.backward(dy)
    return y.detach(), [x.grad, gamma.grad, beta.grad], rm, rv


# --------------------------------------------------------------- against the reference


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_float64(device, kind, momentum):
    cls, _, shape, vbs = KINDS[kind]
    m = cls(4, vbs, momentum=momentum, device=device, dtype=D)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    for step in range(3):
        # ghost batches with different statistics: sample i scaled and shifted by i
        i = torch.arange(shape[0], dtype=D, device=device)
        i = i.reshape(-1, *[1] * (len(shape) - 1))  # (N, 1, ...)
        x = torch.randn(shape, dtype=D, device=device) * (1 + i) + i
        dy = torch.randn(shape, dtype=D, device=device)
        factor = 1 / (step + 1) if momentum is None else momentum
        y_o, g_o = _grads(m, x, dy)
        y_r, g_r, rm, rv = _reference_grads(x, dy, m.weight, m.bias, rm, rv, vbs,
                                            1e-5, factor)
        torch.testing.assert_close(y_o, y_r, atol=1e-12, rtol=0)
        assert_all_close(g_o, g_r, GRADS[:len(g_o)], atol=1e-12, rtol=0)
        torch.testing.assert_close(m.running_mean, rm, atol=1e-13, rtol=0)
        torch.testing.assert_close(m.running_var, rv, atol=1e-12, rtol=0)
        assert m.num_batches_tracked.item() == step + 1
    whole, *_ = batch_norm_reference(x, m.weight.detach(), m.bias.detach(), 1e-5)
    assert (y_o - whole).abs().max() > 0.1  # the ghost batches made a difference
    m.eval()  # BatchNorm's eval: the running statistics
    y_eval = _per_channel(m.weight, x) * (x - _per_channel(rm, x)) \
        / torch.sqrt(_per_channel(rv, x) + 1e-5) + _per_channel(m.bias, x)
    torch.testing.assert_close(m(x), y_eval, atol=1e-12, rtol=0)


def test_float32_matches_reference(device):
    m = bnn.GhostBatchNorm2d(4, 3, device=device)
    rm, rv = m.running_mean.double(), m.running_var.double()
    for _ in range(2):
        x = torch.randn(8, 4, 3, 3, device=device) * 2 + 1
        dy = torch.randn_like(x)
        y_o, g_o = _grads(m, x, dy)
        assert y_o.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_o)
        y_r, g_r, rm, rv = _reference_grads(x.double(), dy.double(), m.weight.double(),
                                            m.bias.double(), rm, rv, 3, 1e-5, 0.1)
        torch.testing.assert_close(y_o.double(), y_r, atol=1e-5, rtol=1e-5)
        assert_all_close([g.double() for g in g_o], g_r, GRADS[:len(g_o)],
                         atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(m.running_mean.double(), rm, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m.running_var.double(), rv, atol=1e-6, rtol=1e-6)


def test_each_ghost_batch_is_normalized_alone():
    """Each ghost batch's output has mean 0 and variance 1 per channel (gamma = 1,
    beta = 0), and changing one ghost batch leaves the others' outputs unchanged."""
    m = bnn.GhostBatchNorm1d(3, 4, dtype=D)
    x = torch.randn(12, 3, dtype=D) * torch.arange(1, 13, dtype=D)[:, None]
    y = m(x)
    for y_g in y.split(4):
        torch.testing.assert_close(y_g.mean(0), torch.zeros(3, dtype=D), atol=1e-12,
                                   rtol=0)
        torch.testing.assert_close(y_g.var(0, correction=0), torch.ones(3, dtype=D),
                                   atol=1e-4, rtol=0)  # eps = 1e-5 in the denominator
    x2 = x.clone()
    x2[8:] = torch.randn(4, 3, dtype=D) * 100
    y2 = m(x2)
    assert torch.equal(y2[:8], y[:8]) and not torch.allclose(y2[8:], y[8:])


# --------------------------------------------------------------- equal to BatchNorm


CONFIGS = [dict(momentum=0.1, affine=True, track_running_stats=True),
           dict(momentum=None, affine=True, track_running_stats=True),
           dict(momentum=0.1, affine=False, track_running_stats=True),
           dict(momentum=0.1, affine=True, track_running_stats=False)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_one_ghost_batch_equals_batchnorm(device, kind, extra, config):
    """virtual_batch_size >= N: batch norm exactly, in training and then eval."""
    cls, ref_cls, shape, _ = KINDS[kind]
    ours = cls(4, shape[0] + extra, device=device, dtype=D, **config)
    ref = ref_cls(4, device=device, dtype=D, **config)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
        if ours.track_running_stats:
            ours.running_mean.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    for training in (True, True, True, False):
        ours.train(training)
        ref.train(training)
        x = torch.randn(shape, dtype=D, device=device) * 2 + 1
        dy = torch.randn_like(x)
        y_o, g_o = _grads(ours, x, dy)
        y_r, g_r = _grads(ref, x, dy)
        torch.testing.assert_close(y_o, y_r, atol=1e-12, rtol=0)
        assert_all_close(g_o, g_r, GRADS[:len(g_o)], atol=1e-12, rtol=0)
        sd_o, sd_r = ours.state_dict(), ref.state_dict()
        assert list(sd_o) == list(sd_r)
        for key in sd_r:
            torch.testing.assert_close(sd_o[key], sd_r[key], atol=1e-12, rtol=0,
                                       msg=named(key))


# --------------------------------------------------------------- gradients


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(8, 3), (5, 3, 2, 2)])
def test_gradcheck_and_gradgradcheck_float64(shape, affine):
    cls = bnn.GhostBatchNorm1d if len(shape) == 2 else bnn.GhostBatchNorm2d
    m = cls(3, 3, affine=affine, track_running_stats=False, dtype=D)  # 3, 3, 2 or 3, 2
    x = torch.randn(shape, dtype=D, requires_grad=True)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    names, params = zip(*m.named_parameters(), strict=True) if affine else ((), ())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


# --------------------------------------------------------------- module API


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_and_loading_both_ways(kind, track):
    cls, ref_cls, shape, vbs = KINDS[kind]
    ours = cls(4, vbs, track_running_stats=track, dtype=D)
    ref = ref_cls(4, track_running_stats=track, dtype=D)
    keys = ["weight", "bias"] + (["running_mean", "running_var",
                                  "num_batches_tracked"] if track else [])
    assert list(ours.state_dict()) == list(ref.state_dict()) == keys
    ref(torch.randn(shape, dtype=D) + 1)
    with torch.no_grad():
        ref.weight.uniform_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours(torch.randn(shape, dtype=D))
    fresh = ref_cls(4, track_running_stats=track, dtype=D)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_constructor_defaults_repr_and_reexport():
    m = bnn.GhostBatchNorm2d(3, 32)
    assert (m.virtual_batch_size, m.eps, m.momentum, m.affine,
            m.track_running_stats) == (32, 1e-5, 0.1, True, True)
    assert isinstance(m, _BatchNorm)
    assert m.extra_repr() == ("3, virtual_batch_size=32, eps=1e-05, momentum=0.1, "
                              "affine=True, track_running_stats=True")
    m.virtual_batch_size = 8
    assert "virtual_batch_size=8" in repr(m)
    assert bnn.GhostBatchNorm1d is bnn.GhostBatchNorm1d


def test_dtype_and_device_factory_kwargs(device):
    m = bnn.GhostBatchNorm1d(3, 2, device=device, dtype=D)
    for t in (m.weight, m.bias, m.running_mean, m.running_var):
        assert t.dtype == D and t.device.type == device
    assert m(torch.randn(6, 3, dtype=D, device=device)).device.type == device


# --------------------------------------------------------------- errors


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed call"


ERROR_CASES = [
    # (class, virtual_batch_size, input shape, training, exception, message)
    (bnn.GhostBatchNorm2d, 2, (4, 5, 6), True, ValueError,
     r"expected 4D input \(got 3D"),
    (bnn.GhostBatchNorm1d, 2, (4, 5, 6, 7), True, ValueError,
     r"expected 2D or 3D input \(got 4D"),
    (bnn.GhostBatchNorm2d, 2, (4, 6, 3, 3), True, RuntimeError,
     r"expected input with 5 channels.*got 6"),
    (bnn.GhostBatchNorm2d, 2, (4, 6, 3, 3), False, RuntimeError,
     r"expected input with 5 channels.*got 6"),
    (bnn.GhostBatchNorm1d, 4, (1, 5), True, ValueError,
     "Expected more than 1 value per channel when training"),
    (bnn.GhostBatchNorm1d, 4, (9, 5), True, ValueError,  # ghost batches 4, 4, 1
     r"virtual_batch_size=4: the last has 1 sample\(s\), 1 value per channel"),
    (bnn.GhostBatchNorm2d, 2, (5, 5, 1, 1), True, ValueError,  # 2, 2, 1
     r"input size \(5, 5, 1, 1\) split into ghost batches of virtual_batch_size=2"),
    (bnn.GhostBatchNorm1d, 1, (6, 5), True, ValueError,  # every one of 1 sample
     "Expected more than 1 value per channel in every ghost batch"),
]


@pytest.mark.parametrize(("cls", "vbs", "shape", "training", "error", "match"),
                         ERROR_CASES)
def test_errors_change_no_state(cls, vbs, shape, training, error, match):
    m = cls(5, 2)
    m(torch.randn(4, 5, *([3, 3] if cls is bnn.GhostBatchNorm2d else [])))
    m.virtual_batch_size = vbs
    m.train(training)
    before = _state(m)
    with pytest.raises(error, match=match):
        m(torch.randn(shape))
    _assert_unchanged(m, before)


def test_a_last_ghost_batch_of_one_sample_is_fine_with_spatial_values():
    m = bnn.GhostBatchNorm1d(5, 4)  # (9, 5, 3): ghost batches 4, 4, 1 (3 values)
    assert m(torch.randn(9, 5, 3)).shape == (9, 5, 3)


@pytest.mark.parametrize("vbs", [0, -2, 2.5, True, "4", None])
def test_bad_virtual_batch_size_rejected_at_construction_and_at_call(vbs):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        bnn.GhostBatchNorm1d(3, vbs)
    m = bnn.GhostBatchNorm1d(3, 2)
    m(torch.randn(4, 3))
    before = _state(m)
    m.virtual_batch_size = vbs
    for training in (True, False):
        m.train(training)
        with pytest.raises(ValueError, match="virtual_batch_size"):
            m(torch.randn(4, 3))
        _assert_unchanged(m, before)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_per_ghost_batch_is_the_reference_codes(momentum):
    """update_per_ghost_batch=True moves the running statistics once per ghost batch,
    in order, as a BatchNorm called on each ghost batch would; the default moves them
    once per call with the mean of the ghost batches' statistics."""
    x = torch.randn(10, 4, dtype=D) * 2 + 1  # ghost batches of 4, 4, 2
    ours = bnn.GhostBatchNorm1d(4, 4, momentum=momentum, dtype=D,
                                update_per_ghost_batch=True)
    ref = bnn.BatchNorm1d(4, momentum=momentum, dtype=D)
    y = ours(x)
    for x_g in x.split(4):
        ref(x_g)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name),
                                   msg=named(name))
    torch.testing.assert_close(y, bnn.GhostBatchNorm1d(4, 4, dtype=D)(x))
    once = bnn.GhostBatchNorm1d(4, 4, momentum=momentum, dtype=D)
    once(x)
    assert int(once.num_batches_tracked) == 1
    if momentum is not None:  # (None: both are the plain mean of the three)
        assert not torch.allclose(once.running_var, ours.running_var)
    assert "update_per_ghost_batch=True" in repr(ours)


def test_docstring_says_when_running_statistics_move():
    from bnlib.nn import ghost as module
    assert "once per call" in module.__doc__
    assert "once per ghost batch" in module.__doc__
