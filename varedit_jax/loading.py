"""Loading models: a path -> a built model with its config.

Every loader takes either form of the same model:
  official weights   a `.safetensors` / `.pth` file, or a Hugging Face folder (`*.safetensors` [+ index],
                     `config.json` for T5): imported on the fly through `varedit_jax.convert` (the architecture is
                     inferred from the shapes)
  a checkpoint       an orbax checkpoint made here (`convert import`, training, the toy builders): a manager root,
                     a training workdir (newest step) or a step directory (`checkpoint.resolve`)

  load_transformer(path)      -> (config, transformer.Infinity)          kinds "infinity" / "varedit"
                                 (`weights="ema"`: a training checkpoint's EMA instead of its params)
  load_image_tokenizer(path)  -> image_tokenizer.ImageTokenizer           kind "image_tokenizer"
  load_text_encoder(path)     -> (config, text.T5Encoder, TextTokenizer)  kind "t5"
  load_frozen(config)         -> the frozen image tokenizer, text encoder and text tokenizer of a training config
  abstract_frozen(config)     -> the same two models, abstract (shapes only), from their configs/*.py files
  load_init_params(config, params) -> a run's random init with `init_checkpoint`'s matching tensors, sharded
  serving_problems(config)    -> what the unmodified official PyTorch code cannot serve in a transformer config
This is the only module besides the `convert` CLI that imports `varedit_jax.convert`. Errors are FileNotFoundError
/ ValueError (`state_dicts.StateDictMismatch`) naming the path and the reason.
"""

import jax
import ml_collections

from etils import epath
from flax import nnx

from varedit_jax import checkpoint, configlib, image_tokenizer, storage, text, transformer
from varedit_jax import params as params_lib
from varedit_jax.convert import bundle, family

TRANSFORMER_KINDS = ("infinity", "varedit")


def is_weights(path: epath.Path) -> bool:
    """Official weights (a file, or a folder of safetensors) rather than an orbax checkpoint."""
    return path.is_file() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))


def load_params(path, kinds: tuple[str, ...], what: str, config: ml_collections.ConfigDict | None = None, *,
                weights: str = "params") -> tuple[ml_collections.ConfigDict, dict]:
    """(stored config, params) of official weights (imported as kinds[0], checked against `config`) or of a
    checkpoint whose kind is one of `kinds`; weights "ema": the checkpoint's EMA (`checkpoint.load`)."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} weights or checkpoint at {path}")
    if is_weights(path):
        if weights != "params":
            raise ValueError(f"{path} holds official weights, not a training checkpoint: it has no {weights!r} weights")
        with storage.local_copy(path) as local:  # gs://: a temporary download
            return family(kinds[0]).import_weights(local, config, kind=kinds[0])
    config, params = checkpoint.load_params(path, weights=weights)
    if config.get("kind") not in kinds:
        raise ValueError(f"{path} holds a {config.get('kind')!r} checkpoint, not one of {what} kind {kinds}")
    return config, params


def transformer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The complete transformer model config of a stored config (its `model` group)."""
    return transformer.default_model_config(**dict(config.model.items()))


def load_transformer(path, config: ml_collections.ConfigDict | None = None, *, kind: str = "varedit",
                     weights: str = "params") -> tuple[ml_collections.ConfigDict, transformer.Infinity]:
    """(config, model) from official Infinity / VAREdit weights (imported as `kind`, checked against `config`) or a
    transformer checkpoint (weights "ema": its EMA)."""
    kinds = (kind,) + tuple(k for k in TRANSFORMER_KINDS if k != kind)
    config, params = load_params(path, kinds, "transformer", config, weights=weights)
    return config, transformer.build(transformer_config(config), params)


