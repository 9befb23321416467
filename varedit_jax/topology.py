"""TPU slices for ahead-of-time compilation on any host (libtpu installed, no TPU needed).

Slice names follow Cloud TPU: `v4-N` and `v5p-N` count TensorCores (2 per chip, one megacore JAX device per chip),
`v5e-N` and `v6e-N` count chips (one core each). `slice_spec(name)` gives the chip grid and the topology name that
`jax.experimental.topologies.get_topology_desc` takes, `topology_devices(name, slices)` the compile-only devices of
`slices` such slices (a multi-slice topology: devices carry a `slice_index`), and `make_mesh(name, data, fsdp,
tensor, slices)` an `AxisType.Auto` mesh over them with the project's axes ("dcn", "data", "fsdp", "tensor"): "dcn"
spans the slices (data parallel over the data-center network, MaxText's dcn_data_parallelism; the hybrid device
mesh), the other three lie within each slice (ICI). Chip grids grow as the Cloud TPU ones do: from the smallest slice, double the smallest
grid dimension (ties: the last), e.g. v4-8 2x2x1, v5p-8 2x2x1, v5p-16 2x2x2, v5p-32 2x2x4, v5p-128 4x4x4, v5p-256 4x4x8;
v5e-8 2x4, v5e-16 4x4, v5e-256 16x16. Other shapes (e.g. v5p-384) are not listed here.

Use, e.g. for a plan:  mesh = make_mesh("v5p-128", fsdp=-1)     two slices: make_mesh("v5p-128", fsdp=-1, slices=2)
  jax.jit(step, in_shardings=..., out_shardings=...).lower(*abstract_args).compile().memory_analysis()
"""
import dataclasses
import functools
import itertools
import math

import jax
import numpy as np
from jax.experimental import mesh_utils, topologies

