"""CLIP in Flax NNX on Hugging Face `openai/clip-vit-*` folders from disk, and the CLIP editing metrics.

Verified (tests/test_eval_clip.py, tiny random weights): the embeddings match `transformers.CLIPModel` (5.x) to 2e-5
absolute after normalisation, the preprocessing `CLIPImageProcessor` to 1e-6, the tokenizer `CLIPTokenizerFast`
exactly, the metric formulas numpy. Numbers with the real weights (InstructPix2Pix `ClipSimilarity` for EMU-Edit,
torchmetrics `CLIPScore` for PIE-Bench) are not reproduced here: no real CLIP weights can be fetched.

Folder layout (the user's download of e.g. `openai/clip-vit-base-patch32`): `config.json` (`text_config`,
`vision_config`, `projection_dim`; missing fields take the HF CLIPConfig defaults), `model.safetensors` (or
`pytorch_model.bin`, torch extra), `vocab.json` + `merges.txt` (`clip_tokenizer`), optional
`preprocessor_config.json` (size / crop / mean / std / resample).

Architecture (HF `CLIPModel`): image embedding = visual_projection(post_layernorm(ViT CLS)), `vit.py` with a pre-norm
and a bias-free patch conv; text embedding = text_projection(final_layer_norm(causal transformer)) at the EOS
position (the first EOS = tokenizer length - 1; HF takes argmax(ids), the same token for CLIP vocabularies).
Both projections are bias-free; `logit_scale` is read and ignored.

Image preprocessing, ONE path for every metric (that of the HF `CLIPImageProcessor` and torchmetrics CLIPScore):
uint8 RGB -> PIL resize of the shortest edge to `size` (bicubic, PIL's antialiasing), centre crop `crop`, /255,
(x - mean) / std. InstructPix2Pix's EMU-Edit code instead squashes the whole image to 224x224 with
`F.interpolate(bicubic)` (no crop, no antialias): for square EMU images the two differ only in the resampling filter.

Metrics (embeddings L2-normalised; cos(a, b) = a.b / max(|a| |b|, 1e-8), so a zero vector gives 0, never NaN):
  EMU-Edit (ViT-B/32): CLIP-Out = cos(I_out, T_out); CLIP-Dir = cos(I_out - I_in, T_out - T_in) (0 when the two
    captions are equal); CLIP-I = cos(I_in, I_out). Raw cosines, averaged over samples.
  PIE-Bench (ViT-L/14): CLIP-Whole = 100 max(cos(I_out, T_edit), 0); CLIP-Edit = the same on uint8(output * mask)
    (pixels outside the edit mask set to black), NaN when the mask is empty. T_edit = editing prompt, `[ ]` removed.
"""
import dataclasses
import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from varedit_jax import state_dicts
from varedit_jax.params import load_param_dict, logical_init, logical_param, set_path
from varedit_jax import images as imgs
from varedit_jax.eval import vit
from varedit_jax.eval.clip_tokenizer import ClipTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# HF CLIPTextConfig / CLIPVisionConfig defaults (used for fields a config.json leaves out).
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                     num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                       image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
IGNORED_KEYS = ("logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
EPS = 1e-8


# ------------------------------------------------------------------------------------------------------- config
def config_from_hf(data: dict, what: str = "config.json") -> ml_collections.ConfigDict:
    """HF CLIP config.json dict -> ConfigDict(text=encoder config + vocab_size/context_length, vision=ViT config,
    projection_dim)."""
    def section(name):
        value = data.get(name) or data.get(f"{name}_dict") or {}
        if not isinstance(value, dict):
            raise ValueError(f"{what}: {name} is not an object")
        return value

    t = {**TEXT_DEFAULTS, **{k: v for k, v in section("text_config").items() if k in TEXT_DEFAULTS}}
    v = {**VISION_DEFAULTS, **{k: v for k, v in section("vision_config").items() if k in VISION_DEFAULTS}}
    try:
        text_cfg = vit.encoder_config(width=t["hidden_size"], layers=t["num_hidden_layers"],
                                      heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
                                      act=t["hidden_act"], eps=float(t["layer_norm_eps"]), causal=True)
        text_cfg.vocab_size, text_cfg.context_length = int(t["vocab_size"]), int(t["max_position_embeddings"])
        vision_cfg = vit.encoder_config(width=v["hidden_size"], layers=v["num_hidden_layers"],
                                        heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                                        act=v["hidden_act"], eps=float(v["layer_norm_eps"]),
                                        image_size=v["image_size"], patch_size=v["patch_size"],
                                        channels=v["num_channels"], patch_bias=False, pre_norm=True)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    return ml_collections.ConfigDict(dict(text=text_cfg, vision=vision_cfg,
                                          projection_dim=int(data.get("projection_dim", 512))))


# ------------------------------------------------------------------------------------------------------ modules
class TextTransformer(nnx.Module):
    """CLIP text tower: token + position embeddings -> causal blocks -> final norm; pooled at the EOS token."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, param_dtype=jnp.float32, rngs=rngs,
                                         embedding_init=logical_init(nnx.initializers.normal(0.02),
                                                                              ("vocab", "embed")))
        self.position_embedding = logical_param(
            nnx.initializers.normal(0.01)(rngs.params(), (cfg.context_length, cfg.width), jnp.float32), ("unmodeled", "embed"))
        self.encoder = vit.Encoder(cfg, rngs)
        self.final_norm = vit.layer_norm(cfg.width, cfg.eps, rngs)

    def __call__(self, ids: jax.Array, lengths: jax.Array) -> jax.Array:
        """ids (B, T) int32, lengths (B,) (EOS at lengths - 1) -> pooled (B, C) float32."""
        x = self.token_embedding(ids) + self.position_embedding[...][None, :ids.shape[1]]
        h = self.final_norm(self.encoder(x))
        return h[jnp.arange(ids.shape[0]), lengths - 1]


class ClipModel(nnx.Module):
    """`image_features(pixels)` (B, P) and `text_features(ids, lengths)` (B, P), unnormalised projections."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
        self.vision = vit.VisionTransformer(cfg.vision, rngs=rngs)
        self.text = TextTransformer(cfg.text, rngs)
        proj = lambda din: nnx.Linear(  # noqa: E731
            din, cfg.projection_dim, use_bias=False, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
            rngs=rngs, kernel_init=logical_init(nnx.initializers.normal(din ** -0.5), ("embed", "unmodeled")))
        self.visual_projection = proj(cfg.vision.width)
        self.text_projection = proj(cfg.text.width)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision(pixels))

    def text_features(self, ids: jax.Array, lengths: jax.Array) -> jax.Array:
        return self.text_projection(self.text(ids, lengths))


