"""mclandscape: the geometry of neural-network loss landscapes in JAX.

Layers, each a subpackage that never imports from a layer above it:

- ``mclandscape.core``: pytree algebra (``tree``), Bernstein polynomials, connectors, losses;
- ``mclandscape.engine``: models, data, the evaluator, the training loop, checkpoints;
- ``mclandscape.methods``: surfaces, curves, NEB, volumes, deformations, curvature, directions, TRUST-TECH
  search and verification, ensembles, permutation alignment, 2-D test potentials;
- ``mclandscape.plots``: matplotlib figures (imported on first use of ``mclandscape.plots``).

The names most scripts need (at most 70) are re-exported here; everything else is imported from its module.
"""


from mclandscape import core, engine, methods
from mclandscape.core.connectors import Connector, bezier_curve, bezier_surface, bilinear_surface, polychain, simplex
from mclandscape.core.objective import function_objective, make_objective
from mclandscape.core.tree import TreeMismatchError
from mclandscape.engine import distributed
from mclandscape.engine.batches import batch_stream
from mclandscape.engine.checkpoint import load_model, restore_checkpoint
from mclandscape.engine.data import Dataset, load_dataset
from mclandscape.engine.evaluate import evaluate
from mclandscape.engine.loop import LoopConfig, NonFiniteError, StopRun, run
from mclandscape.engine.many import train_many
from mclandscape.engine.models import from_flax, from_nnx, get_model
from mclandscape.engine.optim import transform
from mclandscape.engine.points import Points, connector_points, map_points, plane_points, stacked_points, uv_grid
from mclandscape.engine.resume import ResumeMismatchError
from mclandscape.engine.step import make_step
from mclandscape.engine.train import TrainConfig, train_model
from mclandscape.methods.alignment import align, permutation_spec, weight_matching
from mclandscape.methods.autoneb import auto_neb, evaluate_band
from mclandscape.methods.curvature import hutchinson_trace, top_hessian_eigenvalues
from mclandscape.methods.curves import CurveConfig, evaluate_curve, loss_barrier, train_curve
from mclandscape.methods.deform import AP, LE, scale_by_vdm, vdm_loss
from mclandscape.methods.directions import loss_curve, loss_plane, random_directions
from mclandscape.methods.dsp_detector import DSPConfig
from mclandscape.methods.flats import flat_from_minima
from mclandscape.methods.neb import NEBConfig, neb
from mclandscape.methods.surface_grid import merge_best, surface_grid
from mclandscape.methods.surface_train import SurfaceConfig, train_surface
from mclandscape.methods.traversal import grid_traversal
from mclandscape.methods.trusttech import dsp_search, tier_by_tier
from mclandscape.methods.verification import verify_exit
from mclandscape.methods.volume import h_sweep

__version__ = "0.1.0"


def __getattr__(name: str):
    # matplotlib is imported only when plots are asked for
    if name == "plots":
        import importlib

        return importlib.import_module("mclandscape.plots")
    raise AttributeError(f"module 'mclandscape' has no attribute {name!r}")


__all__ = [
    # subpackages
    "core", "engine", "methods", "plots", "distributed",
    # core
    "Connector", "bezier_curve", "bezier_surface", "bilinear_surface", "polychain", "simplex", "TreeMismatchError",
    "make_objective", "function_objective",
    # engine: models, data, training, checkpoints, evaluation
    "get_model", "from_flax", "from_nnx", "uv_grid", "Dataset", "load_dataset", "batch_stream",
    "make_step", "run", "LoopConfig", "StopRun", "NonFiniteError", "ResumeMismatchError", "transform",
    "TrainConfig", "train_model", "train_many", "load_model", "restore_checkpoint",
    "Points", "connector_points", "plane_points", "stacked_points", "evaluate", "map_points",
    # methods
    "SurfaceConfig", "train_surface", "surface_grid", "merge_best",
    "CurveConfig", "train_curve", "evaluate_curve", "loss_barrier",
    "NEBConfig", "neb", "auto_neb", "evaluate_band",
    "flat_from_minima", "grid_traversal", "h_sweep",
    "AP", "LE", "scale_by_vdm", "vdm_loss",
    "top_hessian_eigenvalues", "hutchinson_trace", "random_directions", "loss_curve", "loss_plane",
    "DSPConfig", "dsp_search", "tier_by_tier", "verify_exit",
    "permutation_spec", "weight_matching", "align",
]
