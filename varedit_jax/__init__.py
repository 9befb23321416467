"""varedit_jax: VAREdit (instruction-guided image editing by next-scale prediction) in JAX / Flax NNX.

Parameters carry logical axis names and are placed on a mesh explicitly (shape first, then a sharded jitted init or
an orbax restore, see `varedit_jax.sharding` and `varedit_jax.params`).
"""
