"""Activation names accepted by the official configs."""

from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softsign": nn.Softsign,
    "sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid,
}

#: module class -> official name (how an engine names a built model's activation)
ACTIVATION_NAMES = {cls: name for name, cls in _ACTIVATIONS.items()}


def make_activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation '{name}'; expected one of {sorted(_ACTIVATIONS)}") from None
