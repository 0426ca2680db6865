"""bnlib.nn.BatchRenorm1d/2d and BatchRenormFunction: against a float64 reference
written from the paper's equations (Ioffe, 2017, Algorithm 1), equal to torch's
BatchNorm with r_max = 1 and d_max = 0, gradcheck and gradgradcheck, state_dict,
errors with no state changed, float32, torch.func."""

from __future__ import annotations

import math

import pytest
import torch
from checks import GRADS, assert_all_close, named
from torch.func import grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from bnlib import nn as bnn

D = torch.float64
KINDS = {  # (ours, torch's, input shape)
    "1d-2D": (bnn.BatchRenorm1d, torch.nn.BatchNorm1d, (8, 4)),
    "1d-3D": (bnn.BatchRenorm1d, torch.nn.BatchNorm1d, (6, 4, 5)),
    "2d": (bnn.BatchRenorm2d, torch.nn.BatchNorm2d, (4, 4, 3, 5)),
}


# --------------------------------------------------------------- reference (the paper)


def _per_channel(v, x):
    """(C,) as (1, C, 1, ...), to broadcast against x (N, C, *spatial)."""
    return v.reshape(1, -1, *[1] * (x.dim() - 2))


def renorm_reference(x, gamma, beta, running_mean, running_var, r_max, d_max, eps,
                     momentum):
    """One training step of Batch Renorm, Algorithm 1 of the paper, in float64.

    mu_B = (1/m) sum x_i,  sigma_B = sqrt(eps + (1/m) sum (x_i - mu_B)^2)
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    mu := mu + momentum * (mu_B - mu),  var := var + momentum * (m/(m-1) var_B - var)

    with sigma = sqrt(running_var + eps). Returns y, r, d and the new running mean and
    variance; autograd through y gives the paper's gradient.
    """
    values = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, m): channel c's values
    m = values.shape[1]
    mu_B = values.sum(1) / m
    var_B = ((values - mu_B[:, None]) ** 2).sum(1) / m  # biased
    sigma_B = torch.sqrt(eps + var_B)
    sigma = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_B / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_B - running_mean) / sigma, -d_max, d_max).detach()
    x_hat = (x - _per_channel(mu_B, x)) / _per_channel(sigma_B, x)
    y = _per_channel(gamma, x) * (x_hat * _per_channel(r, x) + _per_channel(d, x)) \
        + _per_channel(beta, x)
    new_mean = running_mean + momentum * (mu_B.detach() - running_mean)
    new_var = running_var + momentum * (var_B.detach() * m / (m - 1) - running_var)
    return y, r, d, new_mean, new_var


