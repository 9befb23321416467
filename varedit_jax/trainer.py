"""The trainer: the static parts of a training run over a ("dcn", "data", "fsdp", "tensor") mesh.

`Trainer(config, mesh, image_tokenizer, text_encoder)` holds the graphdefs, the optimizer and the shardings (every
parameter by its logical axis names, `config.mesh.rules`), creates the state directly in its shardings
(`init_params_fn`, `init_state`), restores it from a workdir's checkpoints (`restore_state`) and compiles the pure
step of `train_step` once per aspect template (`step_fn`, state donated) and the validation step (`eval_fn`). The
loop that drives it is `varedit_jax.train`.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from varedit_jax import checkpoint, data, optim, schedules, sharding, topology, transformer
from varedit_jax.train_step import Frozen, TrainState, eval_step, sequence_layout, train_step


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """The ("dcn", "data", "fsdp", "tensor") mesh of `config.mesh` (slices, per-slice shape) over `devices` (all)."""
    data_size, fsdp, tensor = (int(s) for s in config.mesh.shape)
    return topology.make_mesh(tuple(devices if devices is not None else jax.devices()), data=data_size, fsdp=fsdp,
                              tensor=tensor, slices=int(config.mesh.slices))


class Trainer:
    """Holds the static parts of a run (mesh, graphdefs, optimizer, shardings) and compiles the step per template."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, image_tok, text_encoder):
        """image_tok / text_encoder: the frozen models (real or `nnx.eval_shape` abstract ones)."""
        self.config, self.mesh = config, mesh
        self.stride = image_tok.stride
        self.rules = config.mesh.rules
        abstract = nnx.eval_shape(lambda: transformer.Infinity(config.model, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.param_shardings = nnx.to_pure_dict(sharding.param_shardings(abstract_params, mesh, self.rules))
        self.abstract_params = nnx.to_pure_dict(abstract_params)
        self.tx = optim.make(config.optim, self.abstract_params)
        (tok_graphdef, tok_state), (text_graphdef, text_state) = nnx.split(image_tok), nnx.split(text_encoder)
        self.frozen = Frozen(tok_graphdef, text_graphdef)
        self.frozen_shardings = (sharding.param_shardings(tok_state, mesh, self.rules),
                                 sharding.param_shardings(text_state, mesh, self.rules))
        self.state_shardings = self._state_shardings()
        self._steps: dict = {}
        self._evals: dict = {}

    # -- shardings
    def _state_shardings(self) -> TrainState:
        replicated = NamedSharding(self.mesh, P())
        opt_abstract = jax.eval_shape(self.tx.init, self.abstract_params)
        opt = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, self.param_shardings,
                                    transform_non_params=lambda _: replicated,
                                    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
        return TrainState(step=replicated, params=self.param_shardings, opt_state=opt,
                          ema=self.param_shardings if self.config.optim.ema_decay > 0 else None,
                          bad_steps=replicated, skipped=replicated)

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(self.init_state_fn, self.abstract_params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                            self.state_shardings)

    def init_state_fn(self, params) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        ema = jax.tree.map(jnp.copy, params) if self.config.optim.ema_decay > 0 else None
        return TrainState(step=zero, params=params, opt_state=self.tx.init(params), ema=ema, bad_steps=zero,
                          skipped=zero)

    def init_params_fn(self):
        """The run's random init (`config.seed`) as one jitted program whose outputs are the parameter shardings:
        no device ever holds the whole model. Call it for the params (or lower it for its memory analysis)."""
        model_cfg, seed = self.config.model, self.config.seed
        return jax.jit(lambda: transformer.param_dict(transformer.Infinity(model_cfg, rngs=nnx.Rngs(seed))),
                       out_shardings=self.param_shardings)

    def init_state(self, params) -> TrainState:
        """A fresh TrainState from a param dict (placed as the rules say unless it is already)."""
        params = sharding.place(params, self.param_shardings)
        return jax.jit(self.init_state_fn, out_shardings=self.state_shardings)(params)

    def restore_state(self, checkpoints: checkpoint.TrainCheckpoints, iterator) -> TrainState | None:
        """The TrainState of the newest intact checkpoint, restored into the training shardings (`iterator` set in
        place), or None when there is none."""
        abstract = self.abstract_state()
        found = checkpoints.restore_latest(abstract.params, abstract.rest(), iterator)
        if found is None:
            return None
        step, params, rest, data_states = found
        if data_states is not None:  # written by another number of processes
            iterator.set_state(data.resplit_state(data_states, jax.process_count(), self.config.data))
            print(f"step {step} was written by {len(data_states)} processes; the data position is re-split over "
                  f"{jax.process_count()}", flush=True)
        return TrainState(step=sharding.place(np.int32(step), abstract.step.sharding), params=params, **rest)

    def check_sharding(self, state: TrainState) -> None:
        """Raises if any parameter is not laid out as the logical rules say."""
        bad = [jax.tree_util.keystr(path) for path, a, s in
               zip(*zip(*jax.tree_util.tree_flatten_with_path(state.params)[0]),
                   jax.tree.leaves(self.param_shardings))
               if not a.sharding.is_equivalent_to(s, a.ndim)]
        if bad:
            raise RuntimeError(f"parameters not sharded as the rules say: {bad[:5]}")

    def place_frozen(self, image_tok, text_encoder):
        return (sharding.place(nnx.state(image_tok), self.frozen_shardings[0]),
                sharding.place(nnx.state(text_encoder), self.frozen_shardings[1]))

    @property
    def batch_sharding(self) -> NamedSharding:
        """Every batch field: dim 0 over the batch mesh axes, the rest replicated."""
        return NamedSharding(self.mesh, P(sharding.batch_axes(self.mesh, self.config.batch_size, self.rules)))

    # -- compiled programs
    def step_fn(self, template: str):
        """The jitted train step of an aspect template (jit compiles once per batch shape)."""
        if template not in self._steps:
            fn = functools.partial(train_step, graphdef=self.graphdef, frozen=self.frozen, tx=self.tx,
                                   config=self.config, layout=sequence_layout(self.config, template))
            self._steps[template] = jax.jit(
                fn, donate_argnums=(0,), in_shardings=(self.state_shardings, self.frozen_shardings,
                                                       self.batch_sharding),
                out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())))
        return self._steps[template]

    def eval_fn(self, template: str):
        if template not in self._evals:
            self._evals[template] = jax.jit(functools.partial(
                eval_step, graphdef=self.graphdef, frozen=self.frozen, config=self.config,
                layout=sequence_layout(self.config, template)))
        return self._evals[template]

    def batch_spec(self, template: str) -> dict:
        """The abstract global batch of a template (what the step takes), placed as the step expects."""
        h, w = schedules.pixel_size(schedules.scale_schedule(template, self.config.pn), self.stride)
        b, t = self.config.batch_size, self.config.text.max_len
        spec = {"source": ((b, h, w, 3), jnp.float32), "target": ((b, h, w, 3), jnp.float32),
                "text_mask": ((b, t), jnp.bool_)}
        if self.config.text.cache:
            spec["text_feats"] = ((b, t, self.config.model.text_dim), jnp.float32)
        else:
            spec["text_ids"] = ((b, t), jnp.int32)
        return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_sharding) for k, (s, d) in spec.items()}
