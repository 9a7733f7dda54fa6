"""Per-example task losses and metrics shared by training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["cross_entropy", "accuracy", "correct", "mse"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, shape ``logits.shape[:-1]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 1.0 where the arg-max class equals the label."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean classification accuracy."""
    return jnp.mean(correct(logits, labels))


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example squared error summed over output dimensions (regression)."""
    diff = outputs.reshape(outputs.shape[0], -1) - targets.reshape(targets.shape[0], -1)
    return jnp.sum(diff * diff, axis=-1)