from varedit_jax.sharding import MESH_AXES

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: grid rank, cores counted per chip in slice names, HBM per chip, smallest slice."""
    prefix: str             # topology-name prefix for get_topology_desc
    rank: int               # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    cores_per_chip: int     # in the slice name's count
    hbm_bytes: int          # per chip (= per JAX device)
    seeds: tuple[tuple[int, ...], ...]  # the smallest grids; larger ones double from the last seed
    chip_config: str        # get_topology_desc chip_config_name
    max_chips: int          # largest single slice


GENERATIONS = {
    "v4": Generation("v4", 3, 2, 32 * GiB, ((2, 2, 1),), "megacore", 4096),
    "v5p": Generation("v5p", 3, 2, 95 * GiB, ((2, 2, 1),), "megacore", 8192),
    "v5e": Generation("v5e", 2, 1, 16 * GiB, ((1, 1), (2, 2)), "default", 256),
    "v6e": Generation("v6e", 2, 1, 32 * GiB, ((1, 1), (2, 2)), "default", 256),
}


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """A TPU slice: `name` as "v5p-128", its chip grid, chips (= JAX devices), HBM per chip."""
    name: str
    generation: str
    grid: tuple[int, ...]
    hbm_bytes: int

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def topology_name(self) -> str:
        """The `get_topology_desc` topology, e.g. "v5p:4x4x4"."""
        return f"{GENERATIONS[self.generation].prefix}:{'x'.join(map(str, self.grid))}"


def _grids(seeds: tuple[tuple[int, ...], ...]):
    """Chip grids from the smallest slice upwards: the seeds, then double the smallest dimension (ties: the last)."""
    yield from seeds[:-1]
    grid = list(seeds[-1])
    while True:
        yield tuple(grid)
        i = max(range(len(grid)), key=lambda j: (-grid[j], j))
        grid[i] *= 2


def slice_spec(name: str) -> SliceSpec:
    """Parses a slice name ("v5p-8", "v5e-16", "v4-32", "v6e-8", ...); ValueError for unknown names/sizes."""
    generation, _, count = name.partition("-")
    if generation not in GENERATIONS or not count.isdigit():
        raise ValueError(f"unknown TPU slice {name!r}; expected <generation>-<count> with generation in "
                         f"{sorted(GENERATIONS)}, e.g. v5p-128 or v5e-16")
    gen = GENERATIONS[generation]
    cores = int(count)
    chips, rest = divmod(cores, gen.cores_per_chip)
    for grid in _grids(gen.seeds):
        if math.prod(grid) >= max(chips, 1):
            break
    if rest or math.prod(grid) != chips or chips > gen.max_chips:
        valid = [math.prod(g) * gen.cores_per_chip
                 for g in itertools.takewhile(lambda g: math.prod(g) <= gen.max_chips, _grids(gen.seeds))]
        raise ValueError(f"unknown {generation} slice size {cores} in {name!r}; known sizes: {valid}")
    return SliceSpec(name=name, generation=generation, grid=grid, hbm_bytes=gen.hbm_bytes)


@functools.lru_cache(maxsize=None)
def topology_devices(name: str, slices: int = 1) -> tuple:
    """The compile-only devices of `slices` slices `name` (one per chip; slice after slice), from libtpu's topology
    description."""
    spec = slice_spec(name)
    gen = GENERATIONS[spec.generation]
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                            chip_config_name=gen.chip_config,
                                            **({"num_slices": slices} if slices > 1 else {}))
    except Exception as e:  # libtpu missing or the topology unknown to it
        raise RuntimeError(f"cannot describe TPU topology {spec.topology_name} for {name} (is libtpu installed? "
                           f"pip install '.[tpu]'): {e}") from e
    if len(topo.devices) != spec.chips * slices:
        raise RuntimeError(f"{slices} x {spec.topology_name} gave {len(topo.devices)} devices, expected "
                           f"{spec.chips * slices}")
    return tuple(topo.devices)


def make_mesh(devices: str | tuple | list, data: int = 1, fsdp: int = -1, tensor: int = 1,
              slices: int = 1) -> jax.sharding.Mesh:
    """An `AxisType.Auto` mesh ("dcn", "data", "fsdp", "tensor") over `slices` slices of a slice name (or over given
    devices): "dcn" = slices; data, fsdp and tensor lie within each slice (their product = devices per slice).

    One of data, fsdp, tensor may be -1: it takes the remaining devices of a slice. ValueError when the sizes do not
    multiply to the devices per slice, or the devices' slices (TPU devices know theirs) are not `slices`.
    """
    devices = topology_devices(devices, slices) if isinstance(devices, str) else tuple(devices)
    if slices < 1 or len(devices) % slices:
        raise ValueError(f"{len(devices)} devices do not split into {slices} slices")
    per_slice = len(devices) // slices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 not in sizes and known != per_slice:
        raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)} need {known} devices, "
                         f"the slice has {per_slice}")
    if per_slice % known:
        raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)} do not divide {per_slice} devices")
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    return jax.sharding.Mesh(_device_grid(devices, slices, sizes), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _device_grid(devices: tuple, slices: int, sizes: list[int]) -> np.ndarray:
    """The (slices, *sizes) device array: each slice's devices laid out along its physical ICI topology. TPU devices
    carry their `slice_index` (`mesh_utils.create_hybrid_device_mesh` groups them); devices without one (CPU, the
    simulated slices of the tests) form `slices` consecutive groups."""
    found = {getattr(d, "slice_index", None) for d in devices}
    if None not in found and len(found) != slices:
        raise ValueError(f"the devices span {len(found)} slice(s), the mesh asks for {slices} (config mesh.slices)")
    if slices > 1 and None not in found:
        return mesh_utils.create_hybrid_device_mesh([1, *sizes], [slices, 1, 1, 1], devices,
                                                    allow_split_physical_axes=True)
    per_slice = len(devices) // slices
    return np.stack([mesh_utils.create_device_mesh(sizes, list(devices[i * per_slice:(i + 1) * per_slice]),
                                                   allow_split_physical_axes=True) for i in range(slices)])
