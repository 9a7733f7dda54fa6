"""mclandscape: the geometry of neural-network loss landscapes in JAX.

Layers (never importing upwards): core (``tree``, ``bernstein``, ``connectors``, ``losses``) -> engines
(``models``, ``data``, ``train``, ``checkpoint``, ``evaluate``, ``connector_train``) -> methods (``surface``,
``curves``, ``neb``, ``volume``, ``deform``, ``curvature``, ``directions``, ``trusttech``, ``ensemble``) ->
``experiments/``. Every submodule is importable as ``mclandscape.<name>``; the names most scripts need
are re-exported here.
"""

from . import (
    bernstein,
    checkpoint,
    connector_train,
    connectors,
    curvature,
    curves,
    data,
    deform,
    directions,
    ensemble,
    evaluate,
    losses,
    models,
    neb,
    surface,
    train,
    tree,
    trusttech,
    volume,
)
from .bernstein import bernstein as bernstein_basis
from .bernstein import bernstein_derivative
from .checkpoint import latest_step, load_model, restore_checkpoint, save_checkpoint
from .connector_train import ConnectorTrainResult, fit_connector, train_connector
from .connectors import Connector, bezier_curve, bezier_surface, bilinear_surface, polychain, simplex
from .curvature import dense_hessian, hutchinson_trace, hvp, lanczos, power_iteration
from .curves import curve_length, evaluate_curve, evaluate_path, loss_barrier, train_curve
from .data import Dataset, iterate_batches, load_dataset
from .deform import AP, LE, Identity, Squared, custom_vdm, scale_by_vdm, vdm_loss
from .directions import loss_curve, loss_plane, random_direction, random_directions
from .ensemble import ensemble_from_params, ensemble_from_probs, member_probs
from .evaluate import PointMetrics, evaluate_params, evaluate_points, recalibrate_bn, uv_grid
from .losses import accuracy, cross_entropy
from .models import Model, canonical_name, from_flax, get_model, list_models
from .neb import NEBConfig, auto_neb, evaluate_band
from .neb import neb as nudged_elastic_band
from .surface import evaluate_triangle, merge_best, surface_ensembles, surface_grid, train_surface
from .train import TrainConfig, batch_stream, params_loss, train_many, train_model
from .tree import TreeMismatchError, check_same_structure
from .trusttech import DSPConfig, VerificationResult, dsp_search, mlp_symmetry_distance, tier_by_tier, verify_exit
from .volume import flat_from_minima, full_space_flat, grid_traversal, h_sweep

__version__ = "0.1.0"

__all__ = [
    # submodules
    "bernstein", "checkpoint", "connector_train", "connectors", "curvature", "curves", "data", "deform",
    "directions", "ensemble", "evaluate", "losses", "models", "neb", "surface", "train", "tree", "trusttech",
    "volume",
    # core
    "bernstein_basis", "bernstein_derivative", "Connector", "bezier_curve", "bezier_surface",
    "bilinear_surface", "polychain", "simplex", "TreeMismatchError", "check_same_structure",
    "accuracy", "cross_entropy",
    # engines
    "Model", "from_flax", "get_model", "list_models", "canonical_name", "params_loss", "batch_stream",
    "Dataset", "load_dataset", "iterate_batches", "TrainConfig",
    "train_model", "train_many", "save_checkpoint", "restore_checkpoint", "latest_step", "load_model",
    "PointMetrics", "evaluate_params", "evaluate_points", "recalibrate_bn", "uv_grid",
    "ConnectorTrainResult", "fit_connector", "train_connector",
    # methods
    "train_surface", "surface_grid", "merge_best", "surface_ensembles", "evaluate_triangle",
    "train_curve", "evaluate_curve", "evaluate_path", "loss_barrier", "curve_length",
    "NEBConfig", "nudged_elastic_band", "auto_neb", "evaluate_band",
    "flat_from_minima", "full_space_flat", "grid_traversal", "h_sweep",
    "AP", "LE", "Squared", "Identity", "custom_vdm", "vdm_loss", "scale_by_vdm",
    "hvp", "lanczos", "power_iteration", "hutchinson_trace", "dense_hessian",
    "random_direction", "random_directions", "loss_curve", "loss_plane",
    "DSPConfig", "dsp_search", "tier_by_tier", "verify_exit", "VerificationResult", "mlp_symmetry_distance",
    "ensemble_from_probs", "ensemble_from_params", "member_probs",
]
