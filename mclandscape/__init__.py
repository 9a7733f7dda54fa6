"""mclandscape: the geometry of neural-network loss landscapes in JAX.

Layers, each a subpackage that never imports from a layer above it:

- ``mclandscape.core``: pytree algebra (``tree``), Bernstein polynomials, connectors, losses;
- ``mclandscape.engine``: models, data, the evaluator, the training loop, checkpoints;
- ``mclandscape.methods``: surfaces, curves, NEB, volumes, deformations, curvature, directions, TRUST-TECH
  search and verification, ensembles, permutation alignment, 2-D test potentials;
- ``mclandscape.plots``: matplotlib figures (imported on first use of ``mclandscape.plots``).

The names most scripts need are re-exported here.
"""


from mclandscape import core, engine, methods
from mclandscape.core.bernstein import bernstein, bernstein_derivative
from mclandscape.core.connectors import Connector, bezier_curve, bezier_surface, bilinear_surface, polychain, simplex
from mclandscape.core.losses import accuracy, cross_entropy
from mclandscape.core.objective import Objective, function_objective, make_objective
from mclandscape.core.tree import TreeMismatchError, check_same_structure
from mclandscape.engine import distributed
from mclandscape.engine.batches import BatchStream, batch_stream, iterate_batches
from mclandscape.engine.batchnorm import recalibrate_bn
from mclandscape.engine.checkpoint import latest_step, load_model, restore_checkpoint, save_checkpoint
from mclandscape.engine.connector_train import ConnectorObjective, ConnectorTrainResult, train_connector
from mclandscape.engine.data import Dataset, load_dataset
from mclandscape.engine.evaluate import PointMetrics, evaluate, evaluation_memory
from mclandscape.engine.many import train_many
from mclandscape.engine.models import Model, canonical_name, from_flax, from_nnx, get_model, list_models
from mclandscape.engine.train import TrainConfig, TrainResult, train_model
from mclandscape.methods import potentials, verification
from mclandscape.methods.alignment import (
    Permutation,
    PermutationSpec,
    activation_matching,
    align,
    apply_permutation,
    distance_modulo_permutation,
    permutation_spec,
    weight_matching,
)
from mclandscape.methods.autoneb import auto_neb, evaluate_band
from mclandscape.methods.curvature import dense_hessian, hutchinson_trace, hvp, lanczos, power_iteration
from mclandscape.methods.curves import CurveConfig, curve_length, evaluate_curve, loss_barrier, train_curve
from mclandscape.methods.deform import AP, LE, Identity, Squared, custom_vdm, scale_by_vdm, vdm_loss
from mclandscape.methods.directions import loss_curve, loss_plane, random_direction, random_directions
from mclandscape.methods.dsp_detector import DSPConfig
from mclandscape.methods.ensemble import ensemble_from_params, ensemble_from_probs, member_probs
from mclandscape.methods.flats import flat_from_minima, full_space_flat
from mclandscape.methods.neb import NEBConfig, neb
from mclandscape.methods.surface_grid import evaluate_triangle, merge_best, surface_ensembles, surface_grid
from mclandscape.methods.surface_train import SurfaceConfig, train_surface
from mclandscape.methods.traversal import grid_traversal
from mclandscape.methods.trusttech import dsp_search, tier_by_tier
from mclandscape.methods.verification import output_distance, verify_exit
from mclandscape.methods.verification_result import VerificationResult
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
    "core", "engine", "methods", "plots", "distributed", "potentials", "verification",
    # core
    "bernstein", "bernstein_derivative", "Connector", "bezier_curve", "bezier_surface",
    "bilinear_surface", "polychain", "simplex", "TreeMismatchError", "check_same_structure",
    "accuracy", "cross_entropy", "Objective", "make_objective", "function_objective",
    # engines
    "Model", "from_flax", "from_nnx", "get_model", "list_models", "canonical_name",
    "Dataset", "BatchStream", "batch_stream", "load_dataset", "iterate_batches",
    "TrainState", "make_step", "run", "LoopConfig", "NonFiniteError", "ResumeMismatchError", "StopRun", "RunResult",
    "TrainConfig", "TrainResult", "train_model", "train_many",
    "save_checkpoint", "restore_checkpoint", "latest_step", "load_model",
    "Points", "connector_points", "stacked_points", "plane_points", "map_points", "evaluate", "evaluation_memory",
    "PointMetrics", "recalibrate_bn", "uv_grid",
    "ConnectorObjective", "ConnectorTrainResult", "train_connector",
    # methods
    "SurfaceConfig", "train_surface", "surface_grid", "merge_best", "surface_ensembles", "evaluate_triangle",
    "CurveConfig", "train_curve", "evaluate_curve", "loss_barrier", "curve_length",
    "NEBConfig", "neb", "auto_neb", "evaluate_band",
    "flat_from_minima", "full_space_flat", "grid_traversal", "h_sweep",
    "AP", "LE", "Squared", "Identity", "custom_vdm", "vdm_loss", "scale_by_vdm",
    "hvp", "lanczos", "power_iteration", "hutchinson_trace", "dense_hessian",
    "random_direction", "random_directions", "loss_curve", "loss_plane",
    "DSPConfig", "dsp_search", "tier_by_tier", "verify_exit", "VerificationResult", "output_distance",
    "ensemble_from_probs", "ensemble_from_params", "member_probs",
    "PermutationSpec", "Permutation", "permutation_spec", "weight_matching", "activation_matching",
    "apply_permutation", "align", "distance_modulo_permutation",
]
