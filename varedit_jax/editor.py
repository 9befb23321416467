"""Instruction-guided editing: images and instructions in, edited images out (`Editor`), over `sampler.Sampler`.

Host preprocessing (PIL) -> one jitted device step: uint8 -> [-1, 1] -> image tokenizer encode (raw features) ->
`quantizer.source_grid` -> the sampler -> image tokenizer decode (clamped) -> uint8 by truncation (official).
  preprocess "official" (infer.py): white pad to a square at the top-left, LANCZOS resize to the square template's
      pixel size; the output is LANCZOS-resized to the padded square and cropped back to the input size.
  preprocess "train" (the training pipeline, `images.cover_resize`): the nearest aspect template, LANCZOS
      cover-resize and centre crop to its pixel size; the output stays at that size (the crop cannot be undone).
  multi-turn: turn t edits turn t-1's uint8 output without leaving the device (same jitted step, seed + t), so it
      equals single edits chained through saved images (on the model-size canvas; official crop-back at the end).
Text: instructions are tokenized to the text max length and cut to the shortest bucket (TEXT_BUCKETS) holding the
longest one (padding keys are masked, so features are unchanged); one compile per bucket.
Sampling options (guidance, tau, top-k, top-p, seed): one `sampler.SamplingOptions`; sample i of a call draws from
`fold_in(key(seed), indices[i])`, so results do not depend on batching.
"""
import functools
import logging
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from varedit_jax import conditioning, images, loading, quantizer, sampler, schedules, sharding, text, transformer
from varedit_jax.sampler import SamplingOptions, TextInputs

PREPROCESS = ("official", "train")
TEXT_BUCKETS = (32, 64, 128, 256, 512)
WHITE = (255, 255, 255)


class ConfigMismatch(ValueError):
    """The transformer, image tokenizer and text encoder do not fit together (bits, patchify, text width, lengths)."""


@functools.partial(jax.jit, static_argnames=("graphdef", "tok_graphdef", "layout", "mesh"))
def _edit_jit(graphdef, state, tok_graphdef, tok_state, layout, pixels, texts, seed, index, sampling, *, mesh):
    """uint8 images (B, H, W, 3) -> (edited uint8 images, SampleOutput without logits)."""
    model, image_tok = nnx.merge(graphdef, state), nnx.merge(tok_graphdef, tok_state)
    source = quantizer.source_grid(image_tok.encode(images.to_model_range(pixels)), layout.schedule,
                                   model.cfg.patchify)
    out = sampler.sample_scales(model, layout, texts, source, seed, index, sampling, mesh=mesh)
    return images.to_uint8_official(image_tok.decode(out.summed)), out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_text_jit(graphdef, state, ids, mask):
    return text.encode(nnx.merge(graphdef, state), ids, mask)


# ------------------------------------------------------------------------------------------------ pre/post-processing
def as_uint8_image(image) -> np.ndarray:
    """A PIL image or an (H, W, 3) uint8 array -> uint8 (H, W, 3) RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"images must be PIL images or uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
    return arr


def choose_template(shape: tuple[int, int], preprocess: str) -> str:
    """The aspect template of an (H, W) image: square for the official padding, else the nearest one."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    return "1.0" if preprocess == "official" else schedules.nearest_template(shape[0] / shape[1])


log = logging.getLogger(__name__)
MAX_UPSCALE, MAX_LOST = 2.0, 0.2  # beyond these an input is warned about: upscaled, or share cropped / padded


def resize_warning(original: tuple[int, int], size: tuple[int, int], preprocess: str) -> str | None:
    """What is odd about fitting an (h, w) image to the (H, W) template, or None: an upscale beyond MAX_UPSCALE, or
    more than MAX_LOST of the model input cropped away (train) or padding (official)."""
    (h, w), (th, tw) = original, size
    if preprocess == "official":  # pad to the square of the longer side, then resize
        scale, lost, how = max(th, tw) / max(h, w), 1 - h * w / max(h, w) ** 2, "padding"
    else:  # cover, then centre-crop
        scale = max(th / h, tw / w)
        lost, how = 1 - th * tw / (h * scale * w * scale), "cropped away"
    notes = ([f"upscaled {scale:.1f}x"] if scale > MAX_UPSCALE else []) + \
            ([f"{lost:.0%} of it {how}"] if lost > MAX_LOST else [])
    return f"{w}x{h} input resized to {tw}x{th}: " + ", ".join(notes) if notes else None


