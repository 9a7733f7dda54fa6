"""The one objective: ``objective(params, batch, key) -> (loss, aux)``.

Every trainer and method of mclandscape differentiates a function of this shape: endpoint training,
curves and surfaces (through :class:`mclandscape.engine.connector_train.ConnectorObjective`, itself an
objective of the control points), NEB bands, curvature, DSP-TT searches, volumes and ensembles.
:func:`make_objective` builds it from a model and a loss:

- ``params``: the ``"params"`` collection of the model's variables;
- ``batch``: ``(x, y)`` or ``(x, y, weights)``; ``weights`` (``[N]``, e.g. a 0/1 padding mask) weight the
  examples of the mean;
- ``key``: drives dropout in train mode (``None``: no dropout);
- ``loss``: the weighted mean task loss plus ``l2 / 2 * |params|^2``;
- ``aux``: ``{"loss": task loss (no L2), "correct": weighted count of correct arg-max predictions (NaN
  unless ``y`` are integer class labels), "count": sum of the weights}`` and, for a model with BatchNorm in
  train mode, ``"batch_stats"``: the running statistics after this batch (Flax's update of the
  statistics held in :attr:`Objective.state`).

An :class:`Objective` is a pytree: its configuration (model, loss, L2, mode) is static and hashes by
value (a model rebuilt with equal arguments included), the fixed variable collections (``state``, e.g.
BatchNorm statistics) are data. Jitted steps take it as an ordinary argument, so a second run with an equal
model and loss compiles nothing, and new statistics never force a recompile.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mclandscape.engine.models import get_model
    >>> model = get_model("mlp", widths=[8], num_classes=3)
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> obj = make_objective(model, "cross_entropy", l2=1e-4)
    >>> loss, aux = obj(params, (x, y), None)
    >>> bool(loss > aux["loss"]), float(aux["count"])
    (True, 4.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from mclandscape.core import _checks
from mclandscape.core.losses import get_loss
from mclandscape.core.tree import PyTree, tree_dot

__all__ = ["Objective", "make_objective", "function_objective", "call_objective", "check_objective",
           "split_batch", "correct_count", "per_count"]


def correct_count(outputs: jax.Array, y: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted count of arg-max predictions equal to integer labels ``y``.

    Args:
      outputs: ``[N, C]`` network outputs.
      y: ``[N]`` targets.
      weights: ``[N]`` example weights (e.g. a 0/1 padding mask).

    Returns:
      A scalar; NaN when ``y`` are not class labels (float targets, or targets shaped like the outputs).

    Example:
        >>> import jax.numpy as jnp
        >>> out = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> float(correct_count(out, jnp.array([0, 1, 1]), jnp.array([1.0, 1.0, 0.0])))
        2.0
    """
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer) or jnp.ndim(outputs) != jnp.ndim(y) + 1:
        return jnp.full((), jnp.nan, weights.dtype)
    return jnp.sum((jnp.argmax(outputs, -1) == y).astype(weights.dtype) * weights)


