"""Checkpoints with orbax-checkpoint: any pytree of arrays plus a small JSON metadata record.

Layout of a checkpoint directory (one orbax ``CheckpointManager`` directory, one sub-directory per step)::

    DIR/<step>/state/      the pytree (orbax StandardSave: tensorstore/OCDBT arrays, no pickle)
    DIR/<step>/metadata/   the caller's JSON metadata (architecture spec, dataset, seed, epoch, metrics, ...)
    DIR/<step>/integrity/  JSON: every leaf's path, shape, dtype and CRC-32, written by mclandscape

The integrity record lets :func:`restore_checkpoint` (1) compare a checkpoint with a ``target`` before
reading any array, so restoring into a different architecture raises a :class:`TreeMismatchError` that
names the first differing leaf, and (2) detect truncated or garbled files: anything orbax cannot read, or
any leaf whose CRC-32 differs, raises :class:`CheckpointError`. Missing directories or steps raise
``FileNotFoundError``.

The training loop (:mod:`mclandscape.engine.train`) stores ``state = {"variables": ..., "opt_state": ...}`` with
metadata ``{"model": model.spec, "dataset": ..., "seed": ..., "epoch": ..., "metrics": ..., ...}``;
:func:`load_model` rebuilds the model and its variables from such a directory alone.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mclandscape.core import _checks
from mclandscape.core.tree import TreeMismatchError, check_same_structure

__all__ = ["CheckpointError", "CheckpointStore", "save_checkpoint", "restore_checkpoint", "read_metadata",
           "latest_step", "all_steps", "load_model", "TreeMismatchError"]

FORMAT = "mclandscape.engine.checkpoint/1"
_ITEMS = ("state", "metadata", "integrity")


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used: corrupt, truncated, or not written by mclandscape."""


# ----------------------------------------------------------------------------------------------------------
# helpers


