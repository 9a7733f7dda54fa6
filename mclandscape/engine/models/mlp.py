"""Fully connected network: ``Dense(w1) - act - ... - Dense(wk) - act - Dense(num_classes)``."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from mclandscape.core import _checks
from mclandscape.engine.models._common import ACTIVATIONS, dropout


class MLP(nn.Module):
    """Multi-layer perceptron over flattened inputs.

    ``widths`` are the hidden widths (``()`` gives a linear model); ``num_classes`` is the output width
    (the number of classes for classification, the target dimension for regression). Inputs of any rank
    ``[N, ...]`` are flattened to ``[N, F]``. The first layer is the submodule ``Dense_0``.
    """

    widths: Sequence[int] = (128,)
    num_classes: int = 10
    activation: str = "relu"
    use_bias: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = ACTIVATIONS[_checks.choice(self.activation, "activation", ACTIVATIONS)]
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.widths):
            x = dropout(act(nn.Dense(int(w), use_bias=self.use_bias, name=f"Dense_{i}")(x)), self.dropout, train)
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name=f"Dense_{len(self.widths)}")(x)