# --------------------------------------------------------------------------------------------- HF key table
# HF module inside `<tower>.encoder.layers.{i}.` -> (module path inside encoder.blocks, is Linear, out, in) with
# "c" = tower width and "m" = MLP width; every module has a weight and a bias.
_BLOCK = {"layer_norm1": (("norm1",), False, "c", None), "layer_norm2": (("norm2",), False, "c", None),
          "self_attn.q_proj": (("attn", "query"), True, "c", "c"),
          "self_attn.k_proj": (("attn", "key"), True, "c", "c"),
          "self_attn.v_proj": (("attn", "value"), True, "c", "c"),
          "self_attn.out_proj": (("attn", "out"), True, "c", "c"),
          "mlp.fc1": (("mlp", "fc1"), True, "m", "c"), "mlp.fc2": (("mlp", "fc2"), True, "c", "m")}


def _block_rows(tower: str, hf: str, cfg) -> list:
    dims = {"c": cfg.width, "m": cfg.mlp_dim}
    rows = []
    for i in range(cfg.layers):
        for module, (path, linear, dout, din) in _BLOCK.items():
            key, params = f"{hf}.encoder.layers.{i}.{module}", (tower, "encoder", "blocks") + path
            rows.append((params + ("kernel" if linear else "scale",), i, f"{key}.weight", "T" if linear else "",
                         (dims[dout], dims[din]) if linear else (dims[dout],)))
            rows.append((params + ("bias",), i, f"{key}.bias", "", (dims[dout],)))
    return rows


