"""Small networks for the book's experiments, with a ``norm=`` switch.

``norm`` is ``"none"``, ``"bnlib"`` (this library's BatchNorm) or ``"torch"``
(``torch.nn``'s); the rest of the network, and its initialization for a given seed, is
the same, so paired experiments differ in the normalization only. Batch norm sits where
Ioffe & Szegedy put it: after the linear map, before the nonlinearity.
"""

from __future__ import annotations

import torch
from torch import nn

from . import nn as bnn

__all__ = ["NORMS", "norm_layer", "mlp", "cnn"]

#: The kinds of normalization that ``norm=`` takes: no batch norm, bnlib's
#: (:class:`bnlib.nn.BatchNorm1d` and its siblings) or ``torch.nn``'s.
NORMS = ("none", "bnlib", "torch")
_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def norm_layer(norm: str, num_features: int, dims: int = 1, **kwargs) -> nn.Module:
    """A batch-norm layer of the given kind for (N, C) (dims=1) or images (dims=2)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    if norm == "none":
        return nn.Identity()
    lib = bnn if norm == "bnlib" else nn
    return getattr(lib, f"BatchNorm{dims}d")(num_features, **kwargs)


def mlp(
    sizes: list[int] | tuple[int, ...],
    norm: str = "none",
    activation: str = "sigmoid",
    dropout: float = 0.0,
    dropout_last_only: bool = False,
    seed: int = 0,
    **norm_kwargs,
) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    Each hidden layer is ``Linear -> norm -> activation``, followed by ``Dropout`` if
    ``dropout > 0``. Dropout after a hidden layer feeds the next ``Linear -> norm``: the
    order that shifts batch norm's variance between training and test (Li et al., 2019).
    With ``dropout_last_only`` there is a single dropout, after the last hidden layer,
    where no batch norm follows it. The output layer is a plain ``Linear`` (logits).
    Weights are drawn from torch's generator seeded with ``seed``.
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes needs an input and an output size, got {sizes}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}"
        )
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    hidden = list(zip(sizes[:-2], sizes[1:-1], strict=True))
    for i, (n_in, n_out) in enumerate(hidden):
        layers += [nn.Linear(n_in, n_out), norm_layer(norm, n_out, 1, **norm_kwargs),
                   _ACTIVATIONS[activation]()]
        if dropout and (not dropout_last_only or i == len(hidden) - 1):
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def cnn(
    in_channels: int = 1,
    channels: tuple[int, ...] = (16, 32),
    num_classes: int = 10,
    image_size: int = 8,
    norm: str = "none",
    seed: int = 0,
    **norm_kwargs,
) -> nn.Sequential:
    """A small convolutional network: ``[Conv3x3 -> norm -> ReLU -> MaxPool2]`` per
    entry of ``channels``, then a linear classifier. For 8 x 8 digits or 28 x 28
    MNIST."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1),
                   norm_layer(norm, c_out, 2, **norm_kwargs),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = c_out, size // 2
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, num_classes)]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
