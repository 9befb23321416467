"""Training VAREdit (and Infinity) transformers: one pure jitted train step over a (data, fsdp, tensor) mesh.

  python -m varedit_jax.train --config configs/varedit_tiny.py --workdir runs/tiny [--config.total_steps=200]

Re-running the same command resumes from the newest checkpoint in the workdir. Multi-host (TPU pods): add
`--distributed` (every host runs the same command; `jax.distributed.initialize()` finds the coordinator), or
`--coordinator HOST:PORT --num_processes N --process_id I` explicitly (also how the tests run 2 local processes).

The step (`Trainer.step`, compiled once per aspect template, state donated):
  source image -> frozen tokenizer -> continuous features -> the transformer's source grid (never quantized)
  target image -> frozen tokenizer -> features -> `flip_requant` with bitwise self-correction -> inputs + bit labels
  instruction  -> frozen flan-T5 (compute dtype `text.dtype`) in the step, or host-cached features (`text.cache`);
                  `text.drop_rate` of the samples get the learned `cfg_uncond` (CFG training)
  transformer (`conditioning`: full / finest / sar; compute dtype `model.dtype`, fp32 master weights, remat from
  `model.remat`) -> per-bit CE (official weighting) -> grads (`grad_accum` micro-batches, scanned) -> clip + AdamW
  -> optional EMA. A step whose loss or gradients are not finite leaves the state unchanged and is counted;
  `max_nonfinite_steps` in a row save a checkpoint and stop the run.
RNG: step s uses `fold_in(key(seed), s)`, so a resumed run draws exactly what a straight run draws.

Workdir:
  checkpoints/<step>/  orbax items: params (the model's param dict), train_state (optimizer state, EMA, counters),
                       data (grain iterator state, one file per process), config (the resolved config as JSON) -
                       `edit`, `convert export` and `ablate` take the workdir, the checkpoints dir or a step dir.
  metrics.jsonl, tb/   see `varedit_jax.metrics`;   samples/step_<n>.png   sample edits of held-out pairs
Preemption: SIGTERM (and SIGINT) finish the current step, save a checkpoint and return.
"""
import dataclasses
import functools
import itertools
import json
import pathlib
import signal
import statistics
import sys
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from data_pipelines import records
from varedit_jax import (assets, checkpoint, conditioning, configlib, data, metrics, optim, quantizer, sampler,
                         schedules, sharding, text, tokenizer, topology, transformer)
from varedit_jax.convert import infinity as convert_infinity
from varedit_jax.convert import t5 as convert_t5
from varedit_jax.convert import vae as convert_vae
from varedit_jax.eval import images, report

REPO = pathlib.Path(__file__).resolve().parent.parent
ITEMS = ("params", "train_state", "data", "config")


# ------------------------------------------------------------------------------------------------ config
def default_config(model: ml_collections.ConfigDict, *, conditioning_mode: str, pn: str) -> ml_collections.ConfigDict:
    """Every field of a training config (the model's fields under `model`); configs/*.py override what differs."""
    c = ml_collections.ConfigDict()
    c.kind = "varedit"
    c.conditioning = conditioning_mode
    c.pn = pn
    c.model = model
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8                     # global batch (per optimizer step)
    c.grad_accum = 1                     # micro-batches per step (batch_size must divide by it)
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.init_checkpoint = ""               # Infinity / VAREdit weights or checkpoint to start from (stage 1 / stage 2)
    c.max_nonfinite_steps = 20
    c.log_every = 10
    c.eval_every = 0                     # validation loss every N steps (0: only at the end)
    c.eval_batches = 2
    c.sample_every = 0                   # sample edit grid every N steps (0: only at the end; -1: never)
    c.sample_count = 8
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3))  # jax.profiler window (-1: off)
    c.compilation_cache = True
    c.vae = ml_collections.ConfigDict(dict(path="", config=str(REPO / "configs/vae_d32.py")))
    c.text = ml_collections.ConfigDict(dict(path="", config=str(REPO / "configs/flan_t5_xl.py"), max_len=512,
                                            dtype="bfloat16", cache=False, drop_rate=0.1))
    c.bsc = ml_collections.ConfigDict(dict(noise_apply_layers=13, noise_apply_strength=0.3, requant=True))
    c.loss = ml_collections.ConfigDict(dict(reweight_by_scale=True, label_smoothing=0.0))
    c.optim = optim.default_config()
    c.data = data.default_config()
    c.data.pn = pn
    c.eval_data = data.default_config()
    c.eval_data.pn = pn
    c.eval_data.shuffle = False
    c.toy = assets.default_toy_config()
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=tuple(tuple(r) for r in sharding.DEFAULT_RULES)))
    return c


