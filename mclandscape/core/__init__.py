"""The core layer: pytree algebra, Bernstein polynomials, connectors, per-example losses and the one objective.

Pure functions on pytrees and arrays (no models, no data): ``tree``, ``bernstein``, ``connectors``, ``losses``,
``objective``.
"""