def _flat(tree) -> dict[str, Any]:
    """``{"variables/params/Dense_0/kernel": leaf, ...}``: container-agnostic leaf paths (a namedtuple
    field, a dict key and a list index all become path components), so a tree restored without a target
    (where orbax turns tuples into lists and namedtuples into dicts) has the same paths as the original."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/") or "<root>": x for path, x in leaves}


def _crc(x) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).tobytes()) & 0xFFFFFFFF


def jsonable(obj, where: str = "metadata"):
    """A JSON-ready copy of ``obj`` (tuples become lists, NumPy/JAX scalars and small arrays Python values; NaN
    and inf are kept, written as ``NaN`` / ``Infinity`` as Python's json does), as it reads back from a
    checkpoint. Anything else that JSON cannot hold raises ``ValueError`` naming where it is."""
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{where}: key {bad[0]!r} is not a string")
        return {k: jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic | np.ndarray | jax.Array) and np.size(obj) <= 10000:
        return np.asarray(obj).tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise ValueError(f"{where}: {type(obj).__name__} value {obj!r:.80} is not JSON-serialisable (arrays of more "
                     "than 10000 values do not belong in metadata)")


def _as_path(directory) -> Path:
    return Path(os.fspath(directory)).expanduser().absolute()


class CheckpointStore(contextlib.AbstractContextManager):  # (__enter__ returns self)
    """An open checkpoint directory (one orbax ``CheckpointManager``); reuse it to save many steps.

    Synchronous saves (a save has finished, atomically, when :meth:`save` returns); orbax writes each step
    into a temporary directory and renames it, so a process killed mid-save leaves no half checkpoint.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike, *, create: bool = True, preservation_policy=None):
        self.directory = _as_path(directory)
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=create,
                                               cleanup_tmp_directories=create, preservation_policy=preservation_policy)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._mngr.close()

    # -- queries
    def all_steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return max(self.all_steps(), default=None)

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps or (step is not None and int(step) not in steps):
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
                                    if steps else f"no checkpoints in {self.directory}")
        return steps[-1] if step is None else int(step)

    # -- save / delete
    def save(self, step: int, state, metadata: Mapping | None = None, *, overwrite: bool = False) -> Path:
        """Save ``state`` (a pytree of arrays / scalars) and ``metadata`` (JSON) as ``step``."""
        step = _checks.integer(step, "checkpoint step", low=0)
        meta, flat = jsonable(dict(metadata or {})), _flat(state)
        for path, x in flat.items():
            if not isinstance(x, np.ndarray | np.generic | jax.Array | int | float | bool):
                raise ValueError(f"state leaf {path} is a {type(x).__name__}; checkpoints hold arrays only")
            if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
                raise ValueError(f"state leaf {path} is a typed PRNG key; store jax.random.key_data(key)")
        if not flat:
            raise ValueError("refusing to save an empty state pytree")
        if step in self.all_steps():
            if not overwrite:
                raise ValueError(f"{self.directory} already holds step {step} (pass overwrite=True)")
            self._mngr.delete(step)
        integrity = {"format": FORMAT, "leaves": {p: {"shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype),
                                                      "crc32": _crc(x)} for p, x in flat.items()}}
        # force=True: orbax would otherwise silently skip any step not above the latest one.
        self._mngr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            metadata=ocp.args.JsonSave(meta),
            integrity=ocp.args.JsonSave(integrity),
        ))
        self._mngr.wait_until_finished()
        return self.directory / str(step)

    def delete(self, step: int) -> None:
        self._mngr.delete(self._resolve(int(step)))

    # -- restore
    def _read_json(self, step: int, item: str) -> dict:
        args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        try:
            out = self._mngr.restore(step, args=args)[item]
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: the {item} record is missing or "
                                  f"corrupt ({type(e).__name__}: {e})") from e
        if not isinstance(out, dict):
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: the {item} record is not a JSON "
                                  f"object")
        return out

    def metadata(self, step: int | None = None) -> dict:
        return self._read_json(self._resolve(step), "metadata")

    def restore(self, step: int | None = None, target=None) -> tuple[Any, dict]:
        """``(state, metadata)`` of ``step`` (default: the latest).

        With ``target`` (a pytree of arrays or ``jax.ShapeDtypeStruct`` shaped like the saved state) the
        state comes back with the target's containers (e.g. optax namedtuples) and a structure, shape or
        dtype mismatch raises :class:`TreeMismatchError` naming the leaf; without, it comes back as
        nested dicts/lists of arrays.
        """
        step = self._resolve(step)
        where = self.directory / str(step)
        integrity = self._read_json(step, "integrity")
        if integrity.get("format") != FORMAT or not isinstance(integrity.get("leaves"), dict):
            raise CheckpointError(f"checkpoint {where} was not written by mclandscape.engine.checkpoint "
                                  f"(integrity format {integrity.get('format')!r})")
        records = integrity["leaves"]
        metadata = self._read_json(step, "metadata")
        if target is not None:
            saved = {p: jax.ShapeDtypeStruct(tuple(r["shape"]), np.dtype(r["dtype"])) for p, r in records.items()}
            wanted = {p: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for p, x in _flat(target).items()}
            try:
                check_same_structure(saved, wanted, names=("the checkpoint", "the target"))
            except TreeMismatchError as e:
                spec = metadata.get("model")
                hint = f" (the checkpoint holds a {spec['arch']!r} model)" if isinstance(spec, dict) and "arch" in spec else ""
                raise TreeMismatchError(f"cannot restore {where} into the target{hint}: {e}") from e
        abstract = None if target is None else jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types on damaged files
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {type(e).__name__}: {e}") from e
        got = _flat(state)
        bad = sorted(set(got) ^ set(records)) or [p for p, r in records.items() if _crc(got[p]) != r["crc32"]]
        if bad:
            raise CheckpointError(f"checkpoint {where} is corrupt: leaf {bad[0]} is absent from its arrays or its "
                                  "integrity record, or fails its CRC-32 check")
        return state, metadata


# ----------------------------------------------------------------------------------------------------------
# functional API


def save_checkpoint(directory: str | os.PathLike, step: int, state, metadata: Mapping | None = None, *,
                    overwrite: bool = False) -> Path:
    """Save ``state`` (any pytree of arrays: model variables, optimizer state, ...) as step ``step`` of
    ``directory`` with a JSON ``metadata`` record. Returns the step directory."""
    with CheckpointStore(directory, create=True) as store:
        return store.save(step, state, metadata, overwrite=overwrite)