def paper_config(size: str, pn: str, arg: str | None, *, batch_size: int, lr: float, total_steps: int,
                 init_checkpoint: str = "") -> ml_collections.ConfigDict:
    """A released VAREdit shape ("2b" / "8b", `transformer.OFFICIAL_SHAPES`) with the paper's training recipe: bf16
    compute, full-block remat, FSDP over every device, flan-T5-XL text, the d32 / d56 tokenizer, BSC on every
    scale, constant LR. `arg` selects the conditioning (default sar)."""
    model = transformer.default_model_config(**transformer.OFFICIAL_SHAPES[size], dtype="bfloat16", remat="full")
    c = default_config(model, conditioning_mode=conditioning.source_mode(arg), pn=pn)
    c.batch_size, c.total_steps, c.init_checkpoint = batch_size, total_steps, init_checkpoint
    c.optim.lr = lr
    c.checkpoint_every, c.eval_every, c.sample_every = 1000, 1000, 1000
    c.vae.config = str(REPO / ("configs/vae_d32.py" if size == "2b" else "configs/vae_d56.py"))
    c.mesh.shape = (1, -1, 1)
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for inconsistent settings (before anything is built)."""
    if config.conditioning not in conditioning.MODES:
        raise ValueError(f"conditioning must be one of {conditioning.MODES}, got {config.conditioning!r}")
    if (config.kind == "varedit") == (config.conditioning == "none"):
        raise ValueError(f"kind {config.kind!r} does not go with conditioning {config.conditioning!r}")
    if config.total_steps < 0 or config.checkpoint_every <= 0 or config.keep_checkpoints <= 0:
        raise ValueError("total_steps >= 0, checkpoint_every > 0 and keep_checkpoints > 0 are required")
    if config.batch_size <= 0 or config.batch_size % config.grad_accum:
        raise ValueError(f"batch_size {config.batch_size} must be a positive multiple of grad_accum "
                         f"{config.grad_accum}")
    if config.data.pn != config.pn:
        raise ValueError(f"data.pn {config.data.pn} != pn {config.pn}")


# ------------------------------------------------------------------------------------------------ state
@struct.dataclass
class TrainState:
    """Everything the step changes. params / ema: the transformer's param dict (fp32 master weights)."""
    step: jax.Array           # () int32, optimizer steps taken (skipped steps included)
    params: Any
    opt_state: Any
    ema: Any                  # None when config.optim.ema_decay == 0
    bad_steps: jax.Array      # () int32, consecutive non-finite steps
    skipped: jax.Array        # () int32, non-finite steps so far


@dataclasses.dataclass(frozen=True)
class Frozen:
    """The frozen tokenizer and text encoder, split into static graphdefs and their (sharded) states."""
    vae_graphdef: Any
    vae_state: Any
    text_graphdef: Any
    text_state: Any


def _layout(config, template: str) -> conditioning.SequenceLayout:
    return conditioning.sequence_layout(config.conditioning, schedules.scale_schedule(template, config.pn), template)


def _scale_offsets(schedule) -> np.ndarray:
    return np.cumsum([0] + [h * w for h, w in schedule])