def preprocess_image(image: np.ndarray, size: tuple[int, int], preprocess: str) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3) model input (see the module docstring); an odd fit is warned about."""
    warning = resize_warning(image.shape[:2], size, preprocess)
    if warning:
        log.warning("%s (the edit may be poor)", warning)
    img = Image.fromarray(image)
    if preprocess == "official":
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), WHITE)
        canvas.paste(img, (0, 0))
        return np.asarray(canvas.resize((size[1], size[0]), Image.Resampling.LANCZOS))
    if preprocess == "train":
        return images.cover_resize(img, size, Image.Resampling.LANCZOS)
    raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")


def postprocess_image(output: np.ndarray, original: tuple[int, int], preprocess: str) -> np.ndarray:
    """Model output uint8 (H, W, 3) -> the returned image: official: LANCZOS to the padded square of the input,
    crop (0, 0, w, h); train: unchanged."""
    if preprocess != "official":
        return output
    h, w = original
    side = max(h, w)
    return np.asarray(Image.fromarray(output).resize((side, side), Image.Resampling.LANCZOS))[:h, :w]


# ------------------------------------------------------------------------------------------------ the Editor
def _text_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.get("text") or ml_collections.ConfigDict()


class Editor:
    """Instruction-guided editing with a VAREdit transformer, its image tokenizer and text encoder.

    config: the transformer checkpoint config (kind "varedit", conditioning, pn, model, optional text.max_len);
    params: the transformer's parameter tree; image_tok: `image_tokenizer.ImageTokenizer`; text_encoder:
    `text.T5Encoder`; text_tokenizer: `text.TextTokenizer`. mesh: default `sampler.inference_mesh(tensor=tensor)` over
    every device; batch_size: samples per device step (default: the data-parallel size), padded to a multiple of it;
    rules: logical axis rules (default `sharding.DEFAULT_RULES`). Models already placed on `mesh` by `rules` (a
    training run's) are used in place, never gathered or copied.
    """

    def __init__(self, config: ml_collections.ConfigDict, params, image_tok, text_encoder, text_tokenizer, *,
                 mesh: jax.sharding.Mesh | None = None, tensor: int = 1, batch_size: int | None = None, rules=None):
        if config.get("kind") not in ("varedit", None):
            raise ConfigMismatch(f"the checkpoint is a {config.get('kind')!r} model, not an editing model ('varedit')")
        self.config = config
        self.conditioning = conditioning.parse(config.get("conditioning"))
        model_cfg = transformer.default_model_config(**dict(config.model.items()))
        check_components(model_cfg, image_tok, text_encoder)
        self.text_len = text_max_len(config, model_cfg, text_encoder)
        self.mesh = mesh if mesh is not None else sampler.inference_mesh(tensor=tensor)
        self.rules = rules
        self.sampler = sampler.Sampler.from_model(transformer.build(model_cfg, params), self.mesh, rules)
        self.tok_graphdef, self.tok_state = self._place(image_tok)
        self.text_graphdef, self.text_state = self._place(text_encoder)
        self.stride = image_tok.stride
        self.text_tokenizer = text_tokenizer
        dp = self.sampler.data_size
        self.batch_size = -(-(batch_size or dp) // dp) * dp

    def _place(self, model: nnx.Module):
        graphdef, state = nnx.split(model)
        return graphdef, sharding.place(state, sharding.param_shardings(state, self.mesh, self.rules))

    @classmethod
    def from_checkpoint(cls, path, image_tokenizer: str | None = None, text_encoder: str | None = None,
                        **kwargs) -> "Editor":
        """An Editor from a transformer checkpoint (trained / imported orbax checkpoint, or official weights) with
        the image tokenizer and text encoder at `image_tokenizer` / `text_encoder` (override the config's
        `image_tokenizer.path` / `text.path`). Raises FileNotFoundError / ConfigMismatch / ValueError with the
        reason."""
        config, model = loading.load_transformer(path)
        tok_path = image_tokenizer or (config.get("image_tokenizer") or {}).get("path")
        text_path = text_encoder or _text_config(config).get("path")
        if not tok_path:
            raise ConfigMismatch(f"{path}: the config names no image tokenizer (image_tokenizer.path): pass "
                                 "--image-tokenizer")
        if not text_path:
            raise ConfigMismatch(f"{path}: the config names no text encoder (text.path): pass --text-encoder")
        _, encoder, text_tokenizer = loading.load_text_encoder(text_path)
        return cls(config, transformer.param_dict(model), loading.load_image_tokenizer(tok_path), encoder,
                   text_tokenizer, **kwargs)

    # -------------------------------------------------------------------------------------------- text
    def encode_text(self, prompts: Sequence[str], length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (features (B, T, Ct), mask (B, T)) on the mesh; T = `length` or the bucket of the longest."""
        ids, mask = self.text_tokenizer(list(prompts), self.text_len)
        t = length or text_bucket(int(mask.sum(1).max()), self.text_len)
        ids, mask = sampler.pad_rows((ids[:, :t], mask[:, :t]), self.sampler.data_size)
        ids, mask = sampler.shard_batch((ids, mask), self.mesh)
        with jax.set_mesh(self.mesh):
            feats, mask = _encode_text_jit(self.text_graphdef, self.text_state, ids, mask)
        return feats[:len(prompts)], mask[:len(prompts)]

    def _texts(self, prompts: Sequence[str], negative: Sequence[str | None] | None) -> TextInputs:
        prompts = list(prompts)
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise ValueError(f"empty instruction at indices {empty}")
        negs = [None] * len(prompts) if negative is None else list(negative)
        use = np.array([n is not None for n in negs])
        lengths = self.text_tokenizer(prompts + [n for n in negs if n is not None], self.text_len)[1].sum(1)
        t = text_bucket(int(lengths.max()), self.text_len)
        feats, mask = self.encode_text(prompts, t)
        if not use.any():
            return sampler.text_inputs(feats, mask)
        neg_feats, neg_mask = self.encode_text([n if n is not None else p for n, p in zip(negs, prompts)], t)
        return sampler.text_inputs(feats, mask, (neg_feats, neg_mask), use)

    # -------------------------------------------------------------------------------------------- editing
    def schedule(self, template: str, resolution: int | None) -> schedules.Schedule:
        return schedules.scale_schedule(template, sampler.size_class(self.config, resolution))

    def edit(self, inputs, instructions: Sequence[str], options: SamplingOptions = SamplingOptions(), *,
             resolution: int | None = None, preprocess: str = "official", negative=None,
             indices=None) -> list[np.ndarray]:
        """Edits images (uint8 (B, H, W, 3), or a list of PIL images / uint8 arrays) by one instruction each ->
        list of uint8 (H, W, 3) images (see the module docstring for sizes). negative: None, one string for all, or
        a list (None entries: cfg_uncond). indices: global sample indices for the keys (default 0..B-1)."""
        return self.edit_turns(inputs, [instructions], options, resolution=resolution, preprocess=preprocess,
                               negative=negative, indices=indices)[-1]

    def edit_turns(self, inputs, turns: Sequence[Sequence[str]], options: SamplingOptions = SamplingOptions(), *,
                   resolution: int | None = None, preprocess: str = "official", negative=None,
                   indices=None) -> list[list[np.ndarray]]:
        """Multi-turn editing: turns[t][i] is image i's instruction at turn t; turn t edits turn t-1's output on the
        device with seed + t. Returns the images of every turn, [turn][image]."""
        sampler.seed_array(options.seed + max(len(turns) - 1, 0))
        arrays = [as_uint8_image(im) for im in (list(inputs) if not isinstance(inputs, np.ndarray) else inputs)]
        n = len(arrays)
        turns = [list(t) for t in turns]
        if not turns or any(len(t) != n for t in turns):
            raise ValueError(f"every turn needs one instruction per image ({n}), got {[len(t) for t in turns]}")
        negs = [negative] * n if negative is None or isinstance(negative, str) else list(negative)
        if len(negs) != n:
            raise ValueError(f"negative: expected {n} prompts, got {len(negs)}")
        indices = np.arange(n) if indices is None else np.asarray(indices)
        if indices.shape != (n,):
            raise ValueError(f"indices must have shape ({n},), got {indices.shape}")
        results = [[None] * n for _ in turns]
        groups: dict[str, list[int]] = {}
        for i, arr in enumerate(arrays):
            groups.setdefault(choose_template(arr.shape[:2], preprocess), []).append(i)
        for template, members in groups.items():
            layout = conditioning.sequence_layout(self.conditioning, self.schedule(template, resolution), template)
            size = schedules.pixel_size(layout.schedule, self.stride)
            sampling = options.per_scale(len(layout.schedule))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = np.stack([preprocess_image(arrays[i], size, preprocess) for i in chunk])
                outs = self._run_turns(layout, batch, [[t[i] for i in chunk] for t in turns],
                                       [negs[i] for i in chunk], indices[chunk], options.seed, sampling)
                for t, out in enumerate(outs):
                    for j, i in enumerate(chunk):
                        results[t][i] = postprocess_image(out[j], arrays[i].shape[:2], preprocess)
        return results

    def _run_turns(self, layout, batch: np.ndarray, turns, negs, indices, seed: int,
                   sampling: sampler.ScaleSampling) -> list[np.ndarray]:
        """One chunk through every turn on the device; returns uint8 (b, H, W, 3) per turn."""
        b, dp = len(batch), self.sampler.data_size
        current = sampler.shard_batch(sampler.pad_rows(batch, dp), self.mesh)
        index = sampler.shard_batch(sampler.pad_rows(np.asarray(indices, np.int32), dp), self.mesh)
        outs = []
        for t, prompts in enumerate(turns):
            texts = self._texts(prompts, negs if any(n is not None for n in negs) else None)
            texts = sampler.shard_batch(sampler.pad_rows(texts, dp), self.mesh)
            with jax.set_mesh(self.mesh):
                current, out = _edit_jit(self.sampler.graphdef, self.sampler.state, self.tok_graphdef,
                                         self.tok_state, layout, current, texts, sampler.seed_array(seed + t), index,
                                         sampling, mesh=self.mesh)
            outs.append((current, out.finite))
        fetched = []
        for t, (images_t, finite) in enumerate(sharding.fetch(outs)):
            bad = [int(indices[j]) for j in np.flatnonzero(~np.asarray(finite)[:b])]
            if bad:
                raise FloatingPointError(f"non-finite logits at turn {t} for samples {bad} (corrupt weights or "
                                         "inputs?)")
            fetched.append(np.asarray(images_t)[:b])
        return fetched


def text_bucket(length: int, max_len: int) -> int:
    """The shortest TEXT_BUCKETS entry >= length, capped at max_len."""
    return min(next((b for b in TEXT_BUCKETS if b >= length), max_len), max_len)


def text_max_len(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, text_encoder) -> int:
    """Tokenizer length: the config's text.max_len (must fit the model's cfg_uncond rows), else the model's
    text_max_len."""
    wanted = _text_config(config).get("max_len")
    if wanted is None:
        return int(model_cfg.text_max_len)
    if int(wanted) > model_cfg.text_max_len:
        raise ConfigMismatch(f"text.max_len {wanted} exceeds the transformer's text_max_len "
                             f"{model_cfg.text_max_len} (rows of cfg_uncond)")
    return int(wanted)


def check_components(model_cfg: ml_collections.ConfigDict, image_tok, text_encoder) -> None:
    """Raises ConfigMismatch when the image tokenizer's bits / patchify or the text encoder's width do not fit the
    transformer."""
    bits = quantizer.token_dim(image_tok.codebook_dim, image_tok.patchify)
    if bits != model_cfg.bits or bool(image_tok.patchify) != bool(model_cfg.patchify):
        raise ConfigMismatch(f"image tokenizer gives {bits}-bit tokens (d={image_tok.codebook_dim}, patchify="
                             f"{image_tok.patchify}) but the transformer expects {model_cfg.bits} bits "
                             f"(patchify={model_cfg.patchify})")
    width = text_encoder.cfg.d_model
    if width != model_cfg.text_dim:
        raise ConfigMismatch(f"text encoder width {width} != the transformer's text_dim {model_cfg.text_dim}")
