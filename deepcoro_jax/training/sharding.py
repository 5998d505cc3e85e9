"""Device mesh, parameter shardings by regex rules, and batch shardings.

The one mesh has two axes: ``data`` (pure data parallelism) and ``fsdp``
(data parallelism whose parameters and optimizer state are also split across
the axis). A global batch is split over both axes. Parameter placement is
decided by rules over flattened parameter names (``encoder/Transformer/
block_0/MlpBlock/Dense_0/kernel``), first match wins:

    ("encoder/.*", "fsdp")       split the largest dimension divisible by the
                                 fsdp axis size (if the array is big enough)
    (".*", "replicate")          a full copy on every device

Nothing here runs computation; the trainer uses these shardings to create the
state already sharded (``jax.jit(init, out_shardings=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")
STRATEGIES = ("fsdp", "replicate")


def make_mesh(
    axes: Sequence[tuple[str, int]] = (("data", -1), ("fsdp", 1)),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over `devices` (all by default); one axis size may be -1 (the rest).

    Axis names must be ``data`` and ``fsdp``, in any order.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    if sorted(names) != sorted(DATA_AXES):
        raise ValueError(f"mesh axes must be named {DATA_AXES}, got {names}")
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {dict(axes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh axes {dict(zip(names, sizes, strict=True))} need {int(np.prod(sizes))} "
            f"devices, but {len(devices)} are available"
        )
    device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, names)


def batch_spec() -> P:
    """The leading (batch) dimension split over every mesh axis, the rest replicated."""
    return P(DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_name(path: tuple) -> str:
    """'a/b/c' from a key path of jax.tree_util.tree_flatten_with_path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int) -> P:
    """Splits the largest dimension divisible by `axis_size`; replicates small arrays."""
    if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_specs(
    shapes,
    rules: Sequence[tuple[str, str]],
    mesh: Mesh,
    *,
    min_fsdp_size: int = 2**14,
):
    """A PartitionSpec per leaf of `shapes` (arrays or ShapeDtypeStructs), by `rules`.

    Leaves whose name no rule matches are an error naming them, so a new
    parameter never gets a placement by accident.
    """
    compiled = []
    for pattern, strategy in rules:
        if strategy not in STRATEGIES:
            raise ValueError(f"sharding rule {pattern!r}: strategy must be in {STRATEGIES}")
        compiled.append((re.compile(pattern), strategy))
    fsdp_size = mesh.shape["fsdp"]

    def spec_for(path, leaf):
        name = param_name(path)
        for regex, strategy in compiled:
            if regex.fullmatch(name):
                if strategy == "replicate":
                    return P()
                return _fsdp_spec(leaf.shape, fsdp_size, min_fsdp_size)
        raise ValueError(f"no sharding rule matches parameter {name!r}; rules: {list(rules)}")

    return jax.tree_util.tree_map_with_path(spec_for, shapes)


def param_shardings(shapes, rules: Sequence[tuple[str, str]], mesh: Mesh, **kwargs):
    """NamedShardings for `shapes` by `rules` (see `param_specs`)."""
    specs = param_specs(shapes, rules, mesh, **kwargs)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)

