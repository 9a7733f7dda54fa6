"""Vertical deformation mappings (VDMs): deform the loss surface to change what the optimiser finds.

Chen, Jin, Du, Li and Liu, 2021 ('Deforming the loss surface to affect the behaviour of the optimizer', AAAI;
arXiv:2009.08274), "the VDM paper" below. A VDM is a scalar map ``δ`` applied to the loss value, ``ℓ̌ = δ(ℓ)``, that
leaves the parameters alone (Definition 2) and is non-decreasing for ``ℓ >= 0``. Its gradient is
``∇δ(ℓ(p)) = δ'(ℓ) ∇ℓ(p)`` (section 3.1), so an optimiser run on ``δ∘ℓ`` is the original optimiser fed
gradients scaled by the loss-dependent factor ``δ'(ℓ)`` (Algorithm 1: ``g(k-1) <- ∇δ(ℓ(p)(k-1))``, then
the optimiser's own increment ``Θ``).

The VDMs of the paper:

- :class:`AP` ``(a1, a2, a3, a4)``: ``δ(ℓ) = a1·arctan(a2·ℓ)^a3 + a4·ℓ`` (arctan-power);
- :class:`LE` ``(e1, e2)``: ``δ(ℓ) = e1·ln(exp(ℓ) − e2)`` (log-exp), defined only where ``exp(ℓ) > e2``;
- :class:`Squared`: ``δ(ℓ) = 0.5·ℓ²``, the counter-example of Fig. 5(a)/Table 1;
- :class:`Identity`: ``δ(ℓ) = ℓ`` (the original optimiser);
- :func:`custom_vdm`: any user-defined ``δ`` (derivative by autodiff unless given), validated to be
  non-decreasing on a range of losses.

Two ways to use one:

- :func:`vdm_loss` wraps a loss function: ``jax.grad(vdm_loss(vdm, f))`` is ``δ'(f)·∇f``;
- :func:`scale_by_vdm` is an Optax ``GradientTransformationExtraArgs`` that multiplies the incoming
  gradient by ``δ'(ℓ)`` where ``ℓ`` arrives through Optax's extra-args interface
  (``tx.update(grads, state, params, loss=value)``; :func:`optax.chain` forwards extra arguments to
  every member). ``optax.chain(scale_by_vdm(LE(1, 0.9)), optax.sgd(lr, momentum=0.9, nesterov=True))``
  therefore performs SGDM on ``δ∘ℓ`` step for step (Algorithm 1).

Composition with other transforms. Put :func:`scale_by_vdm` *first* in the chain: it then acts on the raw
gradient exactly as Algorithm 1 does, and the rest of the chain sees ``∇(δ∘ℓ)``. Transforms that add
terms not coming from the loss after it (``optax.add_decayed_weights``) are not scaled, which matches a
PyTorch training loop where the VDM wraps the criterion and weight decay lives in the optimiser. With an
adaptive optimiser (Adam, RMSProp, ...) the chain still equals that optimiser on ``δ∘ℓ`` exactly, but those
optimisers divide by a running RMS of the gradients, so a slowly varying scalar ``δ'(ℓ)`` is largely
normalised away: only changes of ``δ'`` faster than the second-moment decay (``1/(1−β2)`` steps) change
the steps. Placing the transform *after* the optimiser (``chain(adam(...), scale_by_vdm(vdm))``) is a
different method, a loss-dependent learning rate, and not the paper's Algorithm 1.

Domain. LE is undefined where ``exp(ℓ) <= e2`` (``ℓ <= ln e2``) and AP with a non-integer power needs
``arctan(a2·ℓ) >= 0`` (``ℓ >= 0``). :func:`vdm_loss` raises ``ValueError`` for a concrete loss outside the
domain. :func:`scale_by_vdm` behaves the same eagerly and under ``jit``/``vmap``: at a step whose loss is
outside the domain it outputs zeros instead of the scaled gradient (no ``NaN`` enters the parameters; a
momentum or adaptive optimiser after it may still move on its state), counts the step in
:class:`ScaleByVDMState` with the first such loss and step, and :func:`check_vdm_state` (call it on the
optimiser state, e.g. once per epoch: ``train_model(..., callback=...)``) raises ``ValueError`` naming the
VDM, the loss and the steps. It never raises from inside a step (a host callback raising inside a jitted
step can hang JAX's CPU runtime, cf. jax-ml/jax#25861); only :func:`vdm_loss` offers such a callback
(``check_domain="callback"``), for one-off evaluations.

Slips of the paper handled here (its presets and figure checks live in ``experiments/vdm_presets.py``): AP
accepts ``a4 = 0`` (Table 2 contradicts the stated ``a4 > 0``, see :class:`AP`), and Theorem 1 holds at
critical points only (its proof drops ``δ''(ℓ)·∇ℓ∇ℓᵀ``, see :func:`deformed_hessian_formula`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax

from mclandscape.core._checks import choice, real

__all__ = ["VDM", "AP", "LE", "Squared", "Identity", "CustomVDM", "custom_vdm", "check_monotone", "vdm_loss", "scale_by_vdm", "ScaleByVDMState", "check_vdm_state", "deformed_hessian_formula"]

Array = jax.Array


def _concrete(x):
    """The concrete value of ``x`` (also under eager ``jax.grad``), or ``None`` inside ``jit``/``vmap``."""
    if not isinstance(x, jax.core.Tracer):
        return x
    try:
        return jax.extend.core.concrete_or_error(None, x)
    except jax.errors.ConcretizationTypeError:
        return None


def _pow(x, a: float):
    """``x**a``; an integral ``a`` uses ``lax.integer_pow`` (defined for negative ``x``)."""
    if float(a).is_integer():
        return jax.lax.integer_pow(x, int(a))
    return jnp.power(x, a)


class VDM:
    """A vertical deformation mapping ``δ`` (VDM paper, Definition 2) with ``δ``, ``δ'`` and ``δ''``.

    Subclasses implement :meth:`value` and may override :meth:`derivative` (default: autodiff of
    :meth:`value`) and :meth:`second_derivative` (default: autodiff of :meth:`derivative`). All three are
    element-wise, accept scalars or arrays, and are jit/vmap/grad friendly. ``domain`` is ``(low,
    inclusive)``: ``δ`` is defined for ``ℓ > low`` (``ℓ >= low`` when ``inclusive``).

    A dataclass VDM describes itself as data: ``_coefficients`` names its fields, each validated as a real
    ``> 0`` (``>= 0`` for those in ``_may_be_zero``) and shown in :attr:`name` (``AP(10, 1, 1, 1)``), and
    ``_reason`` (formatted with them) says why the domain ends where it does.
    """

    domain: tuple[float, bool] = (-math.inf, True)
    _coefficients: tuple[str, ...] = ()
    _may_be_zero: tuple[str, ...] = ()
    _reason = ""

    def __post_init__(self):
        for k in self._coefficients:
            object.__setattr__(self, k, real(getattr(self, k), f"{type(self).__name__} coefficient {k}", low=0,
                                             low_open=k not in self._may_be_zero, what="VDM paper, section 3.1"))

    @property
    def name(self) -> str:
        """The class name and the coefficients, e.g. ``AP(10, 1, 1, 1)``."""
        return f"{type(self).__name__}({', '.join(format(getattr(self, k), 'g') for k in self._coefficients)})"

    def value(self, loss):
        raise NotImplementedError

    def derivative(self, loss):
        return jax.grad(lambda l: jnp.sum(self.value(l)))(jnp.asarray(loss))

    def second_derivative(self, loss):
        return jax.grad(lambda l: jnp.sum(self.derivative(l)))(jnp.asarray(loss))

    def __call__(self, loss):
        return self.value(loss)

    def in_domain(self, loss):
        """Boolean array: where ``δ`` is defined at ``loss`` (finite losses only)."""
        loss = jnp.asarray(loss)
        return jnp.isfinite(loss) & ~_outside_domain(self, loss, jnp)

    def domain_message(self, bad_loss: float) -> str:
        low, inclusive = self.domain
        reason = self._reason.format(**{k: getattr(self, k) for k in self._coefficients})
        return (f"{self.name} is undefined at loss {bad_loss!r}: it needs a finite loss {'>=' if inclusive else '>'} "
                f"{low!r}{reason}")


@dataclasses.dataclass(frozen=True)
class AP(VDM):
    """Arctan-power VDM ``δ(ℓ) = a1·arctan(a2·ℓ)^a3 + a4·ℓ`` (VDM paper, section 3.1).

    ``δ'(ℓ) = a1·a3·a2·arctan(a2ℓ)^(a3−1) / (1 + (a2ℓ)²) + a4``: near ``ℓ = 0`` it is ``a4 + a1·a2`` for
    ``a3 = 1`` (steeper low-loss region) and ``a4`` for ``a3 > 1``; for large ``ℓ`` it tends to ``a4``.

    Requires ``a1, a2, a3 > 0`` and ``a4 >= 0``. The paper states ``a4 > 0`` but its own Table 2 uses
    AP(1.5, 0.7, 1, 0); ``a4 = 0`` keeps ``δ' >= 0`` so it is accepted. With an integral ``a3`` ``δ`` is
    defined for every loss; otherwise it needs ``ℓ >= 0`` (``ℓ > 0`` when ``a3 < 1``, where ``δ'(0)``
    is infinite).

    Example:
      >>> vdm = AP(10, 1, 1, 1)
      >>> vdm.name, round(float(vdm.derivative(0.0)), 4)  # a4 + a1 a2 at loss 0: a steeper low-loss region
      ('AP(10, 1, 1, 1)', 11.0)
    """

    a1: float
    a2: float
    a3: float
    a4: float
    _coefficients = ("a1", "a2", "a3", "a4")
    _may_be_zero = ("a4",)  # Table 2 uses AP(1.5, 0.7, 1, 0)
    _reason = " (arctan(a2*loss)**{a3:g} needs a non-negative base for a non-integer power)"

    @property
    def domain(self) -> tuple[float, bool]:
        return (-math.inf, True) if self.a3.is_integer() else (0.0, self.a3 >= 1.0)

    def value(self, loss):
        loss = jnp.asarray(loss)
        return self.a1 * _pow(jnp.arctan(self.a2 * loss), self.a3) + self.a4 * loss

    def derivative(self, loss):
        loss = jnp.asarray(loss)
        u = self.a2 * loss
        return self.a1 * self.a3 * self.a2 * _pow(jnp.arctan(u), self.a3 - 1.0) / (1.0 + u * u) + self.a4


@dataclasses.dataclass(frozen=True)
class LE(VDM):
    """Log-exp VDM ``δ(ℓ) = e1·ln(exp(ℓ) − e2)`` (VDM paper, section 3.1), ``e1, e2 > 0``.

    ``δ'(ℓ) = e1·exp(ℓ)/(exp(ℓ) − e2) = e1/(1 − e2·exp(−ℓ))``: ``e1`` for large losses, growing as the loss
    falls (``e1/(1 − e2)`` at ``ℓ = 0``). Defined only for ``ℓ > ln(e2)``; for ``e2 >= 1`` that excludes
    small non-negative losses, which the paper accepts "in some cases" (section 3.1). Computed as
    ``e1·(ℓ + ln(−expm1(ln e2 − ℓ)))`` so large losses do not overflow ``exp``.

    Example:
      >>> round(float(LE(1, 0.9).derivative(0.0)), 4)  # e1 / (1 - e2)
      10.0
    """

    e1: float
    e2: float
    _coefficients = ("e1", "e2")
    _reason = " (exp(loss) must exceed e2 = {e2:g})"

    @property
    def domain(self) -> tuple[float, bool]:
        return (math.log(self.e2), False)

    def value(self, loss):
        loss = jnp.asarray(loss)
        return self.e1 * (loss + jnp.log(-jnp.expm1(math.log(self.e2) - loss)))

    def derivative(self, loss):
        loss = jnp.asarray(loss)
        return self.e1 / (-jnp.expm1(math.log(self.e2) - loss))


@dataclasses.dataclass(frozen=True)
class Squared(VDM):
    """The counter-example ``δ(ℓ) = 0.5·ℓ²`` of the VDM paper (Table 1, Fig. 5(a)): ``δ' = ℓ`` makes the low-loss
    region *flatter*, the opposite of AP and LE. Non-decreasing for ``ℓ >= 0`` only (Definition 2)."""

    name = "0.5*l^2"

    def value(self, loss):
        return 0.5 * jnp.square(loss)


@dataclasses.dataclass(frozen=True)
class Identity(VDM):
    """``δ(ℓ) = ℓ``: the undeformed loss (the original optimiser)."""

    name = "identity"

    def value(self, loss):
        return jnp.asarray(loss)


@dataclasses.dataclass(frozen=True, eq=False)
class CustomVDM(VDM):
    """A user-defined VDM; build it with :func:`custom_vdm` (which validates monotonicity)."""

    fn: Callable[[Array], Array]
    fn_derivative: Callable[[Array], Array] | None = None
    name: str = "custom"
    domain: tuple[float, bool] = (-math.inf, True)

    def value(self, loss):
        return self.fn(jnp.asarray(loss))

    def derivative(self, loss):
        if self.fn_derivative is None:
            return super().derivative(loss)
        return self.fn_derivative(jnp.asarray(loss))


def check_monotone(vdm: VDM, losses=None, *, atol: float = 0.0) -> None:
    """Check that a VDM is non-decreasing and finite on a grid of losses (VDM paper, Definition 2).

    Args:
      vdm: the :class:`VDM`.
      losses: the losses to check (default below); those outside the VDM's domain are skipped.
      atol: tolerated negative derivative (rounding).

    Raises:
      ValueError: ``δ`` or ``δ'`` is not finite, or ``δ'(ℓ) < -atol``, at a loss of the grid (named).

    Example:
      >>> check_monotone(LE(1, 0.9))  # passes silently
      >>> check_monotone(Squared(), [-1.0, 0.0, 1.0])
      Traceback (most recent call last):
      ...
      ValueError: 0.5*l^2 is not a VDM: delta'(-1) = -1 < 0, ...

    Definition 2 of the VDM paper requires ``∂δ/∂ℓ >= 0`` for ``ℓ >= 0``; the default grid is 2001 losses in
    ``[0, 20]`` restricted to the VDM's domain.
    """
    grid = _domain_grid(vdm, losses)
    vals, der = (np.asarray(f(jnp.asarray(grid))) for f in (vdm.value, vdm.derivative))
    for what, v in (("delta", vals), ("delta'", der)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{vdm.name}: {what} is not finite at loss {grid[~np.isfinite(v)][0]:.6g}")
    neg = der < -atol
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(f"{vdm.name} is not a VDM: delta'({grid[i]:.6g}) = {der[i]:.6g} < 0, but the VDM paper's "
                         "Definition 2 requires d(delta)/d(loss) >= 0 for loss >= 0")


def _domain_grid(vdm: VDM, losses) -> np.ndarray:
    """``losses`` (default 2001 in [0, 20]) inside the VDM's domain, in the default float dtype (float64 under
    ``jax_enable_x64``)."""
    grid = np.asarray(np.linspace(0.0, 20.0, 2001) if losses is None else losses, jnp.result_type(float)).ravel()
    grid = grid[np.asarray(vdm.in_domain(jnp.asarray(grid)))]
    if grid.size == 0:
        raise ValueError(f"{vdm.name}: no loss of the check grid lies in its domain {vdm.domain}")
    return grid


def custom_vdm(fn: Callable[[Array], Array], derivative: Callable[[Array], Array] | None = None, *,
               name: str = "custom", domain_low: float = -math.inf, domain_inclusive: bool = True,
               check_losses=None, derivative_rtol: float = 1e-3) -> CustomVDM:
    """A user-defined VDM ``δ = fn``, validated before use.

    ``fn`` (and ``derivative``, default autodiff of ``fn``) must be element-wise jnp functions. The VDM is
    checked on ``check_losses`` (default 2001 points of ``[0, 20]`` inside the domain): ``δ`` finite and
    ``δ' >= 0`` (Definition 2); a supplied ``derivative`` must agree with autodiff of ``fn`` (relative
    tolerance ``derivative_rtol``). Failures raise ``ValueError`` naming the loss where they happen.

    Args:
      fn: ``δ``, an element-wise jnp function of the loss.
      derivative: ``δ'`` (default: autodiff of ``fn``).
      name: the VDM's name.
      domain_low, domain_inclusive: ``δ`` is defined for ``ℓ > domain_low`` (``>=`` when inclusive).
      check_losses: the validation grid.
      derivative_rtol: tolerance of the check of a given ``derivative`` against autodiff.

    Returns:
      A :class:`CustomVDM`.

    Example:
      >>> v = custom_vdm(lambda l: jnp.log1p(l), name="log1p")
      >>> v.name, round(float(v.derivative(3.0)), 4)
      ('log1p', 0.25)
    """
    if not callable(fn) or not (derivative is None or callable(derivative)):
        raise ValueError("custom_vdm: fn must be callable, and derivative callable or None")
    vdm = CustomVDM(fn=fn, fn_derivative=derivative, name=name, domain=(float(domain_low), bool(domain_inclusive)))
    check_monotone(vdm, check_losses)
    if derivative is not None:
        grid = _domain_grid(vdm, check_losses)
        auto = np.asarray(VDM.derivative(vdm, jnp.asarray(grid)))
        given = np.asarray(vdm.derivative(jnp.asarray(grid)))
        err = np.abs(auto - given) / np.maximum(1.0, np.abs(auto))
        if np.any(err > derivative_rtol):
            i = int(np.argmax(err))
            raise ValueError(f"custom_vdm {name!r}: the given derivative {given[i]:.6g} differs from autodiff of "
                             f"fn {auto[i]:.6g} at loss {grid[i]:.6g}")
    return vdm


def _outside_domain(vdm: VDM, loss, xp=np):
    """Mask of losses at or below the VDM's domain bound, on the host (``xp=np``) or traced (``xp=jnp``). NaN
    is not flagged: a NaN loss is a divergence of training, not a domain violation, and propagates as it
    would without a VDM."""
    low, inclusive = vdm.domain
    return ~xp.isnan(loss) & ~((loss >= low) if inclusive else (loss > low))


def _raise_outside(vdm: VDM, loss) -> None:
    loss = np.asarray(loss, np.float64)
    bad = _outside_domain(vdm, loss)
    if np.any(bad):
        raise ValueError(vdm.domain_message(float(loss[bad][0])))


def vdm_loss(vdm: VDM, loss_fn: Callable[..., Any], *, has_aux: bool = False,
             check_domain: str = "eager") -> Callable[..., Any]:
    """The deformed loss ``δ∘loss_fn`` (VDM paper, section 3.1).

    ``jax.grad(vdm_loss(vdm, f))(p) = δ'(f(p))·∇f(p)``. With ``has_aux`` ``loss_fn`` returns ``(loss,
    aux)`` and the wrapper returns ``(δ(loss), aux)``. For mini-batch training ``δ`` acts on the mini-batch
    mean loss, as a criterion wrapper does in a PyTorch loop.

    ``check_domain``: ``"eager"`` raises ``ValueError`` for a concrete loss outside the VDM's domain
    (under ``jit`` such a loss gives ``NaN``; train with :func:`scale_by_vdm`, which never does);
    ``"callback"`` also raises from inside ``jit`` through an ordered host callback (see the module
    docstring); ``"off"`` checks nothing.
    """
    if not isinstance(vdm, VDM):
        raise ValueError(f"vdm_loss: expected a VDM, got {type(vdm).__name__}")
    choice(check_domain, "check_domain", ("eager", "callback", "off"))

    @functools.wraps(loss_fn)
    def wrapped(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        if has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("vdm_loss(has_aux=True): loss_fn must return (loss, aux)")
        loss, aux = out if has_aux else (out, None)
        if jnp.ndim(loss) != 0:
            raise ValueError(f"vdm_loss: loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
        if check_domain != "off" and vdm.domain[0] != -math.inf:  # VDMs defined for every loss check nothing
            value = _concrete(loss)
            if value is not None:
                _raise_outside(vdm, value)
            elif check_domain == "callback":  # an ordered host callback raises when the computation runs
                jax.debug.callback(functools.partial(_raise_outside, vdm), loss, ordered=True)
        d = vdm.value(loss)
        return (d, aux) if has_aux else d

    return wrapped


class ScaleByVDMState(NamedTuple):
    """State of :func:`scale_by_vdm`: the last factor ``δ'(ℓ)`` and loss (for logging), the number of updates
    seen (``steps``), the number of steps whose loss was outside the VDM's domain (masked: a zero update) and
    the first such loss and its step (``-1`` while there is none)."""

    scale: Array
    loss: Array
    steps: Array
    num_invalid: Array
    invalid_loss: Array
    invalid_step: Array


def scale_by_vdm(vdm: VDM, *, loss_arg: str = "loss",
                 check_domain: str = "skip") -> optax.GradientTransformationExtraArgs:
    """Optax transform multiplying the incoming gradient by ``δ'(ℓ)`` (VDM paper, Algorithm 1).

    ``optax.chain`` forwards extra arguments to every member, so ``optax.chain(scale_by_vdm(vdm),
    optax.sgd(lr, momentum=0.9, nesterov=True))`` updates exactly as SGDM on ``δ∘ℓ``; the engine's
    :func:`~mclandscape.engine.loop.make_step` and :func:`~mclandscape.engine.train.train_model` pass the
    loss as ``loss=``. See the module docstring for composition with weight decay and adaptive optimisers.

    Args:
      vdm: the :class:`VDM`.
      loss_arg: the extra-argument name of the loss, ``tx.update(grads, state, params, loss=value)``; use
        ``"value"`` to share it with ``optax.polyak_sgd`` or ``optax.contrib.reduce_on_plateau``. ``ℓ`` must
        be the loss at which ``grads`` were computed.
      check_domain: ``"skip"`` (default): a loss outside the VDM's domain (e.g. ``ℓ <= ln e2`` for LE) gives a
        zero update, counted in the state and raised by :func:`check_vdm_state`, the same eagerly and under
        ``jit``; ``"off"``: no check (``NaN`` may result). A NaN loss (divergence) is not a domain error.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByVDMState` (its logged factor and
      losses in the parameters' dtype). A missing or non-scalar loss raises ``ValueError``.

    Example:
      >>> tx = scale_by_vdm(LE(1, 0.9))
      >>> u, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), None, loss=jnp.float32(0.0))
      >>> [round(float(x), 4) for x in u], round(float(state.scale), 4)  # the gradient times delta'(0) = 10
      ([10.0, 10.0], 10.0)
    """
    if not isinstance(vdm, VDM):
        raise ValueError(f"scale_by_vdm: expected a VDM, got {type(vdm).__name__}")
    if check_domain not in ("skip", "off"):  # no "callback": check_vdm_state raises on the host instead
        raise ValueError(f"scale_by_vdm: check_domain must be 'skip' or 'off' (a host callback raising inside a "
                         f"training step can hang JAX's CPU runtime, jax-ml/jax#25861), got {check_domain!r}")

    masked = check_domain == "skip" and vdm.domain[0] != -math.inf  # a VDM defined everywhere masks nothing

    def init_fn(params):
        # the logged factor and losses follow the parameters' dtype (float64 under jax_enable_x64)
        floats = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
        dt = jnp.result_type(*floats) if floats else jnp.result_type(float)
        zero, nan = jnp.zeros((), jnp.int32), jnp.full((), jnp.nan, dt)
        return ScaleByVDMState(scale=jnp.ones((), dt), loss=nan, steps=zero, num_invalid=zero, invalid_loss=nan,
                               invalid_step=jnp.full((), -1, jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):  # noqa: ARG001 (optax's signature)
        if loss_arg not in extra_args:
            raise ValueError(f"scale_by_vdm({vdm.name}) needs the loss value: call "
                             f"update(grads, state, params, {loss_arg}=loss)")
        loss = jnp.asarray(extra_args[loss_arg])
        if loss.ndim != 0:
            raise ValueError(f"scale_by_vdm: the loss must be a scalar, got shape {loss.shape}")
        scale = vdm.derivative(loss)
        # a loss outside the domain (never NaN: that is a divergence) zeroes the update and is counted
        bad = _outside_domain(vdm, loss, jnp) if masked else jnp.zeros((), bool)
        first = bad & (state.num_invalid == 0)
        scale = jnp.where(bad, jnp.zeros_like(scale), scale)
        new = jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.zeros_like(g), g * scale).astype(g.dtype), updates)
        dt = state.scale.dtype  # the state keeps its dtype (a scan carry must not change type)
        return new, ScaleByVDMState(scale=scale.astype(dt), loss=loss.astype(dt),
                                    steps=state.steps + 1, num_invalid=state.num_invalid + bad.astype(jnp.int32),
                                    invalid_loss=jnp.where(first, loss.astype(dt), state.invalid_loss),
                                    invalid_step=jnp.where(first, state.steps, state.invalid_step))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_vdm_state(opt_state, vdm: VDM | None = None) -> None:
    """Raise ``ValueError`` if a :func:`scale_by_vdm` inside ``opt_state`` masked a step whose loss was outside
    its VDM's domain.

    Args:
      opt_state: an optimiser state holding one or more :class:`ScaleByVDMState` (e.g. of an ``optax.chain``;
        batched, vmapped states too).
      vdm: names the VDM and its domain in the message (optional).

    Raises:
      ValueError: naming the VDM and its domain, the first loss outside it, at which step, and how many steps
        were masked (host-side: it reads the state's counters, so it never runs inside a computation).
    """
    for st in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByVDMState)):
        if not (isinstance(st, ScaleByVDMState) and np.any(np.asarray(st.num_invalid) > 0)):
            continue
        n = np.asarray(st.num_invalid)
        hit = np.ravel(n > 0)
        loss, step = (np.ravel(np.asarray(a))[hit][0] for a in (st.invalid_loss, st.invalid_step))
        what = vdm.domain_message(float(loss)) if vdm is not None else f"the VDM is undefined at loss {float(loss)!r}"
        batched = f" over {int(hit.sum())} of {n.size} batched states" if n.ndim else ""
        raise ValueError(f"{what}; scale_by_vdm skipped {int(n.sum())} of {int(np.sum(st.steps))} step(s){batched}, the "
                         f"first at step {int(step)} (their update was zeroed: the loss left the VDM's domain, "
                         "e.g. LE(e1, e2) with e2 >= 1 below ln e2; choose a VDM defined there)")


def deformed_hessian_formula(vdm: VDM, loss, grad_vec, hessian):
    """The exact Hessian of ``δ∘ℓ``: ``δ'(ℓ)·H + δ''(ℓ)·∇ℓ∇ℓᵀ`` (dense, flattened parameters).

    The VDM paper's Theorem 1 states ``Ȟ = δ'(ℓ)·H`` (hence ``λ(Ȟ) = δ'(ℓ)·λ(H)``); its proof drops the
    ``δ''(ℓ)·∇ℓ∇ℓᵀ`` term, so the statement is exact only at critical points (``∇ℓ = 0``) or for affine
    ``δ``. ``grad_vec`` is ``∇ℓ`` as a vector ``[d]`` and ``hessian`` is ``H`` ``[d, d]``.
    """
    g, h = jnp.asarray(grad_vec), jnp.asarray(hessian)
    if g.ndim != 1 or h.shape != (g.shape[0], g.shape[0]):
        raise ValueError(f"deformed_hessian_formula: need grad [d] and hessian [d, d], got {g.shape} and {h.shape}")
    return vdm.derivative(loss) * h + vdm.second_derivative(loss) * jnp.outer(g, g)
