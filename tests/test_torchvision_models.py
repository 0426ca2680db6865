"""bnlib on torchvision's resnet18 with every BatchNorm2d swapped for bnlib's: the same
outputs, gradients and running statistics as torch's in float64, eval mode with
autograd and ReLU(inplace=True), and fold_model folding all 20 batch norms.

torchvision is not a requirement: these tests run where it imports and skip, saying
why, where it does not. (Its PyPI wheel for torch 2.13 is built for CUDA; beside the
CPU torch, defining the ``torchvision::nms`` and ``qnms`` schemas before the import is
enough for the classification models, no pretrained weights needed.)"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys

import pytest
import torch
from torch import nn

from bnlib import nn as bnn
from bnlib.fold import fold_model


def _torchvision():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (it is not a requirement)")
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            pytest.skip(f"torchvision does not import here: {err}")
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):  # the CUDA wheel's C++ ops did not load: stand-ins
        try:
            torch.library.define(f"torchvision::{op}",
                                 "(Tensor dets, Tensor scores, float iou) -> Tensor")
        except RuntimeError:
            pass  # defined by an earlier test
    try:
        return importlib.import_module("torchvision")
    except Exception as err:  # noqa: BLE001 - any reason, as the skip's reason
        pytest.skip(f"torchvision does not import beside this torch: {err}")


def _swap(model: nn.Module) -> nn.Module:
    """model with every torch BatchNorm2d replaced by bnlib's, same state."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                new = bnn.BatchNorm2d(child.num_features, child.eps, child.momentum)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new.to(child.weight.dtype).train(child.training))
    return model


def _resnet18():
    torch.manual_seed(0)
    ref = _torchvision().models.resnet18(weights=None, num_classes=10).double()
    return ref, _swap(copy.deepcopy(ref))


def test_resnet18_swapped_equals_torch_in_float64():
    ref, ours = _resnet18()
    assert sum(isinstance(m, bnn.BatchNorm2d) for m in ours.modules()) == 20
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    results = []
    for m in (ours, ref):
        xx = x.clone().requires_grad_()
        m(xx).square().sum().backward()
        results.append([xx.grad, m.conv1.weight.grad, m.bn1.weight.grad,
                        m.layer4[1].bn2.running_var])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_resnet18_eval_with_autograd_and_fold_model():
    """Frozen-BN fine-tuning and saliency: eval mode, gradients on, ReLU(inplace) after
    every BN, at 224x224 (inputs over 512 KiB). Then fold_model folds all 20 BNs."""
    ref, ours = _resnet18()
    ours.eval()
    ref.eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, requires_grad=True)
    ours(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    folded = fold_model(ours)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref(x), rtol=1e-10, atol=1e-10)
