"""Teaching feedback for the course's hidden tests: what a wrong answer got wrong.

The hidden tests of the assignments call these functions. Each one runs a student's
function on an input chosen to expose one family of mistakes, compares the result with a
float64 reference (the book's equations; tested equal to :mod:`bnlib.numpy_bn`), and,
when they differ, says
*which* mistake explains the difference, with the numbers that show it: the student's
output is compared with the output of each known wrong formula, and ratios are measured
(a running variance 0.9375 of the expected one for N = 16 is the biased variance).

This file ships in the autograder only (``autograder_files`` in each master notebook);
students never see it. Every check raises ``AssertionError`` with the message the student
reads, so that Otter prints it under the failed test.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "call",
    "check_forward",
    "check_running",
    "check_eval",
    "check_backward",
    "numerical_grads",
    "ref_forward",
    "ref_backward",
    "ref_eval",
    "chan_merge",
]


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def call(fn, name: str, *args, **kwargs):
    """Call a student's function; turn 'not written yet' and crashes into a message."""
    if fn is None or not callable(fn):
        _fail(f"{name} is not defined: run the cell that defines it, keeping its name.")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        _fail(f"{name} is not written yet: it still raises NotImplementedError.")
    except AssertionError:
        raise
    except Exception as e:  # a crash in the student's code is a failed test, not ours
        _fail(f"{name} raised {type(e).__name__}: {e}")


def _close(a, b, rtol: float, atol: float) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))


def _arr(v, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(v, np.ndarray):
        _fail(f"{name} should be a NumPy array, got {type(v).__name__}.")
    if v.shape != shape:
        _fail(f"{name} has shape {v.shape}, expected {shape}.")
    if not np.all(np.isfinite(v)):
        _fail(f"{name} has NaN or inf entries (shape {v.shape}).")
    return v.astype(np.float64)


# ------------------------------------------------------------------ references, float64


def ref_forward(x, gamma, beta, eps=1e-5):
    """(y, x_hat, mu, var, inv_std) in float64, for x of shape (N, D).

    The book's equations in NumPy; tests/test_course.py checks these references equal
    bnlib.numpy_bn's (not imported here: bnlib imports torch, seconds per graded
    notebook).
    """
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)  # (D,)
    var = ((x - mu) ** 2).mean(axis=0)  # (D,) biased
    inv_std = 1.0 / np.sqrt(var + eps)  # (D,)
    x_hat = (x - mu) * inv_std  # (N, D)
    y = np.asarray(gamma, np.float64) * x_hat + np.asarray(beta, np.float64)
    return y, x_hat, mu, var, inv_std


def ref_backward(dy, x, gamma, eps=1e-5):
    """(dx, dgamma, dbeta) of batch norm in float64, the closed form."""
    dy = np.asarray(dy, dtype=np.float64)
    _, x_hat, _, _, inv_std = ref_forward(x, gamma, np.zeros(np.shape(x)[1]), eps)
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    g = np.asarray(gamma, np.float64)
    dx = g * inv_std * (dy - dy.mean(axis=0) - x_hat * (dy * x_hat).mean(axis=0))
    return dx, dgamma, dbeta


