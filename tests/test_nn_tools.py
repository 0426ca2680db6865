"""bnlib.nn with what users do to torch's batch norms: torch's own module inputs,
double backward (gradient penalty, MAML), torch.func, forward-mode AD, FX, quantization
fusion, torch.export, the custom operator's registrations, and errors in torch's order.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from checks import assert_all_close, named
from torch.func import functional_call, grad, jacfwd, jacrev, vmap
from torch.testing._internal.common_modules import module_db

from bnlib import nn as bnn

D = torch.float64
OURS = {torch.nn.BatchNorm1d: bnn.BatchNorm1d, torch.nn.BatchNorm2d: bnn.BatchNorm2d,
        torch.nn.BatchNorm3d: bnn.BatchNorm3d}


def _twins(ref_cls, *args, **kwargs):
    """torch's module and ours, the same state (non-trivial parameters)."""
    torch.manual_seed(0)
    ref = ref_cls(*args, **kwargs, dtype=D)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours = OURS[ref_cls](*args, **kwargs, dtype=D)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# ------------------------------------------------- torch's own inputs (module_db)

MODULE_INPUTS = [
    pytest.param(info.module_cls, training, mi,
                 id=f"{info.name}-{mi.desc or 'default'}-"
                 f"{'train' if training else 'eval'}")
    for info in module_db if info.module_cls in OURS
    for training in (True, False)
    for mi in info.module_inputs_func(info, device="cpu", dtype=D, requires_grad=True,
                                      training=training)
]


@pytest.mark.parametrize(("ref_cls", "training", "module_input"), MODULE_INPUTS)
def test_torch_module_db_inputs(ref_cls, training, module_input):
    """Each of torch's own test inputs for BatchNorm1d/2d/3d (what test_modules.py
    runs): same output, gradients and state as torch's module, a pickle round trip,
    and gradcheck/gradgradcheck with batched and forward-mode checks."""
    args, kwargs = module_input.constructor_input.args, \
        module_input.constructor_input.kwargs
    ours, ref = _twins(ref_cls, *args, **kwargs)
    ours.train(training)
    ref.train(training)
    (x,) = module_input.forward_input.args
    for m in (ours, ref):
        x_m = x.detach().clone().requires_grad_()
        y = m(x_m)
        y.backward(torch.ones_like(y) if y.numel() else y.detach())
        m.out, m.dx = y.detach(), x_m.grad
    torch.testing.assert_close(ours.out, ref.out, atol=1e-12, rtol=0)
    if ref.dx is not None:
        torch.testing.assert_close(ours.dx, ref.dx, atol=1e-12, rtol=0)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=named(name))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-12,
                                   rtol=1e-13, msg=named(key))

    buffer = io.BytesIO()  # test_modules' test_pickle: a saved module loads and agrees
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(ours)
    if not training and x.numel():
        torch.testing.assert_close(loaded(x.detach()), ours(x.detach()))

    if x.numel() == 0:
        return
    ours.train(training)
    params = tuple(ours.parameters())

    def f(x, *ps):  # state is updated on every call: use a copy that forgets it
        m = copy.deepcopy(ours)
        return functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps,
                                           strict=True)), (x,))

    inputs = (x.detach().requires_grad_(), *params)
    # fast_mode checks the Jacobian along random directions (each a full check of
    # one vector-Jacobian product), keeping 46 cases within seconds
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True, check_batched_grad=True,
                                    check_forward_ad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True,
                                        check_batched_grad=True,
                                        check_fwd_over_rev=True)


# ------------------------------------------------------------ double backward


