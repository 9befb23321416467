"""varedit_jax: VAREdit (instruction-guided image editing by next-scale prediction) in JAX / Flax NNX.

Parameters carry logical axis names; they are placed on a mesh explicitly (shape first, then a sharded jitted
init or an orbax restore, see `varedit_jax.sharding`), so models are built without a mesh in scope and Flax's
eager variable sharding is switched off here.
"""
from flax import nnx as _nnx

_nnx.use_eager_sharding(False)
