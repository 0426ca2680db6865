"""bnlib.models: the norm switch changes the normalization and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlib import models
from bnlib import nn as bnn


@pytest.mark.parametrize("norm", models.NORMS)
def test_mlp_structure_and_shared_initialization(norm):
    net = models.mlp([10, 8, 8, 3], norm=norm, seed=3)
    plain = models.mlp([10, 8, 8, 3], norm="none", seed=3)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    plain_linears = [m for m in plain if isinstance(m, nn.Linear)]
    for a, b in zip(linears, plain_linears, strict=True):
        assert torch.equal(a.weight, b.weight)  # same seed, same weights
    bns = [m for m in net if hasattr(m, "running_var")]
    assert len(bns) == (0 if norm == "none" else 2)
    if norm == "bnlib":
        assert all(isinstance(m, bnn.BatchNorm1d) for m in bns)
    assert net(torch.randn(4, 10)).shape == (4, 3)
    # BN sits between the linear map and the nonlinearity
    if norm != "none":
        assert isinstance(net[0], nn.Linear) and hasattr(net[1], "running_var")
        assert isinstance(net[2], nn.Sigmoid)


def test_mlp_dropout_placement():
    everywhere = models.mlp([10, 8, 8, 8, 3], norm="bnlib", dropout=0.5)
    last_only = models.mlp([10, 8, 8, 8, 3], norm="bnlib", dropout=0.5,
                           dropout_last_only=True)
    kinds = [type(m).__name__ for m in everywhere]
    assert kinds.count("Dropout") == 3
    assert kinds.index("Dropout") < len(kinds) - 3  # a dropout feeds a later BN
    kinds = [type(m).__name__ for m in last_only]
    assert kinds.count("Dropout") == 1 and kinds[-2] == "Dropout"


@pytest.mark.parametrize("norm", models.NORMS)
def test_cnn_on_digits_and_mnist_shapes(norm):
    assert models.cnn(norm=norm)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    mnist_net = models.cnn(norm=norm, image_size=28)
    assert mnist_net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        models.mlp([2, 2], norm="layer")
    with pytest.raises(ValueError, match="activation"):
        models.mlp([2, 2, 2], activation="gelu")
    with pytest.raises(ValueError, match="dropout"):
        models.mlp([2, 2, 2], dropout=1.0)
    with pytest.raises(ValueError, match="sizes"):
        models.mlp([2])
    with pytest.raises(ValueError, match="dims"):
        models.norm_layer("torch", 3, dims=4)