def _penalty_grads(bn_cls):
    """A WGAN-GP gradient penalty, (|d out / d x| - 1)^2, through a critic with batch
    norm in training mode: the parameters' gradients need the second derivative."""
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(5, 8), bn_cls(8), torch.nn.Tanh(),
                                 torch.nn.Linear(8, 1)).double()
    x = torch.randn(16, 5, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    penalty = ((g.norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    grads = {n: p.grad for n, p in critic.named_parameters()}
    return grads, critic[1].running_mean


def test_gradient_penalty_equals_torch():
    ours, rm_ours = _penalty_grads(bnn.BatchNorm1d)
    ref, rm_ref = _penalty_grads(torch.nn.BatchNorm1d)
    # a real second-order signal reaches layer 1
    assert ours["0.weight"].abs().max() > 1e-3
    assert_all_close(ours.values(), ref.values(), [f"grad of {n}" for n in ref],
                     atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rm_ours, rm_ref, atol=1e-14, rtol=0)


def _maml_meta_grads(bn_cls):
    """One MAML step: adapt the weights by a gradient step (create_graph=True), then
    differentiate the loss of the adapted model with respect to the original ones."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), bn_cls(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3)).double()
    x_s, y_s = torch.randn(10, 4, dtype=D), torch.randint(0, 3, (10,))
    x_q, y_q = torch.randn(10, 4, dtype=D), torch.randint(0, 3, (10,))
    params = dict(model.named_parameters())
    ce = torch.nn.functional.cross_entropy
    loss = ce(functional_call(model, params, (x_s,)), y_s)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    fast = {n: p - 0.4 * g for (n, p), g in zip(params.items(), grads, strict=True)}
    meta = ce(functional_call(model, fast, (x_q,)), y_q)
    return torch.autograd.grad(meta, list(params.values()))


def test_maml_step_equals_torch():
    for a, b in zip(_maml_meta_grads(bnn.BatchNorm1d),
                    _maml_meta_grads(torch.nn.BatchNorm1d), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_hessian_vector_product_equals_torch(training):
    ours, ref = _twins(torch.nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 3, 3, dtype=D)
    v = torch.randn_like(x)
    hvps = []
    for m in (ours, ref):
        m.train(training)
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((m(xx) ** 3).sum(), xx, create_graph=True)
        hvps.append(torch.autograd.grad(g, xx, v)[0])
    torch.testing.assert_close(hvps[0], hvps[1], atol=1e-11, rtol=1e-10)


# ------------------------------------------------------------------ torch.func


def _loss(f):
    return lambda x, w, b: (f(x, None, None, w, b, True) ** 2 * torch.arange(
        x.shape[1], dtype=D)).sum()


def _autograd_batch_norm(x, _running_mean, _running_var, w, b, training):
    """Training-mode batch norm from tensor operations, for autograd to differentiate:
    the reference where torch's own kernel is not one (see the Hessian test)."""
    assert training
    var, mean = torch.var_mean(x, 0, correction=0)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def _xwb():
    torch.manual_seed(0)
    return (torch.randn(6, 4, dtype=D), torch.rand(4, dtype=D) + 0.5,
            torch.rand(4, dtype=D))


@pytest.mark.parametrize("transform", [grad, jacrev, jacfwd])
def test_torch_func_transforms_equal_torch(transform):
    x, w, b = _xwb()
    for argnums in (0, (0, 1, 2)):
        ours = transform(_loss(bnn.batch_norm), argnums=argnums)(x, w, b)
        ref = transform(_loss(torch.nn.functional.batch_norm), argnums=argnums)(x, w, b)
        torch.testing.assert_close(ours, ref, atol=1e-11, rtol=1e-10)


def test_torch_func_hessian_exact_and_symmetric():
    """torch.func.hessian (jacfwd of jacrev) over x, gamma and beta equals the Hessian
    of batch norm written as tensor operations, and is symmetric. (torch 2.13's own
    kernel fails this: its d(dgamma)/dx block differs from the transpose of its
    d(dx)/dgamma block, 74.3 against 0.0019 in sum of absolute values here.)"""
    x, w, b = _xwb()
    ours = torch.func.hessian(_loss(bnn.batch_norm), argnums=(0, 1, 2))(x, w, b)
    ref = torch.func.hessian(_loss(_autograd_batch_norm), argnums=(0, 1, 2))(x, w, b)
    torch.testing.assert_close(ours, ref, atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(ours[1][0], ours[0][1].permute(2, 0, 1), atol=1e-11,
                               rtol=1e-10)


def test_vmap_over_batches_params_and_per_sample_grads():
    torch.manual_seed(0)
    xs = torch.randn(5, 6, 4, dtype=D)
    ws, bs = torch.rand(5, 4, dtype=D) + 0.5, torch.rand(5, 4, dtype=D)
    x, w, b = xs[0], ws[0], bs[0]
    ours_f, ref_f = _loss(bnn.batch_norm), _loss(torch.nn.functional.batch_norm)
    for in_dims in [(0, None, None), (None, 0, 0), (0, 0, 0), (None, 0, None)]:
        args = [t if d is None else ts for d, t, ts in
                zip(in_dims, (x, w, b), (xs, ws, bs), strict=True)]
        ours = vmap(grad(ours_f, argnums=(0, 1, 2)), in_dims=in_dims)(*args)
        ref = vmap(grad(ref_f, argnums=(0, 1, 2)), in_dims=in_dims)(*args)
        torch.testing.assert_close(ours, ref, atol=1e-11, rtol=1e-10)


def test_model_ensembling_and_per_sample_gradients_in_eval_mode():
    """torch.func's two recipes: vmap over stacked weights of several models (the same
    data), and per-sample gradients (eval mode, the statistics are constants)."""
    torch.manual_seed(0)

    def make(lib):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 5), lib.BatchNorm1d(5),
                                   torch.nn.Linear(5, 2)).double()

    x, target = torch.randn(7, 3, dtype=D), torch.randn(7, 2, dtype=D)
    results = []
    for lib in (bnn, torch.nn):
        models = [make(lib) for _ in range(3)]
        for k, m in enumerate(models):
            with torch.no_grad():
                m[1].weight.add_(k)
        params, buffers = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        out = vmap(lambda p, b, base=base: functional_call(base, (p, b), (x,)))(
            params, buffers)
        model = models[0].eval()
        p0 = {k: v.detach() for k, v in model.named_parameters()}
        b0 = dict(model.named_buffers())

        def sample_loss(p, xi, ti, model=model, b0=b0):
            return ((functional_call(model, (p, b0), (xi[None],)) - ti) ** 2).sum()

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(p0, x, target)
        results.append((out, per_sample))
    torch.testing.assert_close(results[0], results[1], atol=1e-12, rtol=1e-10)


def test_replace_all_batch_norm_modules_works_on_ours():
    m = torch.nn.Sequential(bnn.BatchNorm1d(3))
    torch.func.replace_all_batch_norm_modules_(m)
    assert m[0].running_mean is None and not m[0].track_running_stats
    y = vmap(m)(torch.randn(4, 5, 3))
    assert y.shape == (4, 5, 3)


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_equals_torch(training):
    ours, ref = _twins(torch.nn.BatchNorm2d, 3)
    x, t = torch.randn(4, 3, 2, 2, dtype=D), torch.randn(4, 3, 2, 2, dtype=D)
    tangents = []
    for m in (ours, ref):
        m.train(training)
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------- FX and fusion


def _convnet(lib):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), lib.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5), lib.BatchNorm1d(5))