def per_count(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count`` for a weighted ``count`` of examples (any positive count, fractional ones included);
    NaN where there were no examples.

    Example:
        >>> import jax.numpy as jnp
        >>> per_count(jnp.array([0.25, 1.0]), jnp.array([0.5, 0.0])).tolist()
        [0.5, nan]
    """
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), jnp.nan)


def split_batch(batch) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Unpack a batch ``(x, y)`` or ``(x, y, weights)`` and check that its parts agree in size.

    Args:
      batch: a tuple or list of 2 or 3 arrays with a common first axis.

    Returns:
      ``(x, y, weights or None)``. Raises ``ValueError`` for any other batch.

    Example:
        >>> import numpy as np
        >>> x, y, w = split_batch((np.zeros((4, 2)), np.zeros(4, int)))
        >>> x.shape, w is None
        ((4, 2), True)
        >>> split_batch((np.zeros((4, 2)), np.zeros(3)))
        Traceback (most recent call last):
        ...
        ValueError: batch inputs and targets disagree in size: x (4, 2), y (3,)
    """
    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
        kind = f"a sequence of {len(batch)}" if isinstance(batch, tuple | list) else type(batch).__name__
        raise ValueError(f"a batch is (x, y) or (x, y, weights), got {kind}")
    x, y, w = (*batch, None)[:3]  # no weights in a batch (x, y)
    if jnp.shape(x)[:1] != jnp.shape(y)[:1]:
        raise ValueError(f"batch inputs and targets disagree in size: x {jnp.shape(x)}, y {jnp.shape(y)}")
    if w is not None and jnp.shape(w) != jnp.shape(y)[:1]:
        raise ValueError(f"batch weights need shape {jnp.shape(y)[:1]}, got {jnp.shape(w)}")
    return x, y, w


@struct.dataclass(eq=False)  # holds arrays: hashed by identity, like a jax.Array
class Objective:
    """``objective(params, batch, key) -> (loss, aux)`` of a model (see the module docstring).

    Build it with :func:`make_objective`; :meth:`with_state` swaps the fixed collections (e.g. the BatchNorm
    statistics a training step carries) without changing what compiles.

    Attributes:
      model: the :class:`~mclandscape.engine.models.Model` (static, hashed by value).
      per_example: the per-example loss ``(outputs, y) -> [N]`` (static).
      l2: the coefficient of ``l2 / 2 * |params|^2`` (static).
      train: training mode (BatchNorm on batch statistics, dropout with a key) or inference (static).
      state: the fixed variable collections (data), e.g. ``{"batch_stats": ...}``, or ``None``.

    Example:
        >>> from mclandscape.engine.models import get_model
        >>> obj = make_objective(get_model("mlp", widths=[4], num_classes=3), l2=1e-4)
        >>> isinstance(obj, Objective), obj.train, obj.l2, obj.state is None  # no BatchNorm: inference mode
        (True, False, 0.0001, True)
        >>> obj.with_state({"batch_stats": {}}).state
        {'batch_stats': {}}
    """

    model: Any = struct.field(pytree_node=False)
    per_example: Callable = struct.field(pytree_node=False)
    l2: float = struct.field(pytree_node=False, default=0.0)
    train: bool = struct.field(pytree_node=False, default=True)
    state: PyTree = None

    def with_state(self, state: PyTree) -> Objective:
        """The same objective with other fixed collections (``{"batch_stats": ...}`` or ``None``).

        Args:
          state: the new fixed collections.

        Returns:
          An :class:`Objective` with the same static configuration (so it compiles nothing new).
        """
        return self.replace(state=state)

    def _collections(self, params, x):
        rest = dict(self.state or {})
        if self.model.has_batch_stats and "batch_stats" not in rest:
            # train mode ignores the running statistics, but Flax's BatchNorm needs the collection to exist
            shapes = jax.eval_shape(self.model.init, jax.random.key(0), x[:1])
            rest["batch_stats"] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                         shapes["batch_stats"])
        return {**rest, "params": params}

    def outputs(self, params, x, key=None):
        """The network's outputs on ``x`` in this objective's mode.

        Args:
          params: the ``"params"`` collection.
          x: a batch of inputs.
          key: the dropout key (train mode only; ``None``: no dropout).

        Returns:
          ``(outputs, new_batch_stats or None)``; the statistics are returned for a BatchNorm model in train mode.
        """
        variables = self._collections(params, x)
        rngs = {"dropout": key} if (self.train and key is not None) else None
        if self.train and self.model.has_batch_stats:
            return self.model.apply_with_stats(variables, x, rngs=rngs)
        return self.model.apply(variables, x, train=self.train, rngs=rngs), None

    def __call__(self, params, batch, key=None):
        x, y, w = split_batch(batch)
        out, stats = self.outputs(params, x, key)
        out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
        per = self.per_example(out, y)
        if per.shape != jnp.shape(y)[:1]:
            raise ValueError(f"the per-example loss returned shape {per.shape} for {jnp.shape(y)[0]} examples")
        w = jnp.ones_like(per) if w is None else w.astype(per.dtype)
        count = jnp.sum(w)
        task = jnp.sum(per * w) / jnp.maximum(count, jnp.finfo(per.dtype).tiny)
        correct = correct_count(out, y, w)
        value = task + 0.5 * self.l2 * tree_dot(params, params) if self.l2 else task
        aux = {"loss": task, "correct": correct, "count": count}
        if stats is not None:
            aux["batch_stats"] = stats
        return value, aux


def make_objective(model, loss: str | Callable = "cross_entropy", *, l2: float = 0.0, train: bool | None = None,
                   variables: PyTree | None = None, label_smoothing: float = 0.0) -> Objective:
    """The objective ``(params, batch, key) -> (loss, aux)`` of ``model`` with a task ``loss``.

    Args:
      model: a :class:`mclandscape.engine.models.Model` (``apply``, ``apply_with_stats``, ``has_batch_stats``).
      loss: ``"cross_entropy"``, ``"mse"`` (squared error against targets of the outputs' shape),
        ``"mse_onehot"`` (squared error against one-hot integer labels: finite minima on separable data) or
        a per-example callable ``(outputs, y) -> [N]``.
      l2: adds ``l2 / 2 * |params|^2`` (``>= 0``).
      train: run the network as a training step does (BatchNorm on batch statistics, dropout when a key is
        given); default: whether the model has BatchNorm. ``train=False`` is inference and needs the running
        statistics of a BatchNorm model in ``variables``.
      variables: the model's variables; every collection but ``"params"`` is held fixed (the objective's
        ``state``).
      label_smoothing: for ``"cross_entropy"``, the smoothing of the one-hot targets.

    Returns:
      An :class:`Objective`. Raises ``ValueError`` for an unknown loss, a negative or non-finite ``l2``, or
      inference mode of a BatchNorm model without its statistics.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> model = get_model("mlp", widths=[4], num_classes=3)
        >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> loss, aux = make_objective(model, "mse_onehot", l2=0.1)(params, (x, y), None)
        >>> bool(loss > aux["loss"]), sorted(aux)
        (True, ['correct', 'count', 'loss'])
    """
    per_example = get_loss(loss, label_smoothing=label_smoothing)
    l2 = _checks.real(l2, "l2", low=0.0)
    if variables is not None and not hasattr(variables, "items"):
        raise ValueError("variables must be a dict of collections (e.g. {'params': ..., 'batch_stats': ...})")
    state = {k: v for k, v in dict(variables or {}).items() if k != "params"} or None
    train = model.has_batch_stats if train is None else bool(train)
    if model.has_batch_stats and not train and not (state and "batch_stats" in state):
        raise ValueError(f"model {model.name} has BatchNorm: inference mode (train=False) needs its running "
                         "statistics in variables['batch_stats'], or use train=True (batch statistics)")
    return Objective(model=model, per_example=per_example, l2=float(l2), train=train, state=state)


