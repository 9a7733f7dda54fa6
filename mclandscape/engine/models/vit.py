"""A small Vision Transformer (Dosovitskiy et al. 2021) for CIFAR-sized inputs: the "ViT" of Table 1 of the
Bézier-surface paper (Anonymous, 2024, 'Revisiting mode connectivity in neural networks with Bézier surface')."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mclandscape.engine.models._common import as_image, dropout


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + MHSA(LN(x)); x + MLP(LN(x)) with GELU."""

    dim: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                            deterministic=not train, name="attn")(y, y)
        x = x + dropout(y, self.dropout, train)
        y = dropout(nn.gelu(nn.Dense(self.mlp_dim, name="mlp1")(nn.LayerNorm(name="ln2")(x))), self.dropout, train)
        return x + dropout(nn.Dense(self.dim, name="mlp2")(y), self.dropout, train)


class ViT(nn.Module):
    """Patch embedding (a ``patch_size``-strided conv, the submodule ``stem``), a learned class token and
    position embedding, ``depth`` pre-LN encoder blocks, final LayerNorm, linear head on the class token.

    Defaults (``vit_small``): patch 4, width 192, depth 6, 3 heads, MLP 384 — about 1.8 M parameters on
    32×32×3. The number of patches follows from the input size; for 8×8 digits use ``patch_size=2``.
    """

    num_classes: int = 10
    patch_size: int = 4
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_dim: int = 384
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = as_image(x)
        p = self.patch_size
        if x.shape[1] < p or x.shape[2] < p:
            raise ValueError(f"ViT patch_size {p} is larger than the {x.shape[1]}×{x.shape[2]} input")
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="stem")(x)
        n, h, w, d = x.shape
        x = x.reshape((n, h * w, d))
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d))
        x = dropout(x + pos.astype(x.dtype), self.dropout, train)
        for i in range(self.depth):
            x = EncoderBlock(self.dim, self.heads, self.mlp_dim, self.dropout, name=f"block{i}")(x, train)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])