def serving_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Why `convert export` would refuse a transformer config (`convert.bundle.serving_problems`); empty if none."""
    return bundle.serving_problems(config)


def load_image_tokenizer(path) -> image_tokenizer.ImageTokenizer:
    """The image tokenizer at `path`: official weights, an imported checkpoint, or a toy-tokenizer workdir."""
    config, params = load_params(path, (image_tokenizer.KIND,), "image tokenizer")
    return image_tokenizer.build(image_tokenizer.model_config(config.model), params)


def load_text_encoder(path, *, dtype: str | None = None
                      ) -> tuple[ml_collections.ConfigDict, text.T5Encoder, text.TextTokenizer]:
    """(config, encoder, tokenizer) from a Hugging Face T5 folder / safetensors file or a "t5" checkpoint (which
    carries its sentencepiece model). `dtype` overrides the compute dtype (bfloat16 for the frozen encoder)."""
    config, params = load_params(path, (text.KIND,), "text encoder")
    model_cfg = text.default_model_config(**dict(config.model.items()))
    if dtype is not None:
        model_cfg.dtype = config.model.dtype = dtype
    text.validate_config(model_cfg)
    tokenizer = text.TextTokenizer.from_proto(text.spiece_proto(config), f"{path} (spiece_proto)")
    return config, text.build(model_cfg, params), tokenizer


def load_frozen(config: ml_collections.ConfigDict):
    """(image tokenizer, text encoder at `text.dtype`, text tokenizer) named by a training config's
    `image_tokenizer.path` / `text.path`."""
    _, text_encoder, text_tokenizer = load_text_encoder(config.text.path, dtype=config.text.dtype)
    return load_image_tokenizer(config.image_tokenizer.path), text_encoder, text_tokenizer


def abstract_frozen(config: ml_collections.ConfigDict):
    """Abstract (image tokenizer, text encoder) from `image_tokenizer.config` / `text.config` (no weights; for AOT
    planning)."""
    tok_cfg = configlib.load(config.image_tokenizer.config).model
    text_cfg = configlib.load(config.text.config).model
    text_cfg.dtype = config.text.dtype
    return (nnx.eval_shape(lambda: image_tokenizer.ImageTokenizer(tok_cfg, rngs=nnx.Rngs(0))),
            nnx.eval_shape(lambda: text.T5Encoder(text_cfg, rngs=nnx.Rngs(0))))


def load_init_params(config: ml_collections.ConfigDict, params: dict) -> dict:
    """The transformer params a training run starts from: `params` (its random init, global arrays in their
    shardings) with every tensor of `config.init_checkpoint` (Infinity / VAREdit weights or checkpoint) whose path
    and shape match taken over, read straight into the same shardings (official weights tensor by tensor and shard
    by shard, checkpoints array by array: the model is never whole on one device or in host memory); the others
    stay at init and are listed."""
    if not config.init_checkpoint:
        return params
    path = storage.path(config.init_checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"no transformer weights or checkpoint at {path} (init_checkpoint)")
    target = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
              for k, a in params_lib.flat_leaves(params).items()}
    if is_weights(path):
        if config.init_weights != "params":
            raise ValueError(f"init_weights={config.init_weights!r} needs a training checkpoint; {path} holds "
                             f"official weights")
        with storage.local_copy(path) as local:  # gs://: a temporary download
            loaded, _ = family("varedit").import_sharded(local, target)
    else:
        stored, loaded, _ = checkpoint.load_matching(path, target, config.init_weights)
        if stored.get("kind") not in TRANSFORMER_KINDS:
            raise ValueError(f"{path} holds a {stored.get('kind')!r} checkpoint, not a transformer "
                             f"{TRANSFORMER_KINDS} (init_checkpoint)")
    kept = sorted(set(target) - set(loaded))
    print(f"initialised from {config.init_checkpoint} ({config.init_weights}): {len(loaded)} of {len(target)} "
          f"tensors; kept at init "
          f"(shape mismatch / missing): {kept if kept else 'none'}", flush=True)
    return params_lib.replace_leaves(params, loaded)