@struct.dataclass
class _FunctionObjective:
    fn: Callable = struct.field(pytree_node=False)
    takes_key: bool = struct.field(pytree_node=False, default=False)

    def __call__(self, params, batch, key=None):
        return (self.fn(params, batch, key) if self.takes_key else self.fn(params, batch)), {}


def function_objective(fn: Callable[..., jax.Array], *, takes_key: bool = False) -> Callable:
    """Adapt a scalar function of the parameters to the objective protocol ``(params, batch, key) -> (loss, {})``.

    For analytic potentials and hand-written losses. The result hashes by ``fn``: reuse one ``fn`` to reuse
    compiled steps.

    Args:
      fn: ``fn(params, batch) -> scalar`` (with ``takes_key=True``: ``fn(params, batch, key)``).
      takes_key: whether ``fn`` takes the step's PRNG key.

    Returns:
      The objective, a callable pytree with no array leaves.

    Example:
        >>> import jax.numpy as jnp
        >>> obj = function_objective(lambda p, batch: jnp.sum(p["w"] ** 2))
        >>> float(obj({"w": jnp.ones(3)}, None, None)[0])
        3.0
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {fn!r}")
    return _FunctionObjective(fn, bool(takes_key))


def call_objective(objective: Callable, params: PyTree, batch, key) -> tuple[jax.Array, Any]:
    """Call ``objective(params, batch, key)`` and check that it follows the objective protocol. Traceable.

    Args:
      objective: the objective.
      params, batch, key: its arguments.

    Returns:
      ``(loss, aux)``. Raises ``ValueError`` with a clear message when the result is not a pair with a scalar
      loss (e.g. an old-style ``loss_fn(params, batch) -> scalar``).

    Example:
        >>> import jax.numpy as jnp
        >>> call_objective(lambda p, b, k: (jnp.sum(p), {}), jnp.ones(2), None, None)[0].tolist()
        2.0
        >>> call_objective(lambda p, b, k: jnp.sum(p), jnp.ones(2), None, None)
        Traceback (most recent call last):
        ...
        ValueError: the objective must return (loss, aux) ...
    """
    out = objective(params, batch, key)
    if not isinstance(out, tuple) or len(out) != 2:
        got = f"an array of shape {jnp.shape(out)}" if hasattr(out, "shape") else type(out).__name__
        raise ValueError("the objective must return (loss, aux) (the protocol objective(params, batch, key) -> "
                         f"(loss, aux)), got {got}; wrap a scalar loss fn(params, batch) with "
                         "mclandscape.core.objective.function_objective")
    if jnp.shape(out[0]) != ():
        raise ValueError(f"the objective's loss must be a scalar, got shape {jnp.shape(out[0])}")
    return out[0], out[1]


def check_objective(objective: Callable, params: PyTree, batch, key) -> None:
    """Trace ``objective`` once (abstractly, no compilation) to check the protocol before a run.

    Args:
      objective: the objective.
      params, batch, key: example arguments (only their shapes and dtypes matter).

    Returns:
      ``None``; raises ``ValueError`` as :func:`call_objective` does, before any compilation.

    Example:
        >>> import jax.numpy as jnp
        >>> check_objective(lambda p, b, k: (jnp.sum(p * b), {}), jnp.ones(2), jnp.ones(2), None)
        >>> check_objective(lambda p, b, k: (p * b, {}), jnp.ones(2), jnp.ones(2), None)
        Traceback (most recent call last):
        ...
        ValueError: the objective's loss must be a scalar, got shape (2,)...
    """
    if not callable(objective):
        raise ValueError(f"objective must be callable (params, batch, key) -> (loss, aux), got {objective!r}")
    jax.eval_shape(lambda p, b, k: call_objective(objective, p, b, k), params, batch, key)
