"""Several devices and several processes, through JAX's own multi-controller runtime.

One program runs as N processes (one per host, or several on one machine for testing); each sees every
device of the job (``jax.devices()``) and drives its own (``jax.local_devices()``). :func:`initialize` is a
thin wrapper over ``jax.distributed.initialize`` that checks its arguments before anything starts (JAX's
CPU collectives, gloo, let the same program run as N processes on one machine and on a GPU cluster). The
engine's meshes span all devices of all processes (:func:`mesh`); inputs become global arrays
(:func:`replicate`, :func:`shard`), and what a method returns to its caller is a host value, equal on every
process (:func:`to_host`).

Launching (every process runs the same command):

- one machine, N processes: ``python -m experiments.X --distributed --coordinator 127.0.0.1:PORT
  --num-processes N --process-id I`` for I = 0..N-1 (or call :func:`initialize` with those arguments);
- a SLURM GPU cluster: ``srun python -m experiments.X --distributed`` — ``jax.distributed.initialize``
  reads the coordinator, the process count and the process id from SLURM's environment.

A process that dies makes the others fail within ``heartbeat_timeout_seconds`` with JAX's "another task
died" error instead of hanging; restarting every process resumes from the last checkpoint.

Example (one process: nothing to start, every helper is the identity or a plain device put):
    >>> import numpy as np
    >>> is_main_process()
    True
    >>> to_host(replicate(np.arange(3.0))).tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mclandscape.core import _checks
from mclandscape.core.tree import PyTree

__all__ = ["initialize", "is_main_process", "mesh", "training_mesh", "put", "replicate", "shard",
           "num_devices", "to_host", "local", "sync"]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_devices: int | None = None,
               heartbeat_timeout_seconds: int = 100, initialization_timeout: int = 300) -> None:
    """Join (or start) a multi-process JAX job; call it before any other JAX work.

    On CPU the collectives are JAX's default, gloo (``jax_cpu_collectives_implementation``, since JAX 0.10);
    other backends use their own (NCCL on GPU).

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator; ``None`` lets JAX detect the cluster
        (SLURM, Open MPI, Kubernetes, TPU pods) from the environment.
      num_processes: the job's size (``None``: detected).
      process_id: this process's index in ``[0, num_processes)`` (``None``: detected).
      local_devices: CPU only: how many host devices this process exposes (``jax_num_cpu_devices``), to test
        a multi-device, multi-process layout on one machine.
      heartbeat_timeout_seconds: how long the job waits for a silent process before failing every process.
      initialization_timeout: how long to wait for all processes to connect.

    Returns:
      ``None``. Raises ``ValueError`` for inconsistent arguments (checked before anything is started).

    Example:
        >>> initialize("127.0.0.1:1234", num_processes=2, process_id=2)
        Traceback (most recent call last):
        ...
        ValueError: process_id must lie in [0, 2), got 2
    """
    for name, v, low in (("num_processes", num_processes, 1), ("process_id", process_id, 0),
                         ("local_devices", local_devices, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low):
            raise ValueError(f"{name} must be an integer >= {low} (or None), got {v!r}")
    if (num_processes is None) != (process_id is None):
        raise ValueError("give both num_processes and process_id, or neither (to detect them from the cluster)")
    if num_processes is not None and not process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes}), got {process_id}")
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
                               initialization_timeout=int(initialization_timeout))


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes results and plots.

    Returns:
      A ``bool``.

    Example:
        >>> is_main_process()
        True
    """
    return jax.process_index() == 0


def num_devices(devices: int | None) -> int:
    """How many of the job's devices ``devices`` asks for (``None``: all), or a ``ValueError`` naming it.

    Args:
      devices: ``None`` or an integer in ``[1, len(jax.devices())]``.

    Returns:
      The count.

    Example:
        >>> num_devices("cpu")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: devices must be None (all devices) or a number of devices in [1, ...], got 'cpu'
    """
    avail = len(jax.devices())
    if devices is None:
        return avail
    if isinstance(devices, bool) or not isinstance(devices, int | np.integer) or not 1 <= devices <= avail:
        raise ValueError(f"devices must be None (all devices) or a number of devices in [1, {avail}], got {devices!r}")
    return int(devices)


def mesh(shape: Sequence[int] | None = None, axes: Sequence[str] = ("points",), *,
         devices: int | None = None) -> jax.sharding.Mesh:
    """A mesh over the first ``devices`` devices of the job (default all, across every process).

    Args:
      shape: the mesh shape (default: all devices on the first axis, 1 on the others).
      axes: the axis names.
      devices: how many of the job's devices to use (default all).

    Returns:
      A ``jax.sharding.Mesh``. Raises ``ValueError`` when the shape does not use exactly that many devices.

    Example:
        >>> m = mesh(devices=1)
        >>> m.axis_names, m.devices.shape
        (('points',), (1,))
    """
    n, axes = num_devices(devices), tuple(axes)
    shape = (n,) + (1,) * (len(axes) - 1) if shape is None else tuple(int(s) for s in shape)
    if len(shape) != len(axes) or int(np.prod(shape)) != n:
        raise ValueError(f"a mesh of shape {shape} over axes {axes} needs {int(np.prod(shape))} devices, "
                         f"have {n}")
    # Auto axes: the engine places arrays and states sharding constraints itself (make_mesh's default is
    # Explicit axes, under which with_sharding_constraint refuses a NamedSharding)
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=jax.devices()[:n])


