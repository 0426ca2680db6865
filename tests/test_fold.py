"""bnlib.fold: folded layers equal bn(layer(x)), agree with torch.nn.utils.fusion, leave
their inputs untouched, and reject what cannot be folded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnlib import nn as bnn
from bnlib.fold import fold_batchnorm, fold_sequential

LAYERS = {
    "linear": (lambda bias: nn.Linear(6, 4, bias=bias), (5, 6), 1),
    "conv1d": (lambda bias: nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=bias),
               (2, 4, 9), 1),
    "conv2d-groups": (lambda bias: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2,
                                             bias=bias), (2, 4, 7, 7), 2),
    "conv2d-depthwise": (lambda bias: nn.Conv2d(4, 4, 3, groups=4, bias=bias),
                         (2, 4, 6, 6), 2),
    "conv3d": (lambda bias: nn.Conv3d(3, 6, 2, stride=(1, 2, 1), bias=bias),
               (2, 3, 4, 5, 4), 3),
}


def _trained_bn(lib, num_features, dims, x_shape_after):
    bn = getattr(lib, f"BatchNorm{dims}d")(num_features)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        for _ in range(3):
            bn(torch.randn(x_shape_after) * 3 + 2)  # realistic running statistics
    return bn.eval()


@pytest.mark.parametrize("lib", [bnn, nn], ids=["bnlib", "torch"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", LAYERS)
def test_fold_equals_bn_of_layer(kind, bias, lib):
    make, x_shape, dims = LAYERS[kind]
    layer = make(bias).eval()
    x = torch.randn(x_shape)
    with torch.no_grad():
        z = layer(x)
    bn = _trained_bn(lib, z.shape[1], dims, z.shape)
    layer_before, bn_before = copy.deepcopy(layer.state_dict()), copy.deepcopy(
        bn.state_dict())
    folded = fold_batchnorm(layer, bn)
    assert type(folded) is type(layer)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), atol=1e-5, rtol=1e-5)
        fuse = fuse_linear_bn_eval if kind == "linear" else fuse_conv_bn_eval
        reference = fuse(copy.deepcopy(layer), bn)
        torch.testing.assert_close(folded.weight, reference.weight,
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(folded.bias, reference.bias, atol=1e-6, rtol=1e-6)
    for key, value in layer.state_dict().items():  # inputs untouched
        assert torch.equal(value, layer_before[key])
    for key, value in bn.state_dict().items():
        assert torch.equal(value, bn_before[key])


def test_fold_without_affine_and_float64():
    layer = nn.Linear(3, 2, dtype=torch.float64)
    bn = bnn.BatchNorm1d(2, affine=False, dtype=torch.float64)
    bn(torch.randn(10, 2, dtype=torch.float64) * 4)
    bn.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    folded = fold_batchnorm(layer, bn)
    assert folded.weight.dtype == torch.float64
    torch.testing.assert_close(folded(x), bn(layer(x)), atol=1e-12, rtol=0)


def test_fold_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(layer, bnn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_batchnorm(layer, bnn.BatchNorm1d(2, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="2 outputs but bn normalizes 3"):
        fold_batchnorm(layer, bnn.BatchNorm1d(3).eval())
    with pytest.raises(TypeError, match="Linear, Conv1d, Conv2d or Conv3d"):
        fold_batchnorm(nn.ConvTranspose2d(2, 2, 3), bnn.BatchNorm2d(2).eval())
    with pytest.raises(TypeError, match="batch-norm module"):
        fold_batchnorm(layer, nn.LayerNorm(2))


def test_fold_sequential_removes_every_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), bnn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                          nn.Linear(5, 2))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 8) * 2)
    model.eval()
    folded = fold_sequential(model)
    assert len(folded) == len(model) - 2
    assert not any(hasattr(m, "running_var") for m in folded)
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="nn.Sequential"):
        fold_sequential(nn.Linear(2, 2))