def compute_loss(params, graphdef, frozen_models, batch: dict, key, *, config, layout, train: bool):
    """(loss, metrics) of one (micro-)batch; see the module docstring. frozen_models = (vae, text encoder)."""
    vae, encoder = frozen_models
    model_cfg = config.model
    k_bsc, k_drop, k_path = jax.random.split(key, 3)
    schedule = layout.schedule
    features = jax.lax.stop_gradient(vae.encode(jnp.concatenate([batch["source"], batch["target"]])))
    src_features, tgt_features = jnp.split(features, 2)
    inputs = quantizer.flip_requant(tgt_features, schedule, k_bsc if train else None, patchify=model_cfg.patchify,
                                    noise_apply_layers=config.bsc.noise_apply_layers,
                                    noise_apply_strength=config.bsc.noise_apply_strength, requant=config.bsc.requant)
    source = None
    if layout.source_grid is not None:
        tokens = quantizer.source_tokens(src_features, schedule, model_cfg.patchify)
        source = tokens.reshape((tokens.shape[0],) + layout.source_grid + (tokens.shape[-1],))
    if "text_feats" in batch:
        feats, mask = batch["text_feats"], batch["text_mask"]
    else:
        feats, mask = text.encode(encoder, batch["text_ids"], batch["text_mask"])
    feats = jax.lax.stop_gradient(feats.astype(jnp.float32))
    b = feats.shape[0]
    drop = jax.random.bernoulli(k_drop, config.text.drop_rate, (b,)) if train else jnp.zeros((b,), bool)
    model = nnx.merge(graphdef, params)
    logits = model(feats, mask, drop, source, inputs.x_BLC_wo_prefix, layout, dropout_key=k_path if train else None)
    loss, per_bit = transformer.bitwise_loss(logits, inputs.gt_bits, schedule,
                                             reweight_by_scale=config.loss.reweight_by_scale,
                                             label_smoothing=config.loss.label_smoothing)
    per_token = per_bit.mean((0, 2))
    offsets = _scale_offsets(schedule)
    out = {"loss": loss, "bit_accuracy": transformer.bit_accuracy(logits, inputs.gt_bits).mean()}
    out.update({f"loss_scale{k}": per_token[offsets[k]:offsets[k + 1]].mean() for k in range(len(schedule))})
    return loss, out