def training_mesh(batch_size: int, num_points: int = 1, *, devices: int | None = None) -> jax.sharding.Mesh | None:
    """The ``("points", "data")`` mesh a training step uses, or ``None`` for one device.

    With ``n`` devices (default all of the job's): the ``num_points`` points a step evaluates (a connector's
    k samples) are split over ``p = gcd(n, num_points)`` devices and each batch over ``gcd(n / p, batch_size)``,
    so every device holds a whole number of points and examples. Points come first: each point is a whole
    forward and backward pass, while splitting a batch adds a gradient reduction per point (on CPU with
    forced host devices neither is faster; the split matters on accelerators).

    Args:
      batch_size: examples per batch (``>= 1``).
      num_points: points evaluated per step (``>= 1``).
      devices: how many of the job's devices to consider (default all).

    Returns:
      A ``jax.sharding.Mesh``, or ``None`` when the layout uses a single device.

    Example:
        >>> training_mesh(64, devices=1) is None
        True
    """
    n = num_devices(devices)
    points = int(np.gcd(n, _checks.integer(num_points, "num_points", low=1)))
    data = int(np.gcd(n // points, _checks.integer(batch_size, "batch_size", low=1)))
    if points * data == 1:
        return None
    return mesh((points, data), ("points", "data"), devices=points * data)


def put(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """Every leaf of ``tree`` placed with ``sharding``.

    Takes host values or local arrays that every process holds in full (each process contributes the pieces
    on its own devices); arrays already placed so are returned as they are, and PRNG key arrays are placed
    through their key data.

    Args:
      tree: a pytree of host or device arrays.
      sharding: the target ``jax.sharding.Sharding``.

    Returns:
      A pytree of global ``jax.Array`` s.

    Example:
        >>> import numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec
        >>> out = put({"w": np.ones(2)}, NamedSharding(mesh(devices=1), PartitionSpec()))
        >>> out["w"].tolist()
        [1.0, 1.0]
    """

    def one(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        if jax.process_count() == 1 or (isinstance(a, jax.Array) and not a.is_fully_addressable):
            return jax.device_put(a, sharding)  # (the latter: a global array laid out otherwise)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree)


def replicate(tree: PyTree, m: jax.sharding.Mesh | None = None) -> PyTree:
    """Every leaf as a global array replicated over the mesh ``m``.

    Args:
      tree: a pytree of host values every process holds in full.
      m: the mesh (default: all devices of the job).

    Returns:
      A pytree of replicated global ``jax.Array`` s.

    Example:
        >>> import numpy as np
        >>> replicate(np.arange(3.0)).sharding.is_fully_replicated
        True
    """
    return put(tree, NamedSharding(m or mesh(), P()))


def shard(tree: PyTree, m: jax.sharding.Mesh, axis: str | Sequence[str]) -> PyTree:
    """Every leaf split along its first axis over the mesh axis (or axes) ``axis``.

    Args:
      tree: a pytree of host values every process holds in full (each process contributes the slices of its own
        devices).
      m: the mesh.
      axis: the mesh axis name, or a sequence of names.

    Returns:
      A pytree of global ``jax.Array`` s.

    Example:
        >>> import numpy as np
        >>> shard(np.arange(4.0), mesh(devices=1), "points").shape
        (4,)
    """
    return put(tree, NamedSharding(m, P(axis)))


def to_host(tree: PyTree) -> PyTree:
    """Every leaf as a NumPy array holding the whole value, on every process.

    Gathered across processes when a process holds only part of it.

    Args:
      tree: a pytree of arrays (global, local or host).

    Returns:
      A pytree of NumPy arrays.

    Example:
        >>> import numpy as np
        >>> type(to_host({"w": replicate(np.ones(2))})["w"]).__name__
        'ndarray'
    """

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree_util.tree_map(one, tree)


def local(tree: PyTree) -> PyTree:
    """Replicated global arrays as this process's own copy (arrays on its first local device).

    So that what a method returns can be used like any single-process value; other leaves are returned as they
    are.

    Args:
      tree: a pytree whose global arrays are replicated.

    Returns:
      The pytree with process-local arrays. Raises ``ValueError`` for a sharded (not replicated) global array:
      gather it with :func:`to_host`.

    Example:
        >>> import numpy as np
        >>> local({"w": replicate(np.ones(2)), "n": 3})["n"]
        3
    """

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:
                raise ValueError("local() takes replicated arrays; gather a sharded one with to_host()")
            return a.addressable_data(0)
        return a

    return jax.tree_util.tree_map(one, tree)


def sync(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op with one process).

    Args:
      name: the barrier's name; every process must use the same one.

    Returns:
      ``None``.

    Example:
        >>> sync("after-training")
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