def restore_checkpoint(directory: str | os.PathLike, step: int | None = None, target=None) -> tuple[Any, dict]:
    """``(state, metadata)`` of ``step`` (default: the latest) of ``directory``.

    ``target``: a pytree shaped like the saved state (arrays or ``ShapeDtypeStruct``); mismatches raise
    :class:`TreeMismatchError` naming the leaf. A missing directory or step raises ``FileNotFoundError``;
    damaged files raise :class:`CheckpointError`."""
    with CheckpointStore(directory, create=False) as store:
        return store.restore(step, target)


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON metadata of ``step`` (default: the latest) without reading any array."""
    with CheckpointStore(directory, create=False) as store:
        return store.metadata(step)


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Saved steps in ascending order (``[]`` when the directory does not exist)."""
    if not _as_path(directory).is_dir():
        return []
    with CheckpointStore(directory, create=False) as store:
        return store.all_steps()


def latest_step(directory: str | os.PathLike) -> int | None:
    """The largest saved step, or ``None`` when there is none (or no directory)."""
    return max(all_steps(directory), default=None)


def load_model(directory: str | os.PathLike, step: int | None = None, *, model=None):
    """Rebuild ``(model, variables, metadata)`` from a checkpoint directory.

    Args:
      directory: a checkpoint directory (as :func:`mclandscape.engine.train.train_model` writes it).
      step: the step to read (default: the latest).
      model: the :class:`~mclandscape.engine.models.Model` the checkpoint was written with. Needed for a model
        the zoo cannot rebuild from its spec (one built by ``from_flax``, ``from_nnx`` or by hand; such specs
        hold no ``"kwargs"``); without it the zoo model of ``metadata["model"]`` is rebuilt. When the metadata
        records a spec, ``model.spec`` must equal it, else :class:`CheckpointError` names both.

    Returns:
      ``(model, variables, metadata)``. The state may be the training loop's (``{"params", "model_state",
      ...}``), an older ``{"variables": ...}`` or the variables themselves. When the metadata records
      ``"input_shape"`` the variables are checked against a fresh ``model.init`` (a
      :class:`~mclandscape.core.tree.TreeMismatchError` names the first differing leaf).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> from mclandscape.engine.models import get_model
        >>> net = get_model("mlp", widths=[4], num_classes=3)
        >>> v = net.init(jax.random.key(0), jnp.ones((1, 5)))
        >>> d = tempfile.mkdtemp()
        >>> _ = save_checkpoint(d, 1, {"variables": v}, {"model": net.spec, "input_shape": [5]})
        >>> model, variables, meta = load_model(d)
        >>> kernel = variables["params"]["Dense_0"]["kernel"]
        >>> model.spec == net.spec, bool(jnp.all(kernel == v["params"]["Dense_0"]["kernel"]))
        (True, True)
    """
    from mclandscape.engine.models import get_model
    from mclandscape.engine.models.base import check_variables

    state, metadata = restore_checkpoint(directory, step)
    if metadata.get("stacked"):
        raise CheckpointError(f"checkpoint {directory} holds {len(metadata['stacked'].get('seeds', []))} stacked runs "
                              "(train_many with a stacked strategy): read it with restore_checkpoint and index the "
                              "seed axis (axis 0) of its leaves; load_model reads one model's checkpoint")
    spec = metadata.get("model")
    if model is None:
        if not isinstance(spec, dict) or "kwargs" not in spec:  # from_flax / from_nnx: a name alone could match
            raise CheckpointError(f"checkpoint {directory} records no zoo model spec (metadata['model'] is {spec!r}: "
                                  "a user model's, or none); pass the model you trained as model=")
        try:
            model = get_model(spec)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {directory} holds a model the zoo cannot rebuild ({e}); pass the "
                                  "model you trained as model=") from e
    elif spec is not None and jsonable(spec) != jsonable(getattr(model, "spec", None), "model spec"):
        raise CheckpointError(f"checkpoint {directory} was written by a model with spec {spec!r} but model= "
                              f"{getattr(model, 'name', model)!r} has spec {getattr(model, 'spec', None)!r}")
    if isinstance(state, dict) and "params" in state and "nonfinite" in state:  # the training loop's state
        variables = {**dict(state.get("model_state") or {}), "params": state["params"]}
    else:
        variables = state.get("variables", state) if isinstance(state, dict) else state
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    if metadata.get("input_shape") is not None:
        check_variables(model, variables, jax.ShapeDtypeStruct((1, *metadata["input_shape"]), jnp.float32),
                        name="the checkpoint", check_dtype=True)
    return model, variables, metadata