def _microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B / n, ...) with micro-batch i = rows i, i + n, ... (each device keeps its own rows)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, frozen_states, batch: dict, *, graphdef, frozen: Frozen, tx, config,
               layout) -> tuple[TrainState, dict]:
    """One optimizer step (pure; jitted by `Trainer` with `state` donated)."""
    models = (nnx.merge(frozen.vae_graphdef, frozen_states[0]), nnx.merge(frozen.text_graphdef, frozen_states[1]))
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    loss_of = functools.partial(grad_fn, graphdef=graphdef, frozen_models=models, config=config, layout=layout,
                                train=True)
    n = config.grad_accum
    if n == 1:
        (_, aux), grads = loss_of(state.params, batch=batch, key=key)
    else:
        def body(carry, xs):
            micro, i = xs
            (_, m), g = loss_of(state.params, batch=micro, key=jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (m, g)), None
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_of(state.params, batch=jax.tree.map(
            lambda x: x[0], _microbatches(batch, n)), key=key))[0][1]), jax.tree.map(jnp.zeros_like, state.params)
        (aux, grads), _ = jax.lax.scan(body, zero, (_microbatches(batch, n), jnp.arange(n)))
        aux, grads = jax.tree.map(lambda x: x / n, (aux, grads))
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else optim.update_ema(state.ema, params, config.optim.ema_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new = TrainState(step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                     ema=None if ema is None else keep(ema, state.ema),
                     bad_steps=jnp.where(finite, 0, state.bad_steps + 1), skipped=state.skipped + (~finite))
    lr = optim.learning_rate(config.optim)(state.step)
    return new, dict(aux, grad_norm=grad_norm, lr=lr, finite=finite, skipped=new.skipped)


def eval_step(params, frozen_states, batch: dict, *, graphdef, frozen: Frozen, config, layout) -> dict:
    models = (nnx.merge(frozen.vae_graphdef, frozen_states[0]), nnx.merge(frozen.text_graphdef, frozen_states[1]))
    return compute_loss(params, graphdef, models, batch, jax.random.key(0), config=config, layout=layout,
                        train=False)[1]


# ------------------------------------------------------------------------------------------------ the trainer
def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    data_size, fsdp, tensor = (int(s) for s in config.mesh.shape)
    return topology.make_mesh(tuple(devices if devices is not None else jax.devices()), data=data_size, fsdp=fsdp,
                              tensor=tensor)


def abstract_frozen(config) -> tuple[Any, Any]:
    """Abstract (vae, text encoder) from `vae.config` / `text.config` files (no weights; for AOT planning)."""
    vae_cfg = configlib.load(config.vae.config).model
    text_cfg = configlib.load(config.text.config).model
    text_cfg.dtype = config.text.dtype
    return (nnx.eval_shape(lambda: tokenizer.AutoEncoder(vae_cfg, rngs=nnx.Rngs(0))),
            nnx.eval_shape(lambda: text.T5Encoder(text_cfg, rngs=nnx.Rngs(0))))


class Trainer:
    """Holds the static parts of a run (mesh, graphdefs, optimizer, shardings) and compiles the step per template."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, vae, encoder):
        """vae / encoder: the frozen tokenizer and text encoder (real or `nnx.eval_shape` abstract ones)."""
        self.config, self.mesh = config, mesh
        self.stride = vae.stride
        self.rules = config.mesh.rules
        abstract = nnx.eval_shape(lambda: transformer.Infinity(config.model, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.param_shardings = nnx.to_pure_dict(sharding.param_shardings(abstract_params, mesh, self.rules))
        self.abstract_params = nnx.to_pure_dict(abstract_params)
        self.tx = optim.make(config.optim, self.abstract_params)
        vae_graphdef, vae_state = nnx.split(vae)
        text_graphdef, text_state = nnx.split(encoder)
        self.frozen = Frozen(vae_graphdef, None, text_graphdef, None)
        self.frozen_shardings = (sharding.param_shardings(vae_state, mesh, self.rules),
                                 sharding.param_shardings(text_state, mesh, self.rules))
        self.state_shardings = self._state_shardings()
        self._steps: dict = {}
        self._evals: dict = {}

    # -- shardings
    def _state_shardings(self) -> TrainState:
        replicated = NamedSharding(self.mesh, P())
        opt_abstract = jax.eval_shape(self.tx.init, self.abstract_params)
        opt = optax_tree_map_params(self.tx, opt_abstract, self.param_shardings, replicated)
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

    def init_state(self, params) -> TrainState:
        """A fresh TrainState from a param dict (sharded as the rules say)."""
        params = sharding.place(params, self.param_shardings)
        return jax.jit(self.init_state_fn, out_shardings=self.state_shardings)(params)

    def check_sharding(self, state: TrainState) -> None:
        """Raises if any parameter is not laid out as the logical rules say."""
        bad = [jax.tree_util.keystr(path) for path, a, s in
               zip(*zip(*jax.tree_util.tree_flatten_with_path(state.params)[0]),
                   jax.tree.leaves(self.param_shardings))
               if not a.sharding.is_equivalent_to(s, a.ndim)]
        if bad:
            raise RuntimeError(f"parameters not sharded as the rules say: {bad[:5]}")

    def place_frozen(self, vae, encoder):
        return (sharding.place(nnx.state(vae), self.frozen_shardings[0]),
                sharding.place(nnx.state(encoder), self.frozen_shardings[1]))

    @property
    def batch_sharding(self) -> NamedSharding:
        """Every batch field: dim 0 over the batch mesh axes, the rest replicated."""
        return NamedSharding(self.mesh, P(sharding.batch_axes(self.mesh, self.config.batch_size, self.rules)))

    # -- compiled programs
    def step_fn(self, template: str):
        """The jitted train step of an aspect template (jit compiles once per batch shape)."""
        if template not in self._steps:
            fn = functools.partial(train_step, graphdef=self.graphdef, frozen=self.frozen, tx=self.tx,
                                   config=self.config, layout=_layout(self.config, template))
            self._steps[template] = jax.jit(
                fn, donate_argnums=(0,), in_shardings=(self.state_shardings, self.frozen_shardings,
                                                       self.batch_sharding),
                out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())))
        return self._steps[template]

    def eval_fn(self, template: str):
        if template not in self._evals:
            self._evals[template] = jax.jit(functools.partial(
                eval_step, graphdef=self.graphdef, frozen=self.frozen, config=self.config,
                layout=_layout(self.config, template)))
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


def optax_tree_map_params(tx, opt_abstract, param_tree, other):
    """The optimizer state's tree with param-shaped subtrees replaced by `param_tree` and every other leaf by
    `other` (shardings of the optimizer state from the params')."""
    return optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_tree, transform_non_params=lambda _: other,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


# ------------------------------------------------------------------------------------------------ checkpoints
def _manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    import grain
    handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options, item_handlers=handlers)


def _save(mngr, state: TrainState, iterator, config, *, wait: bool = False) -> int:
    import grain
    step = int(jax.device_get(state.step))
    rest = {"opt_state": state.opt_state, "ema": state.ema, "bad_steps": state.bad_steps, "skipped": state.skipped}
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), train_state=ocp.args.StandardSave(rest),
        data=grain.checkpoint.CheckpointSave(iterator), config=ocp.args.JsonSave(checkpoint.config_to_json(config))),
        force=True)
    if wait:
        mngr.wait_until_finished()
    return step