def ref_eval(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Eval-mode batch norm in float64."""
    x, g, b, rm, rv = (np.asarray(v, np.float64)
                       for v in (x, gamma, beta, running_mean, running_var))
    return g * (x - rm) / np.sqrt(rv + eps) + b


def _norm(x, axis, ddof=0, eps=1e-5, eps_inside=True):
    mu = x.mean(axis=axis, keepdims=True)
    var = x.var(axis=axis, ddof=ddof, keepdims=True)
    if eps_inside:
        return (x - mu) / np.sqrt(var + eps)
    return (x - mu) / (np.sqrt(var) + eps)


# ------------------------------------------------------------------ the training forward


def check_forward(y, x, gamma, beta, eps=1e-5, rtol=1e-8, atol=1e-10, name="y"):
    """Compare a training-mode output with the reference; name the mistake if wrong."""
    x64 = np.asarray(x, dtype=np.float64)
    g = np.asarray(gamma, np.float64)
    b = np.asarray(beta, np.float64)
    y = _arr(y, name, x.shape)
    ref = ref_forward(x64, g, b, eps)[0]
    if _close(y, ref, rtol, atol):
        return
    N, D = x.shape
    err = float(np.max(np.abs(y - ref)))
    x_hat = (y - b) / g  # the student's normalized values
    candidates = {
        "M-1": _norm(x64, 0, ddof=1, eps=eps),
        "eps-outside": _norm(x64, 0, eps=eps, eps_inside=False),
        "no-eps": _norm(x64, 0, eps=0.0),
        "axis1": _norm(x64, 1, eps=eps),
        "all": _norm(x64, None, eps=eps),
    }
    tol = dict(rtol=1e-6, atol=1e-8)
    if _close(x_hat, candidates["M-1"], **tol):
        j = int(np.argmax(x64.var(0)))  # the feature where eps matters least
        r = float(x_hat[:, j].std() / ref_forward(x64, g, b, eps)[1][:, j].std())
        _fail(
            f"{name} looks normalized with the unbiased variance (divided by M - 1): the "
            f"spread of your x_hat is {r:.4f} of the expected one, sqrt((M-1)/M) = "
            f"{np.sqrt((N - 1) / N):.4f} for M = {N}. Normalize with the biased variance "
            "(divide by M: np.var's default, ddof=0). The unbiased variance, "
            "var * M / (M - 1), is only what running_var stores."
        )
    if _close(x_hat, candidates["eps-outside"], **tol):
        v = float(x64.var(0).min())
        s_you = float(x_hat.std(0)[np.argmin(x64.var(0))])
        s_ref = float(np.sqrt(v / (v + eps)))
        _fail(
            f"{name} matches (x - mu) / (sqrt(var) + eps): eps is outside the square "
            "root. Batch norm adds eps to the variance, (x - mu) / sqrt(var + eps). The "
            f"two differ most for a feature with a small variance: here var = {v:.3g} "
            f"with eps = {eps:g}, and that feature's x_hat has std {s_you:.6g} instead "
            f"of {s_ref:.6g}."
        )
    if _close(x_hat, candidates["no-eps"], **tol):
        _fail(f"{name} is normalized by sqrt(var) without eps: use sqrt(var + eps), "
              "which also keeps a constant feature (var = 0) from dividing by zero.")
    if _close(x_hat, candidates["axis1"], **tol) or _close(
        x_hat.std(1), np.ones(N), rtol=1e-3, atol=1e-3
    ):
        m0 = float(np.abs(x_hat.mean(0)).max())
        _fail(
            f"{name} is normalized per row (statistics over axis 1, the {D} features of "
            f"each example) instead of per column (over axis 0, the {N} examples of the "
            f"batch): your x_hat's columns have means up to {m0:.3f} instead of 0. "
            "Batch norm averages over the batch: x.mean(axis=0), x.var(axis=0)."
        )
    if _close(x_hat, candidates["all"], **tol):
        _fail(f"{name} is normalized with one mean and one variance over the whole "
              "array: batch norm keeps one mean and variance per feature (axis=0).")
    means, varis = x_hat.mean(0), x_hat.var(0)
    _fail(
        f"{name} differs from batch norm's output by up to {err:.3g} (x shape "
        f"{x.shape}, dtype {x.dtype}). With gamma and beta undone, your x_hat's "
        f"columns have means in [{means.min():.3g}, {means.max():.3g}] (expected 0) "
        f"and variances in [{varis.min():.4g}, {varis.max():.4g}] (expected "
        f"var / (var + eps), just under 1). Is y = gamma * x_hat + beta?"
    )


# ------------------------------------------------------------------ running statistics


def check_running(rm, rv, rm0, rv0, x, momentum, part="both", rtol=1e-8, atol=1e-10):
    """Compare one running-statistics update with PyTorch's convention; diagnose.

    ``part="mean"`` checks running_mean only (the momentum convention); ``part="var"``
    checks the variance that running_var averages in, whatever momentum convention the
    student's running_mean shows (so that one mistake fails one test); ``"both"``
    checks both values exactly.
    """
    x64 = np.asarray(x, dtype=np.float64)
    N, D = x64.shape
    m = momentum
    rm = _arr(rm, "running_mean", (D,))
    rv = _arr(rv, "running_var", (D,))
    mu, var_b = x64.mean(0), x64.var(0)
    var_u = x64.var(0, ddof=1)
    exp_m = (1 - m) * rm0 + m * mu
    exp_v = (1 - m) * rv0 + m * var_u
    ok_m, ok_v = _close(rm, exp_m, rtol, atol), _close(rv, exp_v, rtol, atol)
    frac = float(np.median((rm - rm0) / (mu - rm0)))  # how far running_mean moved
    if part in ("mean", "both") and not ok_m:
        if _close(rm, m * rm0 + (1 - m) * mu, 1e-6, 1e-9):
            _fail(
                f"running_mean moved {frac:.0%} of the way from its old value to the "
                f"batch mean; with momentum = {m:g} it should move {m:.0%}. That is "
                "Keras' convention, where momentum is the weight of the OLD value "
                "(Keras' default 0.99 is PyTorch's 0.01). PyTorch's momentum is the "
                "weight of the new batch: running = (1 - momentum) * running + "
                "momentum * batch_mean."
            )
        _fail(
            f"running_mean moved {frac:.3g} of the way from its old value to the batch "
            f"mean (expected momentum = {m:g}): running = (1 - momentum) * running + "
            "momentum * batch_mean, with batch_mean = x.mean(axis=0)."
        )
    if part == "mean" or (part == "both" and ok_v):
        return
    w = frac if part == "var" and 0 < frac <= 1 else m  # the weight the student gives
    implied = (rv - (1 - w) * rv0) / w  # the batch variance the student averaged in
    ratio = float(np.median(implied / var_u))
    if part == "var" and _close(implied, var_u, 1e-6, 1e-9):
        return
    if _close(implied, var_b, 1e-6, 1e-9):
        _fail(
            f"running_var looks biased: the batch variance it averages in is "
            f"{ratio:.4f} of the expected value for N = {N}, which is (N - 1) / N = "
            f"{(N - 1) / N:.4f}. running_var stores the unbiased variance, "
            "var * N / (N - 1) (np.var(x, axis=0, ddof=1)); only the normalization "
            "uses the biased one."
        )
    if _close(rv, m * rv0 + (1 - m) * var_u, 1e-6, 1e-9):
        _fail(
            f"running_var moved {1 - m:.0%} of the way to the batch variance instead of "
            f"{m:.0%}: Keras' momentum convention (the weight of the old value). "
            "PyTorch's: running = (1 - momentum) * running + momentum * batch_var."
        )
    _fail(
        f"running_var is off: the batch variance it averages in is {ratio:.4g} of the "
        f"unbiased variance np.var(x, axis=0, ddof=1) (N = {N}, momentum = {m:g})."
    )


# ------------------------------------------------------------------ eval mode


def check_eval(y, x, gamma, beta, rm, rv, eps=1e-5, rtol=1e-8, atol=1e-10):
    """Compare an eval-mode output with the reference; diagnose."""
    x64 = np.asarray(x, dtype=np.float64)
    y = _arr(y, "y", x.shape)
    args = [np.asarray(v, np.float64) for v in (gamma, beta, rm, rv)]
    ref = ref_eval(x64, *args, eps)
    if _close(y, ref, rtol, atol):
        return
    g, b, rm, rv = args
    if len(x64) > 1 and _close(y, g * _norm(x64, 0, eps=eps) + b, 1e-6, 1e-8):
        _fail(
            "y is normalized with the batch's own mean and variance: in eval mode use "
            "running_mean and running_var, so that each example's output depends on "
            "that example only (and a batch of one works)."
        )
    if _close(y, g * (x64 - rm) / (np.sqrt(rv) + eps) + b, 1e-6, 1e-8):
        _fail(
            "y matches (x - running_mean) / (sqrt(running_var) + eps): eps belongs "
            "inside the square root, sqrt(running_var + eps). It matters when a "
            f"running variance is small: here the smallest is {rv.min():.3g}."
        )
    if _close(y, g * (x64 - rm) / (rv + eps) + b, 1e-6, 1e-8):
        _fail("y divides by running_var + eps: divide by its square root, "
              "sqrt(running_var + eps) (running_var is a variance, not a std).")
    err = float(np.max(np.abs(y - ref)))
    _fail(f"eval-mode y differs from gamma * (x - running_mean) / sqrt(running_var + "
          f"eps) + beta by up to {err:.3g} (x shape {x.shape}).")


# ------------------------------------------------------------------ backward


def numerical_grads(forward, x, gamma, beta, dy, h=1e-5):
    """Central differences of L = sum(forward(x, gamma, beta)[0] * dy), float64."""
    out = []
    for target in (x, gamma, beta):
        g = np.zeros_like(target)
        flat, gflat = target.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            plus = np.sum(forward(x, gamma, beta)[0] * dy)
            flat[i] = old - h
            minus = np.sum(forward(x, gamma, beta)[0] * dy)
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * h)
        out.append(g)
    return out


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-12)))


def check_backward(grads, expected, x, gamma, dy, eps=1e-5, rtol=1e-6, what="expected"):
    """Compare (dx, dgamma, dbeta) with expected ones; diagnose a missing term in dx.

    ``expected`` is the reference or the numerical gradient of the student's forward.
    """
    if not (isinstance(grads, tuple | list) and len(grads) == 3):
        _fail(f"bn_backward should return (dx, dgamma, dbeta), got {type(grads).__name__}"
              f" of length {len(grads) if hasattr(grads, '__len__') else '?'}.")
    N, D = x.shape
    dx = _arr(grads[0], "dx", (N, D))
    dg = _arr(grads[1], "dgamma", (D,))
    db = _arr(grads[2], "dbeta", (D,))
    e_dx, e_dg, e_db = (np.asarray(v, np.float64) for v in expected)
    dy = np.asarray(dy, np.float64)
    if _rel(db, e_db) > rtol:
        hint = (" You summed over axis 1 (the features): sum over the batch, axis 0."
                if D == N or _close(db.sum(), dy.sum(), 1e-6, 1e-9) else "")
        _fail(f"dbeta is off (relative error {_rel(db, e_db):.2g}, {what}): dbeta = "
              f"sum(dy, axis=0), one value per feature.{hint}")
    _, x_hat, _, _, inv_std = ref_forward(x, gamma, np.zeros(D), eps)
    if _rel(dg, e_dg) > rtol:
        _fail(f"dgamma is off (relative error {_rel(dg, e_dg):.2g}, {what}): dgamma = "
              "sum(dy * x_hat, axis=0).")
    if _rel(dx, e_dx) <= rtol:
        return
    g = np.asarray(gamma, np.float64)
    scale = g * inv_std  # (D,)
    mean_term = np.broadcast_to(scale * dy.mean(0), dy.shape)  # dbeta / M, per feature
    xhat_term = scale * x_hat * (dy * x_hat).mean(0)  # the x_hat * dgamma / M term
    diff = dx - e_dx
    tol = dict(rtol=1e-4, atol=1e-7 * float(np.abs(e_dx).max() + 1))
    if _close(diff, mean_term + xhat_term, **tol):
        _fail(
            "dx = gamma / sqrt(var + eps) * dy: both correction terms are missing, as "
            "if mu and var did not depend on x. Subtract mean(dy) (the dbeta / M term) "
            "and x_hat * mean(dy * x_hat) (the x_hat * dgamma / M term) inside the "
            "parentheses."
        )
    if _close(diff, mean_term, **tol):
        c = diff[0]
        _fail(
            "dx is off by a per-feature constant (the same for every row of a column: "
            f"{np.array2string(c[:3], precision=3)}...): is the mean(dy) term, dbeta / M, "
            "missing? It is the path through mu = mean(x): dx = gamma / sqrt(var + eps) "
            "* (dy - mean(dy) - x_hat * mean(dy * x_hat)). Check: a correct dx sums to "
            f"0 over each column; yours sums to {np.array2string(dx.sum(0)[:3], precision=3)}."
        )
    if _close(diff, xhat_term, **tol):
        k = float(np.median(np.sum(diff * x_hat, 0) / np.sum(x_hat * x_hat, 0)))
        _fail(
            "dx - expected is proportional to x_hat in each column (a median slope of "
            f"{k:.3g}): is the x_hat * mean(dy * x_hat) term, x_hat * dgamma / M, "
            "missing? It is the path through the variance: dx = gamma / sqrt(var + eps) "
            "* (dy - mean(dy) - x_hat * mean(dy * x_hat)). Check: a correct dx is "
            "orthogonal to x_hat in each column, sum(dx * x_hat, axis=0) = 0; yours is "
            f"{np.array2string((dx * x_hat).sum(0)[:3], precision=3)}."
        )
    col_const = float(np.abs(diff - diff.mean(0)).max()) <= 1e-6 * (np.abs(diff).max())
    hint = " The error is the same for every row of a column: a per-feature term." \
        if col_const else ""
    _fail(f"dx differs from the {what} by a relative error of {_rel(dx, e_dx):.2g} "
          f"(largest {float(np.abs(diff).max()):.3g}).{hint}")


# ------------------------------------------------------------------ A3: Chan's merge


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Reference: merge two shards' (count, mean, M2 = sum of squared deviations)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2 = m2_a + m2_b + delta**2 * n_a * n_b / n
    return n, mean, m2


# ------------------------------------------------------------------ A2: nodes, images, ghost


def ref_nodes(dy, x, gamma, eps=1e-5):
    """Every node's gradient of the forward graph, float64, for x (N, D).

    xc = x - mu;  var = mean(xc**2);  std = sqrt(var + eps);  inv = 1 / std;
    x_hat = xc * inv;  y = gamma * x_hat + beta
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    g = np.asarray(gamma, np.float64)
    M = x.shape[0]
    mu = x.mean(0)
    xc = x - mu
    var = (xc**2).mean(0)
    std = np.sqrt(var + eps)
    inv = 1 / std
    x_hat = xc * inv
    d = {"dbeta": dy.sum(0), "dgamma": (dy * x_hat).sum(0), "dx_hat": dy * g}
    d["dinv"] = (d["dx_hat"] * xc).sum(0)
    d["dstd"] = -d["dinv"] / std**2
    d["dvar"] = d["dstd"] / (2 * std)
    d["dxc"] = d["dx_hat"] * inv + 2 * xc * d["dvar"] / M
    d["dmu"] = -d["dxc"].sum(0)
    d["dx"] = d["dxc"] + d["dmu"] / M
    return d


NODE_HINTS = {
    "dx_hat": "y = gamma * x_hat + beta, so dx_hat = dy * gamma.",
    "dinv": "x_hat = xc * inv with inv one value per feature: dinv = sum(dx_hat * xc, "
    "axis=0).",
    "dstd": "inv = 1 / std: dstd = -dinv / std**2.",
    "dvar": "std = sqrt(var + eps): dvar = dstd / (2 * std).",
    "dxc": "xc has two paths to the loss, through x_hat and through var: dxc = dx_hat * "
    "inv + 2 * xc * dvar / M. Is one of the two missing?",
    "dmu": "xc = x - mu: dmu = -sum(dxc, axis=0).",
    "dx": "x reaches the loss through xc and through mu = mean(x): dx = dxc + dmu / M.",
}


def check_nodes(nodes, dy, x, gamma, eps=1e-5, rtol=1e-7):
    """Compare a dict of node gradients with the reference, in graph order, backwards."""
    if not isinstance(nodes, dict):
        _fail(f"bn_backward_steps should return a dict of node gradients, got "
              f"{type(nodes).__name__}.")
    ref = ref_nodes(dy, x, gamma, eps)
    for name in ["dbeta", "dgamma", "dx_hat", "dinv", "dstd", "dvar", "dxc", "dmu", "dx"]:
        if name not in nodes:
            _fail(f"the dict has no {name!r}: keys expected {list(ref)}.")
        got = _arr(np.asarray(nodes[name]), name, ref[name].shape)
        if _rel(got, ref[name]) > rtol:
            hint = NODE_HINTS.get(name, "")
            _fail(
                f"{name} is the first node that is off, walking back from y (relative "
                f"error {_rel(got, ref[name]):.2g}; the nodes computed before it are "
                f"right). {hint}"
            )


def check_numgrad(numerical_gradient):
    """A student's central-difference gradient: accuracy order, restores x, any shape."""
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]])
    x0 = x.copy()
    dout = np.ones_like(x)
    h = 1e-3
    g = call(numerical_gradient, "numerical_gradient", lambda v: v**3, x, dout, h)
    g = _arr(np.asarray(g), "the numerical gradient", x.shape)
    if not np.array_equal(x, x0):
        _fail("numerical_gradient changed x: restore each entry after perturbing it "
              "(old value back, also after the last one).")
    exact = 3 * x0**2
    err = float(np.abs(g - exact).max())
    if _close(g, ((x0 + h) ** 3 - x0**3) / h, 1e-6, 1e-9):
        _fail(
            f"this is the one-sided difference (f(x + h) - f(x)) / h: its error is O(h), "
            f"here {err:.2g} for f(x) = x**3 with h = {h:g}. The central difference "
            "(f(x + h) - f(x - h)) / (2h) has error O(h**2) (h**2 = 1e-6 here)."
        )
    if _close(g, 2 * exact, 1e-4, 1e-6):
        _fail("the gradient is twice the right one: divide by 2h, not h.")
    if err > 1e-5:
        _fail(f"for f(x) = x**3 and h = {h:g} the gradient is off by {err:.2g}; a "
              "central difference is within about h**2 = 1e-6.")


