"""Argument checks shared by the package: each names the argument and the problem, and converts nothing inexactly.

A non-number (a string, ``None``, a pytree) is a ``TypeError``; a number of the wrong kind or range (``2.5``
for a count, ``-1`` for a size, ``nan`` for a rate) is a ``ValueError``. An integral float (``3.0``) is
accepted as an integer: nothing is rounded.

Example:
    >>> integer(3.0, "steps", low=1), real(0.5, "lr", low=0, low_open=True), probability(1, "q")
    (3, 0.5, 1.0)
    >>> integer(2.5, "steps")
    Traceback (most recent call last):
    ValueError: steps must be an integer, got 2.5
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

__all__ = ["integer", "real", "probability", "choice"]


def _what(what: str | None) -> str:
    return f" ({what})" if what else ""


def integer(value, name: str, *, low: int | None = None, what: str | None = None) -> int:
    """``value`` as an ``int``, checked to be a whole number ``>= low``.

    Args:
      value: a Python or NumPy integer, or an integral float.
      name: the argument's name, for the message.
      low: the smallest value allowed (``None``: any).
      what: what the argument means, added to the message.

    Returns:
      ``int(value)``; ``TypeError`` for a non-number or a bool, ``ValueError`` for a fraction or a value
      below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be an integer{_what(what)}, got {type(value).__name__} {value!r:.60}")
    if not float(value).is_integer():
        raise ValueError(f"{name} must be an integer{_what(what)}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an integer >= {low}{_what(what)}, got {value!r}")
    return int(value)


def real(value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         what: str | None = None) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Returns:
      ``float(value)``; ``TypeError`` for a non-number or a bool, ``ValueError`` for a non-finite value or one
      out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number{_what(what)}, got {type(value).__name__} {value!r:.60}")
    v = float(value)
    below = low is not None and (v <= low if low_open else v < low)
    if not math.isfinite(v) or below or (high is not None and v > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{lo}, {hi}]{_what(what)}, "
                         f"got {value!r}")
    return v


def probability(value, name: str, *, what: str | None = None) -> float:
    """``value`` as a float in ``[0, 1]`` (:func:`real` with those bounds)."""
    return real(value, name, low=0.0, high=1.0, what=what)


def choice(value, name: str, choices: Collection) -> object:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {sorted(map(str, choices))}, got {value!r}")
    return value
