"""bnlib.fold: folded layers equal bn(layer(x)), agree with torch.nn.utils.fusion, leave
their inputs untouched, and reject what cannot be folded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnlib import nn as bnn
from bnlib.fold import fold_batchnorm, fold_model, fold_sequential

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


# ------------------------------------------------------------------- fold_model


class Net(nn.Module):
    """resnet-like wiring in a custom forward: folds conv1/bn1 and fc/bn_fc (bn1 is a
    bnlib BN, bn2 torch's); leaves bn_cat (after torch.cat), bn_shared (its conv's
    output is also used by the skip) and bn_input (on the model's input)."""

    def __init__(self):
        super().__init__()
        self.bn_input = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = bnn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_shared = nn.BatchNorm2d(4)
        self.bn_cat = bnn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(self.bn_input(x))))
        g = self.conv2(h)
        h = self.bn_cat(torch.cat([self.bn_shared(g) + g, h], 1))
        return self.bn_fc(self.fc(h.mean((2, 3))))


def _run_stats(model, shape):
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(shape, dtype=torch.float64) * 2 + 1)
    return model.eval()


def test_fold_model_folds_what_it_can_and_names_the_rest():
    torch.manual_seed(0)
    model = _run_stats(Net().double(), (6, 3, 5, 5))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="fold_model left 3 batch norm") as record:
        folded = fold_model(model)
    message = str(record[0].message)
    assert "'bn_input': its input is the model's input" in message
    assert "'bn_shared': the output of 'conv2' is also used elsewhere" in message
    assert "'bn_cat': its input is a functional call" in message
    names = {n for n, m in folded.named_modules() if isinstance(m, _BatchNorm)}
    assert names == {"bn_input", "bn_shared", "bn_cat"}
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key
    assert isinstance(model.bn1, bnn.BatchNorm2d) and not folded.training
    ref = fuse_conv_bn_eval(model.conv1, model.bn1)  # agrees with torch's fusion
    torch.testing.assert_close(folded.conv1.weight, ref.weight)
    torch.testing.assert_close(folded.conv1.bias, ref.bias)
    ref = fuse_linear_bn_eval(model.fc, model.bn_fc)
    torch.testing.assert_close(folded.fc.weight, ref.weight)


def test_fold_model_refuses_training_mode_and_untraceable_models():
    model = Net()
    with pytest.raises(ValueError, match="eval mode"):
        fold_model(model)  # a new model is in training mode
    model.eval().bn1.train()
    with pytest.raises(ValueError, match="bn1"):
        fold_model(model)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent

    with pytest.raises(TypeError, match="does not trace"):
        fold_model(Branchy().eval())


def test_fold_model_on_renorm_and_ghost_in_eval_mode():
    """Batch Renorm and Ghost BN in eval mode are batch norm: folded too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), bnn.BatchRenorm1d(6), nn.ReLU(),
                          nn.Linear(6, 6), bnn.GhostBatchNorm1d(6, 4))
    model = _run_stats(model.double(), (16, 4))
    folded = fold_model(model)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)


def test_fold_sequential_reports_what_it_leaves():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6)).eval()
    with pytest.warns(UserWarning, match="'2': it follows ReLU, not a Linear or Conv"):
        folded = fold_sequential(model)
    assert isinstance(folded[2], nn.BatchNorm1d)
