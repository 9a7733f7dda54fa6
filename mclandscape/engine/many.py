"""Several seeds of one training run: :func:`train_many`, one after another or stacked in one compiled step.

The stacked way trains S independent members at once through
:class:`~mclandscape.engine.step.MembersObjective` (the sum of their objectives, whose gradient is every
member's own) and a transform applied per member::

    corners = train_many(model, train, test, cfg, seeds=(0, 1, 2, 3))   # four independent corners
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from mclandscape.core import _checks
from mclandscape.engine import cpu, mapping
from mclandscape.engine.batches import num_batches
from mclandscape.engine.data import Dataset
from mclandscape.engine.models.base import Model
from mclandscape.engine.train import TrainConfig, TrainResult, _to_key, _train, train_model

__all__ = ["train_many", "MANY_STRATEGIES"]

MANY_STRATEGIES = ("auto", "sequential", "vmap", "unroll")


# ``"auto"`` stacks the seeds when the dispatches it saves, (seeds - 1) per step, are at least this many: the
# stacked step takes longer to compile, which the saved dispatches must pay back (benchmarks/train_many.py
# measures both; see train_many's docstring)
AUTO_STACK_MIN_SAVED_STEPS = 5000


def _many_strategy(strategy: str, model: Model, train: Dataset, config: TrainConfig, seeds: list[int],
                   checkpoint_dir) -> str:
    """The way :func:`train_many` trains, ``"auto"`` resolved by the rule in its docstring."""
    if _checks.choice(strategy, "strategy", MANY_STRATEGIES) != "auto":
        return strategy
    if len(seeds) == 1 or checkpoint_dir is not None:
        return "sequential"  # one directory per seed, each a run load_model reads
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *train.input_shape), train.x.dtype))
    if mapping.resolve("auto", len(seeds), has_conv=cpu.has_conv(shapes.get("params", shapes)), grad=True)[0] == "unroll":
        return "sequential"  # where stacked convolutions would be unrolled, one run per seed is as fast
    saved = (len(seeds) - 1) * config.epochs * num_batches(len(train), config.batch_size, config.drop_last)
    return "vmap" if saved >= AUTO_STACK_MIN_SAVED_STEPS else "sequential"


def train_many(model: Model, train: Dataset, test: Dataset | None, config: TrainConfig, seeds: Sequence[int], *,
               checkpoint_dir: str | os.PathLike | None = None, save_epochs: Sequence[int] = (),
               checkpoint_every: int = 1, keep: int = 1, progress: bool | None = None, overwrite: bool = False,
               devices: int | None = None, strategy: str = "auto") -> list[TrainResult]:
    """Independent runs of :func:`train_model`, one per seed (e.g. the four corners of a surface).

    Every way gives each seed the initialisation, batch order, augmentation and dropout keys of
    ``train_model(seed=s)``, and the results agree with it to float rounding per step:

    - ``"sequential"``: one :func:`train_model` after another (each data-parallel over the devices), sharing
      one compiled step; checkpoints in ``checkpoint_dir/seed_<seed>``, each a run :func:`load_model` reads.
    - ``"vmap"``: every seed in one compiled step (:class:`~mclandscape.engine.step.MembersObjective`):
      parameters, optimizer states (the Optax transform applied per seed, so clipping by the global norm and schedules act per seed) and
      BatchNorm statistics stacked over a leading seed axis; one :func:`~mclandscape.engine.loop.run` (one
      dispatch per step for all seeds). With several devices the seeds are split over the ``"points"`` axis
      of :func:`~mclandscape.engine.distributed.training_mesh` (``gcd(devices, len(seeds))`` devices, a
      whole number of seeds each) and each batch over ``"data"``, across the processes of a multi-process job.
      One checkpoint directory ``checkpoint_dir/vmap_seeds_<s0>_<s1>...`` holds the stacked run (a
      fingerprint of every seed's run; resumed bit-identically; its metadata's ``"stacked"`` says so, and
      :func:`~mclandscape.engine.checkpoint.load_model` refuses it and names the alternative: read it with
      :func:`~mclandscape.engine.checkpoint.restore_checkpoint` and index the seed axis). ``save_epochs``
      snapshots are kept per seed. A non-finite step of any seed stops all of them.
    - ``"unroll"``: as ``"vmap"`` but the seeds' forward and backward passes are written out one after
      another inside the compiled step (XLA's CPU backend runs vmapped convolutions, one kernel per seed, as
      slow grouped convolutions); with a ``"points"`` split over several devices the seeds are vmapped.
      Checkpoints in ``checkpoint_dir/unroll_seeds_...``.
    - ``"auto"``: ``"sequential"`` for one seed, with a ``checkpoint_dir`` (per-seed directories) and, on CPU,
      for convolutional models; otherwise ``"vmap"`` when the dispatches it saves,
      ``(len(seeds) - 1) * epochs * steps_per_epoch``, reach ``AUTO_STACK_MIN_SAVED_STEPS`` (5000), else
      ``"sequential"``. Why: the stacked step saves a dispatch per seed and step but compiles longer, and
      on CPU a vmapped convolution becomes a slow grouped one; ``benchmarks/train_many.py`` measures the
      epoch time, the compile time and the dispatches saved (the constant was set from its runs on a 2-core
      CPU, where the figures moved with the machine's load; off CPU the rule is not measured: rerun it with
      ``--real``). Below the count, ``"sequential"`` also keeps every seed bit-identical to
      ``train_model(seed=s)``.

    "To float rounding" holds per step; over many steps of a ReLU network a rounding difference can move a
    seed's trajectory, as a 1e-7 relative change of its initialisation does (the benchmark reports both).

    Args:
      model, train, test, config: as for :func:`train_model`.
      seeds: distinct seeds, one run each.
      checkpoint_dir: where the runs checkpoint (and resume), laid out as above.
      save_epochs, checkpoint_every, keep, progress, overwrite, devices: as for :func:`train_model`.
      strategy: ``"auto"``, ``"sequential"``, ``"vmap"`` or ``"unroll"`` (``MANY_STRATEGIES``).

    Returns:
      One :class:`TrainResult` per seed, in the order of ``seeds`` (host-local arrays on every process of a
      multi-process job). Raises ``ValueError`` for no seeds, repeated seeds or an unknown ``strategy``.

    Example:
        >>> from mclandscape.engine.data import load_dataset
        >>> from mclandscape.engine.models import get_model
        >>> net, iris = get_model("mlp", widths=[4], num_classes=3), load_dataset("iris", "train")
        >>> cfg = TrainConfig(epochs=2, batch_size=60)
        >>> runs = train_many(net, iris, None, cfg, seeds=(0, 1), strategy="vmap", progress=False)
        >>> one = train_model(net, iris, None, cfg, seed=1, progress=False)
        >>> [r.seed for r in runs], [r.epoch for r in runs], sorted(runs[1].final)
        ([0, 1], [2, 2], ['epoch', 'lr', 'test_acc', 'test_loss', 'train_acc', 'train_loss'])
        >>> bool(abs(runs[1].final["train_loss"] - one.final["train_loss"]) < 1e-5)
        True
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_many needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    how = _many_strategy(strategy, model, train, config, seeds, checkpoint_dir)
    kw = dict(save_epochs=save_epochs, checkpoint_every=checkpoint_every, keep=keep, progress=progress,
              overwrite=overwrite, devices=devices)
    root = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
    if how != "sequential":
        cdir = None if root is None else os.path.join(root, f"{how}_seeds_" + "_".join(map(str, seeds)))
        return _train(model, train, test, config, seeds, [_to_key(None, s) for s in seeds], how=how,
                      checkpoint_dir=cdir, **kw)
    return [train_model(model, train, test, config, seed=s,
                        checkpoint_dir=None if root is None else os.path.join(root, f"seed_{s}"), **kw) for s in seeds]
