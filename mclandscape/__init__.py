"""mclandscape: the geometry of neural-network loss landscapes in JAX."""

from . import bernstein, connectors, evaluate, losses, tree
from .bernstein import bernstein as bernstein_basis
from .bernstein import bernstein_derivative
from .connectors import Connector, bezier_curve, bezier_surface, bilinear_surface, polychain, simplex
from .evaluate import PointMetrics, evaluate_params, evaluate_points, recalibrate_bn, uv_grid
from .losses import accuracy, cross_entropy
from .tree import TreeMismatchError, check_same_structure

__version__ = "0.1.0"

__all__ = [
    "bernstein", "connectors", "evaluate", "losses", "tree",
    "bernstein_basis", "bernstein_derivative",
    "Connector", "bezier_curve", "bezier_surface", "bilinear_surface", "polychain", "simplex",
    "PointMetrics", "evaluate_params", "evaluate_points", "recalibrate_bn", "uv_grid",
    "accuracy", "cross_entropy", "TreeMismatchError", "check_same_structure",
]
