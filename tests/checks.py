"""Comparison helpers: a failure says *what* differs and keeps torch's report.

``torch.testing.assert_close(a, b, msg="running_var")`` would replace torch's report
(how many elements differ, the largest difference, where) with the bare name. These
keep both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


def named(what: str) -> Callable[[str], str]:
    """A ``msg=`` for ``torch.testing.assert_close``: ``what``, then torch's report."""
    return lambda report: f"{what}: {report}"


def assert_all_close(actual: Iterable[torch.Tensor], expected: Iterable[torch.Tensor],
                     names: Sequence[str], *, check_dtype: bool = True,
                     **tolerances) -> None:
    """assert_close for each pair; a failure names the pair (a gradient, a buffer)."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected) == len(names), (
        f"{len(actual)} tensors against {len(expected)} expected ({len(names)} names)")
    for name, a, b in zip(names, actual, expected, strict=True):
        if check_dtype and a is not None and b is not None:
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, expected {b.dtype}"
        torch.testing.assert_close(a, b, check_dtype=check_dtype, msg=named(name),
                                   **tolerances)


# What ``[x.grad] + [p.grad for p in bn.parameters()]`` holds for a batch norm
GRADS = ("grad of the input", "grad of weight", "grad of bias")