def test_fx_symbolic_trace_keeps_the_module_a_leaf():
    model = _convnet(bnn)
    gm = torch.fx.symbolic_trace(model)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op != "placeholder"]
    assert ("call_module", "1") in calls and ("call_module", "5") in calls
    assert all(op in ("call_module", "output") for op, _ in calls)
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(gm(x), copy.deepcopy(model)(x))
    gm.eval()  # train/eval still switches the traced batch norm, as for torch's
    model.eval()
    torch.testing.assert_close(gm(x), model(x))


def test_fuse_modules_conv_bn_relu_and_linear_bn():
    ours, ref = _convnet(bnn).eval(), _convnet(torch.nn).eval()
    for m in (ours, ref):
        m(torch.randn(2, 3, 6, 6))
    ours.load_state_dict(ref.state_dict())
    pattern = [["0", "1", "2"], ["4", "5"]]
    f_ours = torch.ao.quantization.fuse_modules(ours, pattern)
    f_ref = torch.ao.quantization.fuse_modules(ref, pattern)
    assert [type(m) for m in f_ours] == [type(m) for m in f_ref]
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(f_ours(x), ref(x), atol=1e-5, rtol=1e-5)
    qat = torch.ao.quantization.fuse_modules_qat(_convnet(bnn).train(), pattern)
    assert type(qat[0]).__name__ == "ConvBnReLU2d"
    assert qat(x).shape == (4, 5)


