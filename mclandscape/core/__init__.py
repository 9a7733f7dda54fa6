"""The core layer: pytree algebra, Bernstein polynomials, connectors and losses (no models, no data)."""