def _restore(mngr, step: int, abstract: TrainState, iterator) -> TrainState:
    import grain
    rest = {"opt_state": abstract.opt_state, "ema": abstract.ema, "bad_steps": abstract.bad_steps,
            "skipped": abstract.skipped}
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params), train_state=ocp.args.StandardRestore(rest),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    r = out["train_state"]
    return TrainState(step=sharding.place(np.int32(step), abstract.step.sharding), params=out["params"],
                      opt_state=r["opt_state"], ema=r["ema"], bad_steps=r["bad_steps"], skipped=r["skipped"])


def initial_params(config) -> dict:
    """Random init (seed), or `init_checkpoint` with shape-mismatched / missing tensors left at init (logged)."""
    model = transformer.build(config.model, seed=config.seed)
    params = transformer.param_dict(model)
    if not config.init_checkpoint:
        return params
    _, source = convert_infinity.load_transformer(config.init_checkpoint)
    loaded = transformer.param_dict(source)
    dropped = []

    def take(path, mine):
        try:
            theirs = functools.reduce(lambda t, k: t[getattr(k, "key", getattr(k, "idx", k))], path, loaded)
        except (KeyError, IndexError, TypeError):
            dropped.append(f"{jax.tree_util.keystr(path)} (missing)")
            return mine
        if np.shape(theirs) != np.shape(mine):
            dropped.append(f"{jax.tree_util.keystr(path)} {np.shape(theirs)} -> {np.shape(mine)}")
            return mine
        return jnp.asarray(theirs, mine.dtype)

    params = jax.tree_util.tree_map_with_path(take, params)
    print(f"initialised from {config.init_checkpoint}; kept at init (shape mismatch / missing): "
          f"{dropped if dropped else 'none'}", flush=True)
    return params


