"""Logical axis names for parameters and activations, and their default mapping onto the mesh.

Model code annotates every parameter with logical names (one per array dimension), e.g.
`nnx.Param(w, out_sharding=("embed", "mlp"))` or `nnx.with_partitioning(init, ("embed", "mlp"))`.
Configs map logical names to mesh axes (`config.mesh.rules`, defaulting to `DEFAULT_RULES`); a name mapped to
None is replicated. The mesh axes are ("dcn", "data", "fsdp", "tensor"): "dcn" spans TPU slices (data parallel over
the data-center network; size 1 on one slice), the others lie within a slice (`topology.make_mesh`).

Vocabulary (parameters):
  embed       transformer width C                          -> fsdp
  heads       fused attention features (heads * head_dim)  -> tensor
  mlp         FFN hidden width                             -> tensor
  text_embed  text-encoder width (T5 d_model, Ctext)       -> replicated
  vocab       output logits (2 * bits) / token vocabulary  -> replicated
  bits        tokenizer bits d (word_embed input)          -> replicated
  layers      stacked (scanned) block axis                 -> replicated
  norm        norm scales / small per-channel vectors      -> replicated
  conv_in, conv_out, conv_h, conv_w   tokenizer convolutions (HWIO) -> replicated
  unmodeled   anything small that should never be sharded  -> replicated
Activations: batch -> (dcn, data, fsdp); length, act_embed -> replicated. Parameters are replicated over "dcn" (no
rule names it): each slice holds a full FSDP / tensor-parallel copy and gradients are averaged across slices.
"""
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("dcn", "data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("text_embed", None),
    ("vocab", None),
    ("bits", None),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", None),
    ("conv_h", None),
    ("conv_w", None),
    ("unmodeled", None),
    ("length", None),
    ("act_embed", None),
)


def rules_dict(rules=None) -> dict:
    """{logical name: mesh axes} from a rules sequence (a config's `mesh.rules`; default `DEFAULT_RULES`)."""
    return dict(DEFAULT_RULES if rules is None else (tuple(r) for r in rules))


def axes_for(mesh: jax.sharding.Mesh, names, size: int, taken: set) -> tuple[str, ...]:
    """The leading mesh axes of `names` (a rule value) whose product divides `size` (the others: replicated): axes
    the mesh lacks count as size 1 and are left out; the first axis already `taken` by another dimension, or that
    does not divide, ends the list."""
    names = (names,) if isinstance(names, str) else tuple(names or ())
    kept = []
    for name in names:
        if name not in mesh.axis_names:
            continue
        if name in taken or size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]):
            break
        kept.append(name)
    return tuple(kept)


def batch_axes(mesh: jax.sharding.Mesh, size: int, rules=None) -> tuple[str, ...] | None:
    """Mesh axes a batch dimension of `size` is split over (the "batch" rule: dcn, data, fsdp)."""
    return axes_for(mesh, rules_dict(rules)["batch"], size, set()) or None


def data_parallel_size(mesh: jax.sharding.Mesh, rules=None) -> int:
    """Devices a batch is split over (batches are padded / sized to a multiple of it)."""
    return math.prod(mesh.shape[a] for a in axes_for(mesh, rules_dict(rules)["batch"], 0, set()))


def logical_to_spec(names: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules=None) -> P:
    """PartitionSpec of an array with logical axis `names`; a dimension a mesh axis does not divide is replicated."""
    rules = rules_dict(rules)
    taken: set = set()
    axes = []
    for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
        kept = axes_for(mesh, rules.get(name), dim, taken) if name else ()
        taken.update(kept)
        axes.append(kept or None)
    return P(*axes)


def param_shardings(state, mesh: jax.sharding.Mesh, rules=None):
    """NamedShardings of an NNX state (leaves carry logical names, `nnx.get_partition_spec`), same tree structure."""
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, logical_to_spec(tuple(spec), leaf.shape, mesh, rules)),
                        nnx.get_partition_spec(state), state)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, size: int, rules=None) -> NamedSharding:
    """Sharding of a batch-leading array: dim 0 over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, size, rules), *([None] * (ndim - 1))))


# ------------------------------------------------------------------------------------------------ host <-> global
# Under jax.distributed every process runs the same program; a global array is only partly addressable from each.
def place(tree, shardings):
    """Host values or process-local arrays, identical on every process -> global arrays with `shardings`. Goes through
    host memory: each process fills its own shards (no cross-host device transfer, which CPU backends lack). Arrays
    already laid out as asked are kept as they are (no copy)."""
    def one(a, s):
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(s, a.ndim):
            return a
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.tree.map(one, tree, shardings)


def assemble(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding, fill) -> jax.Array:
    """A global array built shard by shard on this process, never whole: `fill(shards)` gets a list of
    (index, out) pairs, one per addressable device (index: a tuple of slices with start/stop set; out: a new numpy
    array of that shard's shape and `dtype`) and writes every `out`; each is then placed on its device (CPU
    backends alias it, others copy it). Host memory: this process's shards of one array."""
    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    shards = []
    for device, index in index_map.items():
        index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
        shards.append((device, index, np.empty(tuple(sl.stop - sl.start for sl in index), dtype)))
    fill([(index, out) for _, index, out in shards])
    arrays = [jax.device_put(out, device) for device, _, out in shards]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def fetch(tree):
    """Global arrays -> full numpy arrays on every process (an all-gather across processes when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
