"""The device mesh (data, fsdp, tensor) and the rules mapping logical axis names onto it."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters shard over fsdp (their `embed` dim) and tensor (heads,
# mlp, vocab); activations shard their batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_q_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("embed_out", None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the devices left over; checks the product."""
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if num_devices % rest:
            raise ValueError(
                f"mesh: {num_devices} devices do not divide by the fixed axes {dict(zip(MESH_AXES, shape))}"
            )
        shape[shape.index(-1)] = num_devices // rest
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, there are {num_devices}"
        )
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU and odd topologies: plain order is as good as any
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def logical_to_sharding(logical: Any, shapes: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs; a mesh axis that does not divide
    a dimension is dropped for that dimension (replicated), with a log line."""

    def one(spec: PartitionSpec, shape: jax.ShapeDtypeStruct) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(spec, rules)
        fixed = []
        for dim, axes in zip(shape.shape, mesh_spec):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(mesh.shape[n] for n in names)
            if names and dim % size:
                logging.info("sharding: dim %d of %s does not divide by %s; replicated", dim, spec, names)
                names = ()
            fixed.append(names if len(names) > 1 else (names[0] if names else None))
        return NamedSharding(mesh, PartitionSpec(*fixed))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a global batch split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def host_batch_block(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """(index, count): this process feeds block `index` of the global batch cut into `count`
    equal blocks of rows, the rows its devices hold. Processes whose devices hold the same rows
    (a tensor axis that spans hosts) get the same block, so they load the same data."""
    rows = [index[0] for index in sharding.addressable_devices_indices_map((global_batch,)).values()]
    spans = sorted({(s.start or 0, global_batch if s.stop is None else s.stop) for s in rows})
    lo, hi = spans[0][0], spans[-1][1]
    size = hi - lo
    if sum(b - a for a, b in spans) != size or global_batch % size or lo % size:
        raise ValueError(
            f"mesh: the devices of process {jax.process_index()} hold rows {spans} of the global batch "
            f"of {global_batch}, not one contiguous block; order the mesh's devices by host"
        )
    return lo // size, global_batch // size


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts jax.distributed: from explicit flags, else from the TPU or SLURM environment.

    On a single host with none of these, it does nothing.
    """
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # jax reads SLURM_* itself
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()  # jax reads the TPU metadata itself