# ------------------------------------------------------------------------------------------------ the loop
class _Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves and returns after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        print(f"signal {signum}: saving a checkpoint after this step", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _load_frozen(config):
    vae = convert_vae.load_tokenizer(config.vae.path)
    _, encoder, text_tok = convert_t5.load_text_encoder(config.text.path, dtype=config.text.dtype)
    return vae, encoder, text_tok


def _host_batch(local: dict, text_cache) -> tuple[dict, np.ndarray]:
    """The numeric fields the step takes (text features from the cache when on) + the record ids."""
    out = {k: local[k] for k in ("source", "target", "text_mask")}
    if text_cache is None:
        out["text_ids"] = local["text_ids"]
    else:
        out["text_feats"] = text_cache(local["instruction"], local["text_ids"], local["text_mask"])
    return out, local["id"]


class TextCache:
    """`text.cache`: instruction -> frozen-encoder features, computed once per distinct instruction (host memory)."""

    def __init__(self, encoder, max_items: int = 100_000):
        graphdef, state = nnx.split(encoder)
        self._encode = jax.jit(lambda s, ids, m: text.encode(nnx.merge(graphdef, s), ids, m)[0].astype(jnp.float32))
        self._state, self._store, self.max_items = state, {}, max_items

    def __call__(self, instructions, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        missing = [i for i, s in enumerate(instructions) if str(s) not in self._store]
        if missing:
            feats = np.asarray(self._encode(self._state, ids, mask))
            if len(self._store) + len(missing) > self.max_items:
                self._store.clear()
            for i in missing:
                self._store[str(instructions[i])] = feats[i]
        return np.stack([self._store[str(s)] for s in instructions])


def _digest(ids) -> int:
    return zlib.crc32("\n".join(map(str, ids)).encode())


def train(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains to `config.total_steps`, resuming from the newest checkpoint in `workdir`; returns a summary:
    {"step", "final_loss", "step_time_s" (median, compile excluded), "tokens_per_s_per_device", "mfu", "workdir",
    "checkpoint", "skipped"}."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    validate(config)
    config = assets.resolve(config)  # under jax.distributed, `main` has built them already (assets.build_in_child)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "xla"))
    lead = jax.process_index() == 0
    mesh = make_mesh(config)
    vae, encoder, text_tok = _load_frozen(config)
    config.data.stride = config.eval_data.stride = vae.stride
    trainer = Trainer(config, mesh, vae, encoder)
    frozen_states = trainer.place_frozen(vae, encoder)
    text_cache = TextCache(encoder) if config.text.cache else None
    tok = lambda texts, n: text_tok(list(texts), n)  # noqa: E731
    dataset = data.make_dataset(config.data, seed=config.seed, batch_size=config.batch_size, tokenizer=tok)
    iterator = iter(dataset)
    mngr = _manager(workdir, config)
    latest = mngr.latest_step()
    if latest is not None:
        state = _restore(mngr, latest, trainer.abstract_state(), iterator)
        print(f"resumed {workdir} at step {latest}", flush=True)
    else:
        state = trainer.init_state(initial_params(config))
    trainer.check_sharding(state)
    start = int(jax.device_get(state.step))
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
    if lead:
        print(f"{config.kind} {config.conditioning}: {n_params:,} parameters, mesh {dict(mesh.shape)}, global batch "
              f"{config.batch_size}, steps {start}..{config.total_steps}, workdir {workdir}", flush=True)
    writer = metrics.Writer(workdir, config.total_steps, start, enabled=lead)
    peak = metrics.peak_flops()
    times, rates, mfus, last, compiled = [], [], [], {}, {}
    try:
        with _Preemption() as preempt:
            step = start
            while step < config.total_steps:
                template = data.template_for_step(config.seed, step, tuple(config.data.templates))
                host, ids = _host_batch(next(iterator), text_cache)
                batch = data.global_batch(host, trainer.batch_sharding)
                with jax.set_mesh(mesh):  # the mesh context the Pallas kernels need; the shardings are explicit
                    if template not in compiled:
                        t0 = time.perf_counter()
                        compiled[template] = trainer.step_fn(template).lower(state, frozen_states, batch).compile()
                        writer.log(f"compiled the step of template {template} in {time.perf_counter() - t0:.1f} s")
                    _profile(config, step, workdir)
                    t0 = time.perf_counter()
                    state, out = compiled[template](state, frozen_states, batch)
                out = jax.device_get(out)
                dt = time.perf_counter() - t0
                step += 1
                writer.advance()
                layout = _layout(config, template)
                last = {k: float(v) for k, v in out.items() if k != "finite"}
                last.update(step_time_s=dt, data_digest=_digest(ids),
                            tokens_per_s_per_device=config.batch_size * layout.length / dt / jax.device_count())
                if peak == peak:  # model FLOPs: forward + backward of every sample, per device
                    last["mfu"] = (config.batch_size * 3 * metrics.transformer_flops(config.model, layout,
                                                                                     config.text.max_len)
                                   / jax.device_count() / dt / peak)
                if step > start + 1:  # the first step of a call waits for its compile's aftermath
                    times.append(dt)
                    rates.append(last["tokens_per_s_per_device"])
                    mfus.append(last.get("mfu"))
                if step % config.log_every == 0 or step == config.total_steps or not out["finite"]:
                    writer.write(step, "train", last)
                if not out["finite"]:
                    writer.log(f"step {step}: non-finite loss or gradients, step skipped "
                               f"({int(out['skipped'])} so far)")
                    if int(jax.device_get(state.bad_steps)) >= config.max_nonfinite_steps:
                        _save(mngr, state, iterator, config, wait=True)
                        raise FloatingPointError(
                            f"{config.max_nonfinite_steps} non-finite steps in a row at step {step}: stopped "
                            f"(checkpoint saved at step {step} with the last finite parameters; lower optim.lr or "
                            f"check the data)")
                if config.eval_every > 0 and step % config.eval_every == 0:
                    writer.write(step, "val", evaluate(trainer, state.params, frozen_states, config, tok,
                                                       text_cache))
                if config.sample_every > 0 and step % config.sample_every == 0:
                    sample_grid(config, state.params, vae, encoder, text_tok, workdir / "samples" / f"step_{step}.png")
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    _save(mngr, state, iterator, config)
                _profile(config, step, workdir, stop=True)
                if preempt.requested:
                    _save(mngr, state, iterator, config, wait=True)
                    writer.log(f"preempted: checkpoint saved at step {step}; re-run the same command to resume")
                    break
            mngr.wait_until_finished()
            if step >= config.total_steps > start and not preempt.requested:
                if config.eval_every >= 0:
                    writer.write(step, "val", evaluate(trainer, state.params, frozen_states, config, tok, text_cache))
                if config.sample_every >= 0:
                    path = sample_grid(config, state.params, vae, encoder, text_tok,
                                       workdir / "samples" / f"step_{step}.png")
                    writer.log(f"sample edits: {path}")
    finally:
        writer.close()
        mngr.wait_until_finished()
        mngr.close()
    summary = {"step": step, "final_loss": last.get("loss"), "skipped": int(jax.device_get(state.skipped)),
               "step_time_s": statistics.median(times) if times else None, "workdir": str(workdir),
               "tokens_per_s_per_device": statistics.median(rates) if rates else None,
               "mfu": statistics.median(mfus) if mfus and peak == peak else None,
               "checkpoint": str(workdir / "checkpoints" / str(step))}
    stored = workdir / "summary.json"
    if not times and stored.is_file():  # nothing trained in this call: the run's own summary stands
        return json.loads(stored.read_text())
    if lead:
        stored.write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary), flush=True)
    return summary


def _profile(config, step: int, workdir: pathlib.Path, stop: bool = False) -> None:
    p = config.profile
    if p.start_step < 0:
        return
    if not stop and step == p.start_step:
        jax.profiler.start_trace(str(workdir / "profile"))
    if stop and step == p.start_step + p.num_steps:
        jax.profiler.stop_trace()


def evaluate(trainer: Trainer, params, frozen_states, config, tok, text_cache) -> dict:
    """Mean validation metrics over `eval_batches` batches of `eval_data` (no flips, no text dropout)."""
    ds = data.make_dataset(config.eval_data, seed=config.seed, batch_size=config.batch_size, tokenizer=tok)
    sums, n = {}, 0
    for local, _ in zip(ds, range(config.eval_batches)):
        template = data.template_for_step(config.seed, n, tuple(config.eval_data.templates))
        host, _ = _host_batch(local, text_cache)
        with jax.set_mesh(trainer.mesh):
            out = trainer.eval_fn(template)(params, frozen_states, data.global_batch(host, trainer.batch_sharding))
        out = jax.device_get(out)
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def sample_grid(config, params, vae, encoder, text_tok, path: pathlib.Path) -> pathlib.Path:
    """Edits the first `sample_count` held-out pairs with the current params; writes source | instruction | output |
    target rows to `path`. Collective: every process edits (the sampler spans all devices), process 0 writes."""
    editor = sampler.Editor(config, sharding.fetch(params), vae, encoder, text_tok)
    pairs = list(itertools.islice(records.iter_records(config.eval_data.paths), config.sample_count))
    sources = [images.decode(p["source"]) for p in pairs]
    outputs = editor.edit(sources, [p["instruction"] for p in pairs], preprocess="train")
    if jax.process_index() != 0:
        return path
    return report.save_grid(path, sources, [p["instruction"] for p in pairs], outputs,
                            targets=[images.decode(p["target"]) for p in pairs])


# ------------------------------------------------------------------------------------------------ CLI
def init_distributed(config: ml_collections.ConfigDict, auto: bool = False, coordinator: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins a multi-process run: `auto` (TPU pods, clusters: jax.distributed finds its peers) or an explicit
    `coordinator` HOST:PORT with `num_processes` / `process_id`; nothing otherwise. The toy assets the config needs are
    built first, in a single-process child (`assets.build_in_child`)."""
    if not (auto or coordinator):
        return
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num_processes and --process_id")
    assets.build_in_child(config)
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()


def main(argv, config: ml_collections.ConfigDict | None, workdir: str | None) -> int:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    if config is None or not workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    try:
        init_distributed(config, _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        train(config, workdir)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # flags are defined here only, so importing this module defines none
    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config (configs/*.py[:arg])", lock_config=False)
    _WORKDIR = flags.DEFINE_string("workdir", None, "output / resume directory")
    _DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, clusters)")
    _COORDINATOR = flags.DEFINE_string("coordinator", None, "coordinator HOST:PORT for an explicit multi-process run")
    _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes of an explicit multi-process run")
    _PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in an explicit multi-process run")
    app.run(lambda argv: sys.exit(main(argv, _CONFIG.value, _WORKDIR.value)))