def inference_reference(x, gamma, beta, running_mean, running_var, eps):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with the running statistics."""
    return _per_channel(gamma, x) * (x - _per_channel(running_mean, x)) \
        / torch.sqrt(_per_channel(running_var, x) + eps) + _per_channel(beta, x)


def _batch(shape, mean, std, device, dtype=D):
    """A batch whose per-channel mean and (biased) std are exactly the given ones."""
    z = torch.randn(shape, dtype=D, device=device)
    dims = [0, *range(2, len(shape))]
    z = (z - z.mean(dims, keepdim=True)) / z.std(dims, correction=0, keepdim=True)
    mean = torch.tensor(mean, dtype=D, device=device)
    std = torch.tensor(std, dtype=D, device=device)
    return (z * _per_channel(std, z) + _per_channel(mean, z)).to(dtype)


def _grads(module, x, dy):
    """y and the gradients of x, weight, bias after y.backward(dy)."""
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _reference_grads(x, dy, gamma, beta, rm, rv, r_max, d_max, eps, momentum):
    x = x.detach().clone().requires_grad_()
    gamma = gamma.detach().clone().requires_grad_()
    beta = beta.detach().clone().requires_grad_()
    y, r, d, rm, rv = renorm_reference(x, gamma, beta, rm, rv, r_max, d_max, eps,
                                       momentum)
    y.backward(dy)
    return y.detach(), [x.grad, gamma.grad, beta.grad], r, d, rm, rv


# --------------------------------------------------------------- against the reference


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_float64(device, kind, affine, momentum):
    """Outputs, gradients (r, d stop-gradient) and running statistics over several
    steps, the first with r and d clipped in some channels and not in others; then
    eval."""
    cls, _, shape = KINDS[kind]
    r_max, d_max, eps = 1.5, 0.5, 1e-5
    m = cls(4, momentum=momentum, r_max=r_max, d_max=d_max, affine=affine,
            device=device, dtype=D)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    ones = torch.ones(4, dtype=D, device=device)
    gamma = m.weight.detach() if affine else ones
    beta = m.bias.detach() if affine else 0 * ones
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    # step 0: r = std / 1 clips for channels 0 (3 > 1.5) and 2 (0.3 < 1 / 1.5);
    # d = (mean - running_mean) / 1 clips for channel 1 (-2 < -0.5)
    batches = [_batch(shape, [0.0, 0.0, 0.0, 0.1], [3.0, 1.2, 0.3, 0.9], device)]
    batches += [torch.randn(shape, dtype=D, device=device) * 1.5 + 0.5
                for _ in range(3)]
    for step, x in enumerate(batches):
        dy = torch.randn(shape, dtype=D, device=device)
        factor = 1 / (step + 1) if momentum is None else momentum
        y_o, g_o = _grads(m, x, dy)
        y_r, g_r, r, d, rm, rv = _reference_grads(x, dy, gamma, beta, rm, rv, r_max,
                                                  d_max, eps, factor)
        if step == 0:
            assert (r == r_max).tolist() == [True, False, False, False]
            assert torch.isclose(r, 1 / torch.tensor(r_max, dtype=D)).tolist() == \
                [False, False, True, False]
            assert (d.abs() == d_max).tolist() == [False, True, False, False]
            assert d[3] > 0.05 and r[1] > 1.1 and r[3] < 0.95  # unclipped, not trivial
        torch.testing.assert_close(y_o, y_r, atol=1e-12, rtol=0)
        assert_all_close(g_o, g_r if affine else g_r[:1], GRADS[:len(g_o)],
                         atol=1e-12, rtol=0)
        torch.testing.assert_close(m.running_mean, rm, atol=1e-14, rtol=0)
        torch.testing.assert_close(m.running_var, rv, atol=1e-13, rtol=0)
        assert m.num_batches_tracked.item() == step + 1
    m.eval()
    x = batches[-1]
    torch.testing.assert_close(m(x), inference_reference(x, gamma, beta, rm, rv, eps),
                               atol=1e-12, rtol=0)
    assert m.num_batches_tracked.item() == len(batches)


def test_float32_matches_reference(device):
    m = bnn.BatchRenorm2d(4, momentum=0.2, r_max=1.5, d_max=0.5, device=device)
    with torch.no_grad():
        m.running_var.fill_(2.0)
    rm, rv = m.running_mean.double(), m.running_var.double()
    for _ in range(3):
        x = torch.randn(6, 4, 3, 3, device=device) * 2 + 1
        dy = torch.randn_like(x)
        y_o, g_o = _grads(m, x, dy)
        assert y_o.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_o)
        y_r, g_r, _, _, rm, rv = _reference_grads(
            x.double(), dy.double(), m.weight.double(), m.bias.double(), rm, rv, 1.5,
            0.5, 1e-5, 0.2)
        torch.testing.assert_close(y_o.double(), y_r, atol=1e-5, rtol=1e-5)
        assert_all_close([g.double() for g in g_o], g_r, GRADS[:len(g_o)],
                         atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(m.running_mean.double(), rm, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m.running_var.double(), rv, atol=1e-6, rtol=1e-6)


def test_reduced_precision_input_computed_in_float32():
    """bfloat16 input, float32 module (as under autocast): bfloat16 output, close to
    the float32 computation."""
    m16, m32 = bnn.BatchRenorm1d(4), bnn.BatchRenorm1d(4)
    x = (torch.randn(16, 4) * 2 + 1).to(torch.bfloat16)
    y16, y32 = m16(x), m32(x.float())
    assert y16.dtype == torch.bfloat16 and m16.running_mean.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(m16.running_var, m32.running_var, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- equal to BatchNorm


def _twins(kind, device, affine=True):
    """Ours with r_max = 1, d_max = 0 and torch's BatchNorm (momentum 0.01), the same
    non-trivial state."""
    cls, ref_cls, shape = KINDS[kind]
    ours = cls(shape[1], r_max=1.0, d_max=0.0, affine=affine, device=device, dtype=D)
    ref = ref_cls(shape[1], momentum=0.01, affine=affine, device=device, dtype=D)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    ref.load_state_dict(ours.state_dict())
    return ours, ref, shape


def _assert_same(ours, ref, x, dy, atol):
    y_o, g_o = _grads(ours, x, dy)
    y_r, g_r = _grads(ref, x, dy)
    torch.testing.assert_close(y_o, y_r, atol=atol, rtol=0)
    assert_all_close(g_o, g_r, GRADS[:len(g_o)], atol=atol, rtol=0)
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r)
    for key in sd_r:
        torch.testing.assert_close(sd_o[key], sd_r[key], atol=atol, rtol=0,
                                   msg=named(key))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_r_max_1_d_max_0_equals_batchnorm(device, kind, affine):
    ours, ref, shape = _twins(kind, device, affine)
    for step in range(3):
        x = torch.randn(shape, dtype=D, device=device) * (1 + step) + 3 * step
        _assert_same(ours, ref, x, torch.randn_like(x), atol=1e-12)
    ours.eval()
    ref.eval()
    _assert_same(ours, ref, x, torch.randn_like(x), atol=1e-12)


def test_changing_r_max_d_max_between_calls_takes_effect(device):
    """A warm-up schedule: BatchNorm at first, then the limits are relaxed."""
    ours, ref, shape = _twins("2d", device)
    with torch.no_grad():  # running statistics far from the batches'
        ours.running_var.fill_(9.0)
        ref.running_var.fill_(9.0)
    x = torch.randn(shape, dtype=D, device=device) + 2
    _assert_same(ours, ref, x, torch.randn_like(x), atol=1e-12)
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    ours.r_max, ours.d_max = 2.0, 0.25
    y = ours(x)
    y_r, r, d, *_ = renorm_reference(x, ours.weight, ours.bias, rm, rv, 2.0, 0.25,
                                     1e-5, 0.01)
    torch.testing.assert_close(y, y_r, atol=1e-12, rtol=0)
    assert (r == 0.5).all() and (d == 0.25).any()  # both took effect, and clip
    assert (y - ref(x)).abs().max() > 0.1  # no longer batch norm


# --------------------------------------------------------------- gradients


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 2)])
def test_gradcheck_and_gradgradcheck_float64(shape, affine):
    """r and d are inputs without gradient: the Function's Jacobian is that of
    gamma * (x_hat * r + d) + beta with r, d held fixed, first and second order."""
    x = torch.randn(shape, dtype=D, requires_grad=True)
    gamma = (torch.rand(3, dtype=D) + 0.5).requires_grad_() if affine else None
    beta = torch.randn(3, dtype=D, requires_grad=True) if affine else None
    r, d = torch.rand(3, dtype=D) + 0.5, torch.randn(3, dtype=D)
    inputs = (x, gamma, beta, r, d, 1e-5)

    def f(*args):
        return bnn.BatchRenormFunction.apply(*args)[0]

    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_module_double_backward_matches_reference():
    """A gradient penalty through the module: the second derivative with r and d
    constants, against autograd of the reference."""
    m = bnn.BatchRenorm1d(3, r_max=1.5, d_max=0.5, dtype=D)
    with torch.no_grad():
        m.running_var.fill_(4.0)
        m.weight.uniform_(0.5, 1.5)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(7, 3, dtype=D) + 1
    results = []
    for use_reference in (False, True):
        xi = x.clone().requires_grad_()
        gamma = m.weight if not use_reference else m.weight.detach().requires_grad_()
        if use_reference:
            y = renorm_reference(xi, gamma, m.bias, rm, rv, 1.5, 0.5, 1e-5, 0.01)[0]
        else:
            y = m(xi)
        (g,) = torch.autograd.grad((y ** 3).sum(), xi, create_graph=True)
        (g ** 2).sum().backward()
        results.append((xi.grad, gamma.grad))
        m.weight.grad = None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_backward_is_hand_written():
    m = bnn.BatchRenorm2d(3)
    y = m(torch.randn(4, 3, 2, 2, requires_grad=True))
    assert "BatchRenormFunction" in type(y.grad_fn).__name__
    leaves = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert leaves == ["AccumulateGrad"] * 3


def test_torch_func_grad_and_vmap():
    x = torch.randn(4, 6, 3, dtype=D)
    gamma, beta = torch.rand(3, dtype=D) + 0.5, torch.randn(3, dtype=D)
    r, d = torch.rand(3, dtype=D) + 0.5, torch.randn(3, dtype=D)

    def loss(x):
        return (bnn.BatchRenormFunction.apply(x, gamma, beta, r, d, 1e-5)[0] ** 3
                ).sum()

    per_sample = vmap(grad(loss))(x)  # four independent (6, 3) batches
    for i in range(4):
        xi = x[i].clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss(xi), xi)
        torch.testing.assert_close(per_sample[i], expected, atol=1e-12, rtol=0)


# --------------------------------------------------------------- module API


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_and_loading_both_ways(kind):
    cls, ref_cls, shape = KINDS[kind]
    ours, ref = cls(4, dtype=D), ref_cls(4, dtype=D)
    assert list(ours.state_dict()) == list(ref.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    ref(torch.randn(shape, dtype=D) + 1)
    with torch.no_grad():
        ref.weight.uniform_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours(torch.randn(shape, dtype=D))
    fresh = ref_cls(4, dtype=D)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert ours.num_batches_tracked.item() == 2


def test_constructor_defaults_repr_and_reset():
    m = bnn.BatchRenorm2d(3)
    assert (m.eps, m.momentum, m.r_max, m.d_max, m.affine) == (1e-5, 0.01, 3.0, 5.0,
                                                                True)
    assert m.track_running_stats and isinstance(m, _BatchNorm)
    assert m.extra_repr() == ("3, eps=1e-05, momentum=0.01, r_max=3.0, d_max=5.0, "
                              "affine=True")
    m.r_max = 2.0
    assert "r_max=2.0" in repr(m)
    with pytest.raises(TypeError):
        bnn.BatchRenorm2d(3, track_running_stats=False)  # always tracked
    assert bnn.BatchRenorm1d(3, affine=False).weight is None
    m(torch.randn(4, 3, 2, 2) + 5)
    m.reset_running_stats()
    assert m.num_batches_tracked.item() == 0 and m.running_mean.abs().max() == 0
    assert bnn.BatchRenorm2d is bnn.BatchRenorm2d  # re-exported by bnlib.nn


def test_dtype_and_device_factory_kwargs(device):
    m = bnn.BatchRenorm1d(3, device=device, dtype=D)
    for t in (m.weight, m.bias, m.running_mean, m.running_var):
        assert t.dtype == D and t.device.type == device
    assert m(torch.randn(5, 3, dtype=D, device=device)).device.type == device


# --------------------------------------------------------------- errors


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed call"


ERROR_CASES = [
    # (class, input shape, training, exception, message)
    (bnn.BatchRenorm2d, (4, 5, 6), True, ValueError, r"expected 4D input \(got 3D"),
    (bnn.BatchRenorm1d, (4, 5, 6, 7), True, ValueError,
     r"expected 2D or 3D input \(got 4D"),
    (bnn.BatchRenorm2d, (4, 6, 3, 3), True, RuntimeError,
     r"expected input with 5 channels.*got 6"),
    (bnn.BatchRenorm2d, (4, 6, 3, 3), False, RuntimeError,
     r"expected input with 5 channels.*got 6"),
    (bnn.BatchRenorm1d, (1, 5), True, ValueError,
     "Expected more than 1 value per channel when training"),
    (bnn.BatchRenorm2d, (1, 5, 1, 1), True, ValueError,
     "Expected more than 1 value per channel when training"),
]


@pytest.mark.parametrize(("cls", "shape", "training", "error", "match"), ERROR_CASES)
def test_errors_change_no_state(cls, shape, training, error, match):
    m = cls(5)
    m(torch.randn(4, 5, *([3, 3] if cls is bnn.BatchRenorm2d else [])))
    m.train(training)
    before = _state(m)
    with pytest.raises(error, match=match):
        m(torch.randn(shape))
    _assert_unchanged(m, before)


@pytest.mark.parametrize(("r_max", "d_max", "match"), [
    (0.5, 5.0, "r_max must be a number >= 1"), (-1, 5.0, "r_max"),
    (math.nan, 5.0, "r_max"), ("3", 5.0, "r_max"), (True, 5.0, "r_max"),
    (3.0, -0.1, "d_max must be a number >= 0"), (3.0, math.nan, "d_max"),
    (3.0, None, "d_max"),
])
def test_bad_r_max_d_max_rejected_at_construction_and_at_call(r_max, d_max, match):
    with pytest.raises(ValueError, match=match):
        bnn.BatchRenorm1d(3, r_max=r_max, d_max=d_max)
    m = bnn.BatchRenorm1d(3)
    m(torch.randn(4, 3))
    before = _state(m)
    m.r_max, m.d_max = r_max, d_max  # plain attributes: checked when used
    for training in (True, False):
        m.train(training)
        with pytest.raises(ValueError, match=match):
            m(torch.randn(4, 3))
        _assert_unchanged(m, before)
    m.r_max, m.d_max = 1.0, 0.0  # the limits themselves are fine
    m.train()(torch.randn(4, 3))
    assert m.num_batches_tracked.item() == 2


def test_warmup_schedule_runs_the_papers_relaxation():
    """warmup=(start, r_end, d_end): plain batch norm up to start (r = 1, d = 0, equal
    to BatchNorm), then r_max and d_max relaxed linearly, held after their ends."""
    m = bnn.BatchRenorm1d(3, r_max=3.0, d_max=5.0, warmup=(2, 6, 4))
    assert [m.limits(s) for s in (1, 2, 4, 5, 6, 9)] == [
        (1.0, 0.0), (1.0, 0.0), (2.0, 5.0), (2.5, 5.0), (3.0, 5.0), (3.0, 5.0)]
    assert bnn.BatchRenorm1d(3, warmup=(0, 4)).limits(2) == (2.0, 2.5)
    assert bnn.BatchRenorm1d(3, r_max=2.0, d_max=1.0).limits(1) == (2.0, 1.0)
    assert "warmup=(2, 6, 4)" in repr(m)
    ref = bnn.BatchNorm1d(3, momentum=0.01, dtype=D)
    ours = bnn.BatchRenorm1d(3, dtype=D, warmup=(2, 6, 4))
    with torch.no_grad():
        ours.running_mean.fill_(5.0)  # far from the batches: r, d would clip hard
        ref.running_mean.fill_(5.0)
    for step in range(1, 4):
        x = torch.randn(8, 3, dtype=D) * 3
        y, y_ref = ours(x), ref(x)
        if step <= 2:  # warm-up: batch norm exactly
            torch.testing.assert_close(y, y_ref, msg=named(f"step {step}"))
        else:  # relaxed: corrected toward the running statistics
            assert not torch.allclose(y, y_ref), f"step {step} still plain BN"
    for bad in ((3, 2), (-1, 4), (1, 2, 3, 4), (1.0, 2), "x"):
        with pytest.raises(ValueError, match="warmup must be"):
            bnn.BatchRenorm1d(3, warmup=bad)


def test_docstring_says_the_running_variance_is_unbiased_not_the_papers_sigma():
    from bnlib.nn import renorm as module  # the file's docstring, read by the API page
    assert "unbiased" in module.__doc__ and "sigma_B" in module.__doc__


@pytest.mark.parametrize("kind", list(KINDS))
def test_corrections_are_the_unclipped_r_and_d_a_training_call_uses(kind):
    # chapter 9 reads corrections() to plot how often the clip acts
    cls, _, shape = KINDS[kind]
    torch.manual_seed(0)
    m = cls(shape[1], dtype=D).train()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.2, 3)
    x = torch.randn(shape, dtype=D) * 3 + 1
    before = _state(m)
    r, d = m.corrections(x)
    _assert_unchanged(m, before)
    _, r_ref, d_ref, _, _ = renorm_reference(
        x, m.weight.detach(), m.bias.detach(), m.running_mean, m.running_var,
        math.inf, math.inf, m.eps, 0.1)
    assert_all_close([r, d], [r_ref, d_ref], ["r", "d"], rtol=1e-12, atol=1e-12)
    # clipped to limits(), they are what the forward uses: its output is the reference's
    y_ref = renorm_reference(x, m.weight.detach(), m.bias.detach(), m.running_mean,
                             m.running_var, *m.limits(), m.eps, 0.1)[0]
    assert_all_close([m(x)], [y_ref], ["y"], rtol=1e-12, atol=1e-12)
