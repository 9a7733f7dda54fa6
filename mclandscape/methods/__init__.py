"""The methods layer: the loss-landscape methods built on the engine.

Surfaces (``surface``), curves (``curves``), nudged elastic bands (``neb``), analytic potentials
(``potentials``), volumes (``volume``), vertical deformation mappings (``deform``, ``simulated``), curvature
(``curvature``), Li et al. directions (``directions``), TRUST-TECH search and its verification (``trusttech``,
``verification``), ensembles (``ensemble``) and permutation alignment (``alignment``).
"""
