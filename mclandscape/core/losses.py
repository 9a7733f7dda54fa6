"""Per-example task losses and metrics shared by training and evaluation.

Every loss here maps ``(outputs [N, ...], targets [N, ...]) -> [N]``; :func:`get_loss` resolves a name.

Example:
    >>> import jax.numpy as jnp
    >>> logits, labels = jnp.array([[2.0, 0.0], [0.0, 2.0]]), jnp.array([0, 0])
    >>> [round(float(v), 4) for v in cross_entropy(logits, labels)]
    [0.1269, 2.1269]
    >>> float(accuracy(logits, labels))
    0.5
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mclandscape.core import _checks

__all__ = ["cross_entropy", "accuracy", "mse", "mse_onehot", "get_loss", "LOSSES"]


def _class_labels(labels: jax.Array, loss: str) -> jax.Array:
    """Integer class labels as int32; float labels are refused (casting would truncate ``0.7`` to class 0)."""
    dtype = jnp.result_type(labels)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{loss} needs integer class labels, got {dtype} targets: cast whole-number labels with "
                         "y.astype(int), or use loss='mse' for real-valued targets")
    return labels.astype(jnp.int32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels.

    Args:
      logits: ``[..., C]`` unnormalised scores.
      labels: ``[...]`` integer classes in ``[0, C)``.

    Returns:
      The losses, shape ``logits.shape[:-1]``; ``ValueError`` for float labels (nothing is truncated).

    Example:
        >>> import jax.numpy as jnp
        >>> [round(float(v), 4) for v in cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))]
        [1.3863, 1.3863]
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, _class_labels(labels, "cross_entropy"))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean classification accuracy: the fraction of examples whose arg-max class is the label.

    Args:
      logits: ``[N, C]`` scores (or probabilities).
      labels: ``[N]`` integer classes.

    Returns:
      A scalar float32 array in ``[0, 1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(accuracy(jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), jnp.array([0, 1, 1])))
        0.6666666865348816
    """
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example squared error summed over output dimensions (regression).

    Args:
      outputs: ``[N, ...]`` network outputs.
      targets: ``[N, ...]`` targets with as many entries per example.

    Returns:
      ``[N]`` sums of squared differences. Integer targets are compared as exact floats; targets with another
      number of entries per example (e.g. class labels ``[N]`` against ``[N, C]`` outputs, which would
      broadcast) raise ``ValueError`` naming ``mse_onehot``.

    Example:
        >>> import jax.numpy as jnp
        >>> mse(jnp.array([[1.0, 2.0], [0.0, 0.0]]), jnp.array([[0.0, 0.0], [0.0, 3.0]])).tolist()
        [5.0, 9.0]
    """
    out, tgt = outputs.reshape(outputs.shape[0], -1), targets.reshape(targets.shape[0], -1)
    if out.shape != tgt.shape:
        kind = "class labels " if jnp.issubdtype(jnp.result_type(targets), jnp.integer) else ""
        raise ValueError(f"mse compares outputs with targets of the same shape, got outputs {outputs.shape} and "
                         f"{kind}targets {targets.shape}" + (": use loss='mse_onehot' for class labels" if kind else ""))
    diff = out - tgt.astype(out.dtype)
    return jnp.sum(diff * diff, axis=-1)


def mse_onehot(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example squared error of the outputs against one-hot integer labels, summed over classes.

    Unlike cross-entropy it has finite minima on separable data (cross-entropy's infimum is at infinity).

    Args:
      outputs: ``[N, C]`` network outputs.
      labels: ``[N]`` integer classes.

    Returns:
      ``[N]`` squared errors.

    Example:
        >>> import jax.numpy as jnp
        >>> mse_onehot(jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([0, 1])).tolist()
        [0.0, 1.0]
    """
    onehot = jax.nn.one_hot(_class_labels(labels, "mse_onehot"), outputs.shape[-1], dtype=outputs.dtype)
    return jnp.sum((outputs - onehot) ** 2, axis=-1)


@struct.dataclass
class _SmoothedCrossEntropy:
    smoothing: float = struct.field(pytree_node=False)

    def __call__(self, logits, labels):
        onehot = jax.nn.one_hot(_class_labels(labels, "cross_entropy"), logits.shape[-1], dtype=logits.dtype)
        targets = optax.smooth_labels(onehot, self.smoothing)
        return optax.softmax_cross_entropy(logits, targets)


LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy, "mse": mse, "mse_onehot": mse_onehot}


def get_loss(loss: str | Callable, *, label_smoothing: float = 0.0) -> Callable:
    """Resolve a per-example loss ``(outputs, targets) -> [N]`` from a name or a callable.

    Args:
      loss: ``"cross_entropy"``, ``"mse"``, ``"mse_onehot"`` (the keys of :data:`LOSSES`), or a callable returned
        as it is.
      label_smoothing: in ``[0, 1)``; smooths cross-entropy's one-hot targets (only with ``"cross_entropy"``).

    Returns:
      The per-example loss function. Raises ``ValueError`` for an unknown name or a smoothing it cannot apply.

    Example:
        >>> get_loss("mse_onehot") is mse_onehot
        True
        >>> get_loss("mse", label_smoothing=0.1)
        Traceback (most recent call last):
        ...
        ValueError: label_smoothing applies to cross_entropy, not 'mse'
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if callable(loss) and not label_smoothing:
        return loss
    if label_smoothing and loss != "cross_entropy":
        raise ValueError(f"label_smoothing applies to cross_entropy, not {loss!r}")
    _checks.choice(loss, "loss (a name, or a callable)", LOSSES)
    return _SmoothedCrossEntropy(float(label_smoothing)) if label_smoothing else LOSSES[loss]