# ------------------------------------------------------------------- export


@pytest.mark.parametrize("training", [True, False])
def test_torch_export_one_op_outputs_gradients_and_state(training):
    model = _convnet(bnn).double().train(training)
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, 6, 6, dtype=D)
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("bnlib.batch_norm.default") == 2
    assert not any("addcmul" in t or "var_mean" in t for t in targets)
    exported = program.module()
    for m in (exported, twin):
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y ** 2).sum().backward()
        m.result = (y.detach(), xx.grad)
    torch.testing.assert_close(exported.result, twin.result, atol=1e-12, rtol=1e-10)
    for (name, b), b_twin in zip(exported.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, b_twin, atol=1e-14, rtol=0, msg=named(name))


def test_torch_compile_traces_tensor_ops_that_inductor_can_fuse():
    """Under torch.compile the graph holds the equations as tensor operations (Inductor
    fuses them), not the opaque operator; results equal eager."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes])
        return gm.forward

    torch._dynamo.reset()
    ours, ref = _twins(torch.nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 5, 5, dtype=D, requires_grad=True)
    y = torch.compile(ours, backend=backend, fullgraph=True)(x)
    assert graphs and not any("bnlib" in t for t in graphs[0])
    torch.testing.assert_close(y, ref(x), atol=1e-12, rtol=0)
    (g_c,) = torch.autograd.grad((y ** 3).sum(), x)
    (g_r,) = torch.autograd.grad((ref(x) ** 3).sum(), x)
    assert g_r.abs().max() > 0.1
    torch.testing.assert_close(g_c, g_r, atol=1e-10, rtol=1e-10)


def test_custom_op_registrations_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and
    AOT dispatch, for the forward and the backward operator."""
    x = torch.randn(4, 3, 5, dtype=D, requires_grad=True)
    w = torch.rand(3, dtype=D, requires_grad=True)
    b = torch.rand(3, dtype=D, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    op, op_bwd = torch.ops.bnlib.batch_norm.default, \
        torch.ops.bnlib.batch_norm_backward.default
    for args in [(x, w, b, None, None, True, 1e-5), (x, w, b, rm, rv, False, 1e-5),
                 (x, None, None, None, None, True, 1e-3)]:
        torch.library.opcheck(op, args)
    dy, mean, inv_std = torch.randn_like(x), torch.zeros(3, dtype=D), torch.ones(3,
                                                                                 dtype=D)
    torch.library.opcheck(op_bwd, (dy, x.detach(), w.detach(), mean, inv_std, True,
                                   True, True, False))


# ------------------------------------------------------------------- errors

BAD_CALLS = {
    # name: (constructor kwargs, train, input shape, input dtype)
    "3D into BatchNorm2d": (dict(), True, (4, 3, 5), D),
    "one value per channel": (dict(), True, (1, 3, 1, 1), D),
    "one value and negative eps": (dict(eps=-1.0), True, (1, 3, 1, 1), D),
    "eps 0 in training": (dict(eps=0.0), True, (4, 3, 2, 2), D),
    "negative eps and wrong channels": (dict(eps=-1.0), True, (4, 5, 2, 2), D),
    "negative eps in eval": (dict(eps=-1e-5), False, (4, 3, 2, 2), D),
    "negative eps, int input": (dict(eps=-1.0), True, (4, 3, 2, 2), torch.int64),
    "wrong channels": (dict(), True, (4, 5, 2, 2), D),
    "wrong channels, int input": (dict(), True, (4, 5, 2, 2), torch.int64),
    "int input": (dict(), True, (4, 3, 2, 2), torch.int64),
    "complex input": (dict(), False, (4, 3, 2, 2), torch.complex128),
    "float32 into float64": (dict(), True, (4, 3, 2, 2), torch.float32),
    "half into float64": (dict(), False, (4, 3, 2, 2), torch.float16),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_errors_in_torchs_order_and_types_with_no_state_change(case):
    """The exception torch raises first is the one we raise (same type), and our
    failed call leaves every buffer as it was (torch's bumps num_batches_tracked)."""
    kwargs, train, shape, dtype = BAD_CALLS[case]
    ours, ref = _twins(torch.nn.BatchNorm2d, 3, **kwargs)
    ours.train(train)
    ref.train(train)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.ones(shape).to(dtype)
    with pytest.raises(Exception) as torch_error:
        ref(x)
    with pytest.raises(type(torch_error.value)) as our_error:
        ours(x)
    assert type(our_error.value) is type(torch_error.value)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed call"


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(("shape", "dtype"), [((0, 3, 2, 2), D),
                                              ((0, 3, 2, 2), torch.float32),
                                              ((0, 5, 2, 2), D),
                                              ((0, 3, 2, 2), torch.float16)])
def test_empty_batches_return_what_torch_returns(train, shape, dtype):
    """torch returns an empty batch unchecked (any dtype, any channel count)."""
    ours, ref = _twins(torch.nn.BatchNorm2d, 3)
    ours.train(train)
    ref.train(train)
    x = torch.randn(shape).to(dtype)
    y_ours, y_ref = ours(x), ref(x)
    assert (y_ours.shape, y_ours.dtype) == (y_ref.shape, y_ref.dtype)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_error_messages_name_the_problem_and_the_expected_value():
    m = bnn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match=r"expected input with 3 channels, shape "
                       r"\(N, 3, \.\.\.\), got 5"):
        m(torch.randn(4, 5, 2, 2))
    with pytest.raises(NotImplementedError, match="floating-point input.*x.float()"):
        m(torch.ones(4, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="mixed dtype.*module.to"):
        m(torch.randn(4, 3, 2, 2, dtype=D))
    with pytest.raises(ValueError, match="eps must be non-negative, got -1"):
        bnn.BatchNorm2d(3, eps=-1.0).eval()(torch.randn(4, 3, 2, 2))
    assert math.isfinite(bnn.BatchNorm2d(3, eps=0.0).eval()(torch.ones(2, 3, 1, 1))
                         .sum().item())


def test_vmap_training_with_unbatched_running_stats_raises_and_changes_nothing():
    """As torch does, vmap refuses to update shared running statistics from a batched
    input in place; ours says how to fix it, and changes no state."""
    m = bnn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        vmap(m)(torch.randn(4, 5, 3))
    assert m.num_batches_tracked.item() == 0 and torch.equal(m.running_mean,
                                                              torch.zeros(3))
    with pytest.raises(RuntimeError):
        vmap(torch.nn.BatchNorm1d(3))(torch.randn(4, 5, 3))


def test_vmap_ensemble_in_training_updates_each_models_statistics():
    """Model ensembling in training mode: stacked parameters and buffers, one batch per
    model; each model's output and running statistics as if run alone."""
    torch.manual_seed(0)
    models = [bnn.BatchNorm1d(3, dtype=D) for _ in range(4)]
    xs = torch.randn(4, 6, 3, dtype=D) * 2 + 1
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    ys = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xs)
    for k, (m, x) in enumerate(zip(models, xs, strict=True)):
        torch.testing.assert_close(ys[k], m(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(buffers["running_mean"][k], m.running_mean,
                                   atol=1e-14, rtol=0)
        torch.testing.assert_close(buffers["running_var"][k], m.running_var,
                                   atol=1e-14, rtol=0)


# ------------------------------------------------- what practitioners hit at real sizes
# Inputs over 512 KiB take the kernels' large-input paths (row-tiled affine, chunked
# sums), which the small inputs above never reach.


@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (9, 64, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_output_takes_an_inplace_op_with_autograd_on(shape, dtype):
    """Frozen-BN fine-tuning and saliency maps: eval mode, gradients on, then
    ReLU(inplace=True) on BN's output (every torchvision CNN). The gradient equals
    torch's; the output is not a view (autograd forbids in-place ops on those)."""
    assert math.prod(shape) * torch.finfo(dtype).bits // 8 > 512 * 1024
    ours, ref = _twins(torch.nn.BatchNorm2d, shape[1])
    x0 = torch.randn(shape, dtype=D).to(dtype)
    grads = []
    for m in (ours, ref):
        m.to(dtype).eval()
        x = x0.clone().requires_grad_()
        y = m(x)
        assert y._base is None, f"{type(m).__module__}: BN's output is a view"
        torch.nn.functional.relu(y, inplace=True).square().sum().backward()
        grads.append((y.detach(), x.grad, m.weight.grad))
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == D else {}
    assert_all_close(grads[0], grads[1], ["y", "grad of x", "grad of weight"], **tol)


# Each of the affine map's layouts (see bnlib.nn._kernels._tile_shape), by the input
# that takes it: the whole (C, *spatial) plane, (C, 1, k) rows, broadcast.
_LAYOUTS = {(8, 128, 8, 8): (128, 8, 8), (16, 256, 14, 14): (256, 14, 14),
            (1, 32, 112, 112): (32, 1, 128), (1, 8, 32771): None,  # 32771 is prime
            (4, 16, 7, 7): None, (60, 100): None, (64, 100, 50): (100, 50),
            (4, 8, 6, 10, 12): (8, 6, 10, 12), (1, 48, 8, 64, 96): (48, 1, 128)}


@pytest.mark.parametrize("shape", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_layouts_give_the_same_bits(shape, dtype):
    """However _affine lays out the per-channel vectors (a tile made by multiplying
    by one, or broadcasting), y = x * scale + shift has the bits of the plain
    broadcast addcmul, in a new tensor or in place."""
    from bnlib.nn._kernels import _affine, _bcast, _tile_shape

    layout = _tile_shape(torch.empty(shape, dtype=torch.float32))
    assert (layout and layout[0]) == _LAYOUTS[shape]
    x = (torch.randn(shape, dtype=D) * 3 + 1).to(dtype)
    scale, shift = torch.randn(2, shape[1], dtype=dtype)
    reference = torch.addcmul(_bcast(shift, x), x, _bcast(scale, x))
    assert torch.equal(_affine(x, scale, shift), reference)
    inplace = x.clone()
    assert _affine(inplace, scale, shift, inplace=True) is inplace
    assert torch.equal(inplace, reference)


def test_tile_made_under_inference_mode_serves_autograd_later():
    """The cached tile of ones is made outside inference mode even when the first call
    that needs it runs inside it (serving code), so a later training or gradient call
    with the same shape can use it (an inference tensor would raise there)."""
    from bnlib.nn._kernels import _ones

    _ones.cache_clear()
    shape = (8, 128, 8, 8)  # takes the whole-plane tile
    m, ref = _twins(torch.nn.BatchNorm2d, 128)
    x = torch.randn(shape, dtype=D)
    for module in (m, ref):
        module.double().eval()
    with torch.inference_mode():
        y_inf = m(x)
    assert not _ones(shape[1:], D).is_inference()
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.square().sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    assert torch.equal(y.detach(), y_inf)
    assert_all_close([y.detach(), xg.grad], [ref(x).detach(), xr.grad], ["y", "grad"],
                     atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX2",
                    reason="torch's kernel is compared on the pinned AVX2 path only")
@pytest.mark.parametrize("shape", list(_LAYOUTS) + [(3, 5, 4, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_output_is_bit_identical_to_torch(shape, dtype):
    """In eval mode bnlib computes y = x * scale + (beta - mu * scale) as torch's CPU
    kernel does, so the output has the very same bits, with and without gradients,
    with and without the affine parameters, and for channels_last input."""
    c = shape[1]
    x = (torch.randn(shape, dtype=D) * 3 + 1).to(dtype)
    mean, weight, bias = torch.randn(3, c, dtype=D).to(dtype)
    var = (torch.rand(c, dtype=D) + 0.1).to(dtype)
    inputs = [x] + ([x.contiguous(memory_format=torch.channels_last)]
                    if x.dim() == 4 else [])
    for xi in inputs:
        for w, b in ((weight, bias), (None, None)):
            expected = torch.nn.functional.batch_norm(xi, mean, var, w, b, eps=1e-5)
            with torch.no_grad():
                y = bnn.batch_norm(xi, mean, var, w, b, eps=1e-5)
            y_grad = bnn.batch_norm(xi.clone().requires_grad_(), mean, var, w, b,
                                    eps=1e-5)
            assert torch.equal(y, expected), f"{xi.stride()=}, {w is not None=}"
            assert torch.equal(y_grad.detach(), expected)


@pytest.mark.parametrize("training", [False, True])
def test_model_ensembling_recipe_with_inplace_relu_at_real_size(training):
    """torch.func's ensembling recipe as written (stack_module_state, functional_call
    under vmap, parameters left requiring grad) on Conv -> BN -> ReLU(inplace=True),
    in eval and in training without running statistics: outputs and the gradients of
    the stacked parameters equal torch's BN's."""
    def make(lib):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), lib.BatchNorm2d(
            64, track_running_stats=not training), torch.nn.ReLU(inplace=True)).double()

    x = torch.randn(4, 3, 34, 34, dtype=D)  # each model's BN input: 4x64x32x32, 2 MiB
    results = []
    for lib in (bnn, torch.nn):
        torch.manual_seed(0)
        models = [make(lib).train(training) for _ in range(3)]
        params, buffers = torch.func.stack_module_state(models)
        assert all(p.requires_grad for p in params.values())
        base = copy.deepcopy(models[0]).to("meta")
        out = vmap(lambda p, b, base=base: functional_call(base, (p, b), (x,)),
                   in_dims=(0, 0))(params, buffers)
        out.square().sum().backward()
        results.append([out.detach()] + [params[k].grad for k in sorted(params)])
    names = ["output"] + [f"grad of {k}" for k in sorted(params)]
    assert_all_close(results[0], results[1], names, atol=1e-10, rtol=1e-10)


def test_forward_grad_on_running_stats_raises_like_torch():
    """PyTorch's test_batchnorm_raises_error_if_running_var_or_running_mean_have_
    forward_grad: the running statistics are not differentiable inputs."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    msg = "batch_norm is not differentiable wrt running_mean and running_var"
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = [torch.rand_like(a) for a in args]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) if i in dual_indices else a
                     for i, (a, t) in enumerate(zip(args, tangents, strict=True))]
            if 0 in dual_indices and (1 in dual_indices or 2 in dual_indices):
                with pytest.raises(RuntimeError, match=msg):
                    bnn.batch_norm(*duals, training=False, momentum=-1.2)
            else:
                bnn.batch_norm(*duals, training=False, momentum=-1.2)


def test_bf16_autocast_training_is_as_precise_as_torch():
    """bf16 autocast, (N, C) features: the per-channel sums stay in float32. They ran
    through torch.linalg.vecdot, which autocast runs in bfloat16 (0.27% from float64
    instead of torch's 0.16%). A float32 input under autocast gives the float32 result,
    and a bfloat16 input is as close to float64 as torch's."""
    x = torch.randn(512, 512, dtype=D) * 3 + 1  # 1 MiB in float32
    dy = torch.randn(512, 512, dtype=D)
    exact = torch.nn.BatchNorm1d(512, dtype=D)
    xr = x.to(torch.bfloat16).to(D).requires_grad_()
    exact(xr).backward(dy.to(torch.bfloat16).to(D))
    errors = {}
    for lib in (bnn, torch.nn):
        m = lib.BatchNorm1d(512)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y32 = m(x.float())
        torch.testing.assert_close(y32, lib.BatchNorm1d(512)(x.float()), atol=1e-6,
                                   rtol=1e-6, msg=named(f"{lib.__name__}: float32 in"))
        xb = x.to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xb)
        y.backward(dy.to(torch.bfloat16))
        errors[lib.__name__] = [((a.to(D) - b).norm() / b.norm()).item() for a, b in
                                ((y, exact(xr)), (xb.grad, xr.grad))]
    ours, ref = errors["bnlib.nn"], errors["torch.nn"]
    assert all(o <= 1.02 * r for o, r in zip(ours, ref, strict=True)), errors
