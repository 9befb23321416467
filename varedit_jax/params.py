"""Parameter trees of NNX modules as nested dicts of arrays (what checkpoints and converters exchange).

`param_dict(model)` is `nnx.to_pure_dict` of the model's Param state (list indices become int keys);
`load_param_dict(model, params)` writes such a tree back, refusing missing/unexpected keys and shape changes.
`get_path` / `set_path` read and write one leaf of such a tree by its key path (converters build trees with them).

Every parameter carries logical axis names (`sharding.py` maps them to the mesh): create it with `logical_param(value,
names)` or an initializer `logical_init(init, names)`. They never shard eagerly (models are built without a mesh;
placement is explicit: a sharded jitted init, `sharding.place` or an orbax restore), so no global NNX setting is
needed.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def logical_param(value, names: tuple) -> nnx.Param:
    """A Param holding `value` with logical axis `names` (one per dimension)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_init(init, names: tuple):
    """An initializer whose Params carry logical axis `names` (for `kernel_init=` and the like)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def param_dict(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of arrays (`nnx.to_pure_dict` of the Param state)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def path_name(path) -> str:
    """"a/b/0/c" for a jax key path (dict keys, list indices and attribute names alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flat_leaves(tree) -> dict:
    """{"a/b/0/c": leaf} for every leaf of a nested tree."""
    return {path_name(path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"a/b/0/c": shape} for every leaf of a nested tree."""
    return {k: tuple(np.shape(v)) for k, v in flat_leaves(tree).items()}


def replace_leaves(tree, by_name: dict):
    """`tree` with the leaves named in `by_name` ("a/b/0/c" -> value) replaced."""
    return jax.tree_util.tree_map_with_path(lambda path, v: by_name.get(path_name(path), v), tree)


def load_param_dict(model: nnx.Module, params: dict) -> None:
    """Replaces the model's parameters by `params` (nested dict, list indices int or str); every parameter must be
    present with its shape, otherwise ValueError names the differences."""
    want, got = flat_shapes(param_dict(model)), flat_shapes(params)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [f"{k}: {got[k]} vs model {want[k]}" for k in want if k in got and got[k] != want[k]]
    if missing or unexpected or bad:
        raise ValueError(f"parameter tree does not match the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, shapes {bad[:5]}")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params, replace_fn=lambda var, v: var.replace(jnp.asarray(v, var.dtype)))
    nnx.update(model, state)


def get_path(tree, path: tuple):
    """The node of a nested dict at key `path`; a key missing as given is looked up as a string (list indices of a
    restored checkpoint come back as "0", "1", ...)."""
    for key in path:
        tree = tree[key] if key in tree else tree[str(key)]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    """Sets the leaf at key `path` of a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