def key_table(cfg) -> list[tuple[tuple, int | None, str, str, tuple[int, ...]]]:
    """Rows (param path, layer or None, HF key, layout change, HF shape): layout "T" transposes a Linear weight,
    "conv" maps (C, in, p, p) -> (p, p, in, C), "" copies."""
    t, v, p = cfg.text, cfg.vision, cfg.projection_dim
    grid = v.image_size // v.patch_size
    rows = [
        (("text", "token_embedding", "embedding"), None, "text_model.embeddings.token_embedding.weight", "",
         (t.vocab_size, t.width)),
        (("text", "position_embedding"), None, "text_model.embeddings.position_embedding.weight", "",
         (t.context_length, t.width)),
        (("text", "final_norm", "scale"), None, "text_model.final_layer_norm.weight", "", (t.width,)),
        (("text", "final_norm", "bias"), None, "text_model.final_layer_norm.bias", "", (t.width,)),
        (("vision", "cls_token"), None, "vision_model.embeddings.class_embedding", "", (v.width,)),
        (("vision", "patch", "kernel"), None, "vision_model.embeddings.patch_embedding.weight", "conv",
         (v.width, v.channels, v.patch_size, v.patch_size)),
        (("vision", "position_embedding"), None, "vision_model.embeddings.position_embedding.weight", "",
         (grid * grid + 1, v.width)),
        (("vision", "pre_norm", "scale"), None, "vision_model.pre_layrnorm.weight", "", (v.width,)),
        (("vision", "pre_norm", "bias"), None, "vision_model.pre_layrnorm.bias", "", (v.width,)),
        (("vision", "post_norm", "scale"), None, "vision_model.post_layernorm.weight", "", (v.width,)),
        (("vision", "post_norm", "bias"), None, "vision_model.post_layernorm.bias", "", (v.width,)),
        (("visual_projection", "kernel"), None, "visual_projection.weight", "T", (p, v.width)),
        (("text_projection", "kernel"), None, "text_projection.weight", "T", (p, t.width)),
    ]
    return rows + _block_rows("text", "text_model", t) + _block_rows("vision", "vision_model", v)



def params_from_state_dict(sd: dict[str, np.ndarray], cfg, what: str) -> dict:
    """HF CLIPModel state dict -> nested param dict of `ClipModel` (float32 numpy); raises StateDictMismatch."""
    rows = key_table(cfg)
    got = {k: a for k, a in sd.items() if k not in IGNORED_KEYS}
    state_dicts.check_state_dict(got, {key: shape for _, _, key, _, shape in rows}, what)
    params, stacked = {}, {}
    for path, layer, key, layout, _ in rows:
        value = np.asarray(sd[key], np.float32)
        if not np.isfinite(value).all():
            raise ValueError(f"{what}: {key!r} holds NaN or inf")
        value = value.T if layout == "T" else value.transpose(2, 3, 1, 0) if layout == "conv" else value
        if layer is None:
            set_path(params, path, np.ascontiguousarray(value))
        else:
            stacked.setdefault(path, {})[layer] = value
    for path, layers in stacked.items():
        set_path(params, path, np.stack([layers[i] for i in range(len(layers))]))
    return params


# ------------------------------------------------------------------------------------------------ preprocessing
@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """uint8 RGB images -> normalised float32 (B, crop_h, crop_w, 3) (see the module docstring)."""
    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_hf(cls, data: dict, image_size: int) -> "ImagePreprocessor":
        """From a preprocessor_config.json dict (`size` int or {"shortest_edge"}, `crop_size` int or
        {"height", "width"}); absent fields default to the model's image size and the CLIP statistics."""
        size = data.get("size", image_size)
        size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
        crop = data.get("crop_size", image_size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), (int(crop[0]), int(crop[1])), tuple(data.get("image_mean", CLIP_MEAN)),
                   tuple(data.get("image_std", CLIP_STD)), int(data.get("resample", Image.Resampling.BICUBIC)))

    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (crop_h, crop_w, 3): shortest edge to `size`, centre crop."""
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(self.size * long / short)
        new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
        if (new_h, new_w) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=self.resample))
        ch, cw = self.crop
        if ch > new_h or cw > new_w:
            raise ValueError(f"crop {self.crop} is larger than the resized image {(new_h, new_w)}")
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        return image[top:top + ch, left:left + cw]

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.stack([self.resize_crop(imgs.to_uint8(img)) for img in images]).astype(np.float32) / 255.0
        return (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


# -------------------------------------------------------------------------------------------------- the bundle
@dataclasses.dataclass
class Clip:
    """A loaded CLIP: model, tokenizer and preprocessing. Embeddings are L2-normalised float64 numpy."""
    model: ClipModel
    tokenizer: ClipTokenizer
    preprocess: ImagePreprocessor
    batch_size: int = 32

    def __post_init__(self):
        self._images = nnx.jit(lambda m, x: m.image_features(x))
        self._texts = nnx.jit(lambda m, ids, n: m.text_features(ids, n))

    def _batches(self, n: int, chunk, fn) -> np.ndarray:
        """fn(model, *chunk(i, j)) over fixed-size batches, the last one padded by repeating its first row (one
        compile per tower); returns the (n, P) unit vectors."""
        out = []
        for i in range(0, n, self.batch_size):
            arrays = chunk(i, min(i + self.batch_size, n))
            pad = self.batch_size - len(arrays[0])
            arrays = [np.concatenate([a, np.repeat(a[:1], pad, 0)]) if pad else a for a in arrays]
            out.append(np.asarray(fn(self.model, *map(jnp.asarray, arrays)))[:self.batch_size - pad])
        return normalize(np.concatenate(out)) if out else np.zeros((0, self.model.cfg.projection_dim))

    def image_embeddings(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """images: uint8 (H, W, 3) or float [-1, 1] each (any size) -> (B, P) unit vectors."""
        return self._batches(len(images), lambda i, j: (self.preprocess(images[i:j]),), self._images)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (B, P) unit vectors (truncated to the context length)."""
        texts = list(texts)
        return self._batches(len(texts), lambda i, j: self.tokenizer(texts[i:j]), self._texts)