def ref_forward_nd(x, gamma, beta, eps=1e-5):
    """Batch norm over (N, C, *spatial): statistics per channel over axes (0, 2, 3, ...)."""
    x = np.asarray(x, np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mu = x.mean(axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axes, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    return np.asarray(gamma, np.float64).reshape(shape) * x_hat + np.asarray(
        beta, np.float64
    ).reshape(shape)


def check_forward_nd(y, x, gamma, beta, eps=1e-5, rtol=1e-8, atol=1e-10):
    """An (N, C, H, W) output against the reference; name the axes used if wrong."""
    y = _arr(y, "y", x.shape)
    ref = ref_forward_nd(x, gamma, beta, eps)
    if _close(y, ref, rtol, atol):
        return
    x64 = np.asarray(x, np.float64)
    shape = (1, x.shape[1], 1, 1)
    g = np.asarray(gamma, np.float64).reshape(shape)
    b = np.asarray(beta, np.float64).reshape(shape)
    wrong = {
        (0,): "over axis 0 only: one mean per channel AND position (H x W of them). A "
        "convolution shares its filter across positions, so batch norm shares its "
        "statistics too: average over (0, 2, 3), N * H * W values per channel",
        (0, 1, 2, 3): "over the whole array: one mean for every channel; keep one per "
        "channel, over (0, 2, 3)",
        (1, 2, 3): "per example (axes 1, 2, 3: that is LayerNorm); batch norm averages "
        "over the batch and the positions, (0, 2, 3)",
        (2, 3): "per example and channel (axes 2, 3: that is InstanceNorm); batch norm "
        "also averages over the batch, (0, 2, 3)",
        (0, 1): "over axes (0, 1): the channel axis is 1; average over (0, 2, 3)",
    }
    for axes, words in wrong.items():
        mu = x64.mean(axes, keepdims=True)
        var = ((x64 - mu) ** 2).mean(axes, keepdims=True)
        if _close(y, g * (x64 - mu) / np.sqrt(var + eps) + b, 1e-6, 1e-8):
            _fail(f"y is normalized {words}.")
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mu = x64.mean((0, 2, 3), keepdims=True)
    var_u = x64.var((0, 2, 3), ddof=1, keepdims=True)
    if _close(y, g * (x64 - mu) / np.sqrt(var_u + eps) + b, 1e-6, 1e-8):
        _fail(f"y is normalized with the unbiased variance: divide by M = N * H * W = "
              f"{n}, not M - 1.")
    _fail(f"y differs from batch norm over (0, 2, 3) by up to "
          f"{float(np.abs(y - ref).max()):.3g} (x shape {x.shape}).")


def check_ghost(y, x, gamma, beta, ghost, eps=1e-5):
    """Ghost batch norm: contiguous chunks of `ghost` examples, each normalized alone."""
    N, D = x.shape
    y = _arr(y, "y", x.shape)
    x64 = np.asarray(x, np.float64)
    chunks = x64.reshape(N // ghost, ghost, D)
    ref = np.concatenate([ref_forward(c, gamma, beta, eps)[0] for c in chunks])
    if _close(y, ref, 1e-8, 1e-10):
        return
    if _close(y, ref_forward(x64, gamma, beta, eps)[0], 1e-6, 1e-8):
        _fail(f"y is normalized with the statistics of the whole batch of {N}: ghost "
              f"batch norm splits it into {N // ghost} ghost batches of {ghost} "
              "consecutive examples and normalizes each with its own mean and variance.")
    strided = np.empty_like(x64)
    k = N // ghost
    for i in range(k):
        strided[i::k] = ref_forward(x64[i::k], gamma, beta, eps)[0]
    if _close(y, strided, 1e-6, 1e-8):
        _fail("the ghost batches are strided (x[i::k]); take consecutive examples, "
              f"x[i * {ghost}:(i + 1) * {ghost}], as x.reshape(-1, ghost, D) does.")
    _fail(f"y differs from ghost batch norm (ghost batches of {ghost}) by up to "
          f"{float(np.abs(y - ref).max()):.3g}.")


# ------------------------------------------------------------------ A3: shards, folding


def check_merge(out, a, b):
    """Chan's merge of shards a and b (arrays (n_k, D)): (n, mean, M2) against the union."""
    if not (isinstance(out, tuple | list) and len(out) == 3):
        _fail("chan_merge should return (n, mean, m2).")
    n_a, n_b = len(a), len(b)
    D = a.shape[1]
    n, mean, m2 = out
    if n != n_a + n_b:
        _fail(f"n = {n}, expected n_a + n_b = {n_a + n_b}.")
    mean = _arr(np.asarray(mean, np.float64), "mean", (D,))
    m2 = _arr(np.asarray(m2, np.float64), "m2", (D,))
    u = np.concatenate([a, b]).astype(np.float64)
    e_mean, e_m2 = u.mean(0), ((u - u.mean(0)) ** 2).sum(0)
    if not _close(mean, e_mean, 1e-9, 1e-12):
        if _close(mean, (a.mean(0) + b.mean(0)) / 2, 1e-9, 1e-12):
            _fail(
                f"mean is the plain average of the two shard means, which weighs a shard "
                f"of {n_a} like a shard of {n_b}: weight each by its count, mean_a + "
                "delta * n_b / n (delta = mean_b - mean_a)."
            )
        _fail(f"mean is off by up to {float(np.abs(mean - e_mean).max()):.3g} from the "
              f"mean of the {n_a + n_b} values.")
    if _close(m2, e_m2, 1e-9, 1e-9):
        return
    m2_a = ((a - a.mean(0)) ** 2).sum(0)
    m2_b = ((b - b.mean(0)) ** 2).sum(0)
    between = (b.mean(0) - a.mean(0)) ** 2 * n_a * n_b / (n_a + n_b)
    if _close(m2, m2_a + m2_b, 1e-9, 1e-9):
        _fail(
            "m2 = m2_a + m2_b misses the spread BETWEEN the shards: when their means "
            "differ, the union's squared deviations from the common mean are larger. "
            f"Add delta**2 * n_a * n_b / n (here up to {float(between.max()):.3g})."
        )
    _fail(f"m2 is {float(np.median(m2 / e_m2)):.4g} of the union's sum of squared "
          "deviations: m2 = m2_a + m2_b + delta**2 * n_a * n_b / n.")


def check_sync(out, shards):
    """The union's (mean, biased var) from shards of unequal sizes."""
    if not (isinstance(out, tuple | list) and len(out) == 2):
        _fail("sync_batch_stats should return (mean, var).")
    u = np.concatenate(shards).astype(np.float64)
    D = u.shape[1]
    mean = _arr(np.asarray(out[0], np.float64), "mean", (D,))
    var = _arr(np.asarray(out[1], np.float64), "var", (D,))
    sizes = [len(s) for s in shards]
    if not _close(mean, u.mean(0), 1e-9, 1e-12):
        if _close(mean, np.mean([s.mean(0) for s in shards], 0), 1e-9, 1e-12):
            _fail(f"mean averages the shard means equally, but the shards have "
                  f"{sizes} examples: each shard counts in proportion to its size.")
        _fail("mean differs from the mean of all the examples together.")
    if _close(var, u.var(0), 1e-9, 1e-12):
        return
    if _close(var, np.mean([s.var(0) for s in shards], 0), 1e-9, 1e-12):
        _fail(
            "var averages the shard variances: that misses the spread between the shard "
            f"means (and weighs shards of sizes {sizes} equally). Merge (n, mean, M2) "
            "with Chan's formula, then var = M2 / n."
        )
    if _close(var, u.var(0, ddof=1), 1e-9, 1e-12):
        _fail(f"var is the unbiased variance (M2 / (n - 1)); the normalization uses the "
              f"biased one, M2 / n, n = {len(u)}.")
    _fail(f"var is {float(np.median(var / u.var(0))):.4g} of the variance of all the "
          "examples together.")


def check_fold(out, W, b, gamma, beta, rm, rv, eps=1e-5):
    """Folding an eval-mode BN into the linear layer before it: y = x W^T + b, then BN."""
    if not (isinstance(out, tuple | list) and len(out) == 2):
        _fail("fold_bn_linear should return (W_folded, b_folded).")
    Wf = _arr(np.asarray(out[0], np.float64), "W_folded", W.shape)
    bf = _arr(np.asarray(out[1], np.float64), "b_folded", b.shape)
    s = gamma / np.sqrt(rv + eps)  # (out,)
    eW, eb = s[:, None] * W, s * (b - rm) + beta
    if _close(Wf, eW, 1e-9, 1e-12) and _close(bf, eb, 1e-9, 1e-12):
        return
    if not _close(Wf, eW, 1e-9, 1e-12):
        if W.shape[0] == W.shape[1] and _close(Wf, W * s[None, :], 1e-9, 1e-12):
            _fail("W_folded scales the columns of W (W * s); batch norm scales each "
                  "OUTPUT feature, a row of W (out, in): s[:, None] * W.")
        if _close(Wf, (gamma / (rv + eps))[:, None] * W, 1e-9, 1e-12):
            _fail("W_folded divides by running_var + eps: divide by its square root, "
                  "s = gamma / sqrt(running_var + eps).")
        if _close(Wf, (gamma / np.sqrt(rv))[:, None] * W, 1e-7, 1e-9):
            _fail("W_folded leaves out eps: s = gamma / sqrt(running_var + eps), the "
                  "scale eval-mode batch norm applies.")
        _fail(f"W_folded is off by up to {float(np.abs(Wf - eW).max()):.3g}: "
              "W_folded = s[:, None] * W with s = gamma / sqrt(running_var + eps).")
    if _close(bf, s * b + beta, 1e-9, 1e-12):
        _fail("b_folded forgets the running mean: BN subtracts it before scaling, "
              "b_folded = s * (b - running_mean) + beta.")
    if _close(bf, b * s + beta - rm, 1e-9, 1e-12) or _close(bf, b - rm + beta, 1e-9, 1e-12):
        _fail("b_folded: the running mean is subtracted before the scale s applies: "
              "s * (b - running_mean) + beta.")
    _fail(f"b_folded is off by up to {float(np.abs(bf - eb).max()):.3g}: b_folded = "
          "s * (b - running_mean) + beta.")