def _read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    if list(folder.glob("*.safetensors")) or list(folder.glob("*.safetensors.index.json")):
        return state_dicts.read_state_dict(folder)
    if (folder / "pytorch_model.bin").is_file():
        return state_dicts.read_state_dict(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"{folder}: no model.safetensors (or pytorch_model.bin) with CLIP weights")


def load_clip(folder, *, batch_size: int = 32) -> Clip:
    """Loads a Hugging Face CLIP folder (see the module docstring) from disk; never downloads."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no CLIP folder at {folder}")
    config_path = folder / "config.json"
    try:
        cfg = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder}: no config.json") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not JSON: {e}") from e
    params = params_from_state_dict(_read_weights(folder), cfg, str(folder))
    model = nnx.eval_shape(lambda: ClipModel(cfg, rngs=nnx.Rngs(0)))
    load_param_dict(model, params)
    pre_path = folder / "preprocessor_config.json"
    preprocess = ImagePreprocessor.from_hf(json.loads(pre_path.read_text()) if pre_path.is_file() else {},
                                           cfg.vision.image_size)
    tok = ClipTokenizer.from_folder(folder, cfg.text.context_length)
    if max(tok.vocab.values()) >= cfg.text.vocab_size:
        raise ValueError(f"{folder}: vocab.json has ids up to {max(tok.vocab.values())} but the model's vocabulary "
                         f"has {cfg.text.vocab_size} rows")
    return Clip(model, tok, preprocess, batch_size)


# ---------------------------------------------------------------------------------------------------- formulas
def normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(norm, 1e-12) (F.normalize), float64."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise a.b / max(|a| |b|, 1e-8) (F.cosine_similarity): 0 for a zero row."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), EPS)
    return np.sum(a * b, axis=-1) / denom


def emu_edit_scores(image_in, image_out, text_in, text_out) -> dict[str, np.ndarray]:
    """Per-sample EMU-Edit metrics from (B, P) normalised embeddings: clip_out, clip_dir, clip_i."""
    return dict(clip_out=cosine(image_out, text_out),
                clip_dir=cosine(np.asarray(image_out) - image_in, np.asarray(text_out) - text_in),
                clip_i=cosine(image_in, image_out))


def clip_score(image, text) -> np.ndarray:
    """CLIPScore per sample: 100 * max(cos, 0)."""
    return 100.0 * np.maximum(cosine(image, text), 0.0)


def emu_edit_metrics(clip: Clip, sources, outputs, input_captions: Sequence[str],
                     output_captions: Sequence[str]) -> dict[str, np.ndarray]:
    """CLIP-Out / CLIP-Dir / CLIP-I per sample for lists of source / output images and captions."""
    if not len(sources) == len(outputs) == len(input_captions) == len(output_captions):
        raise ValueError("sources, outputs and both caption lists must have the same length")
    return emu_edit_scores(clip.image_embeddings(sources), clip.image_embeddings(outputs),
                           clip.text_embeddings(input_captions), clip.text_embeddings(output_captions))


def pie_bench_metrics(clip: Clip, outputs, edit_prompts: Sequence[str], masks) -> dict[str, np.ndarray]:
    """CLIP-Whole and CLIP-Edit per sample; masks (H, W) with 1 = edit region (CLIP-Edit NaN where empty)."""
    if not len(outputs) == len(edit_prompts) == len(masks):
        raise ValueError("outputs, prompts and masks must have the same length")
    outputs = [imgs.to_uint8(o) for o in outputs]
    masks = [imgs.check_mask(m, o.shape[:2]) for m, o in zip(masks, outputs)]
    text = clip.text_embeddings(edit_prompts)
    whole = clip_score(clip.image_embeddings(outputs), text)
    edit = np.full(len(outputs), np.nan)
    keep = [i for i, m in enumerate(masks) if m.any()]
    if keep:
        masked = [(outputs[i] * masks[i][..., None]).astype(np.uint8) for i in keep]
        edit[keep] = clip_score(clip.image_embeddings(masked), text[keep])
    return dict(clip_whole=whole, clip_edit=edit)
