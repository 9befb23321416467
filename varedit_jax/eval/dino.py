"""DINO ViTs (facebookresearch/dino: `dino_vitb8` for PIE-Bench's structure distance, `dino_vits16` for EMU-Edit's
DINO score) on weights from disk, and the EMU-Edit DINO similarity.

Sources (`load_dino(path)`):
  a Hugging Face `ViTModel` folder (`facebook/dino-vitb8`, `facebook/dino-vits16`): config.json (hidden_size,
    num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps, image_size, patch_size,
    num_channels) + model.safetensors (or pytorch_model.bin) with embeddings.*, encoder.layer.{i}.attention.attention.
    {query,key,value}, attention.output.dense, intermediate.dense, output.dense, layernorm_before / _after and the
    final layernorm; pooler.* is ignored. The keys are renamed to the torch-hub layout below (q / k / v concatenated
    into qkv) and loaded by the same code. Matches `transformers.ViTModel` (5.x) to 1e-4 absolute on the keys of
    every block and the final CLS feature (tests/test_eval_models.py, tiny random configs in float32).
  the torch-hub state dict the user downloaded (`dino_vitb8_pretrain.pth`, or a `.safetensors` with the same
keys): cls_token (1, 1, C), pos_embed (1, 1 + N, C), patch_embed.proj.{weight (C, 3, p, p), bias},
blocks.{i}.norm1, attn.qkv (3C, C) + bias, attn.proj, norm2, mlp.fc1, mlp.fc2, norm. A training checkpoint holding
it under "teacher" / "student" / "state_dict" / "model", with "module." / "backbone." prefixes, also loads; "head.*"
(the DINO projection head) is ignored. Width, patch, depth and image size (sqrt(N) x patch) come from the shapes; the
head count is not visible in the weights: every released DINO ViT uses 64-wide heads, which is the default.
Architecture (`vit.VisionTransformer`): patch conv with bias, no pre-norm, LayerNorm eps 1e-6 (hub) or the config's
(HF), exact GELU, fused qkv split into query / key / value.

EMU-Edit DINO score (`ClsSimilarity`, MagicBrush `evaluation/image_eval.py`): cosine of the final-norm CLS features of
the source and the output, each prepared as torchvision Resize(256, bicubic) -> CenterCrop(224) -> /255 -> ImageNet
mean / std (PIL's bicubic resize, as torchvision applies to PIL images); the preprocessing matches torchvision 0.28.0's
transforms to 1e-5 (tests/test_eval_models.py). The torch-hub layout is checked against a plain PyTorch DINO forward
(tests/test_eval_pie.py, 2e-4).
"""
import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from varedit_jax.params import load_param_dict
from varedit_jax import images as imgs, state_dicts
from varedit_jax.eval import vit

NESTED = (("teacher",), ("student",), ("state_dict",), ("model",))
HEAD_DIM = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLS_RESIZE, CLS_CROP = 256, 224
_PREFIX = re.compile(r"^(module\.)?(backbone\.)?")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# HF ViTModel key -> torch-hub DINO key (per block: "encoder.layer.{i}." -> "blocks.{i}.").
_HF_KEYS = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_BLOCK = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
             "layernorm_before": "norm1", "layernorm_after": "norm2"}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def clean_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips "module." / "backbone." prefixes and drops the projection head."""
    out = {_PREFIX.sub("", k): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if not k.startswith("head.")}


def hub_state_dict_from_hf(sd: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """HF `ViTModel` state dict -> the torch-hub DINO layout (pooler.* dropped; q / k / v concatenated to qkv)."""
    out, qkv = {}, {}
    for key, value in sd.items():
        key = key.removeprefix("vit.")
        if key in _HF_KEYS:
            out[_HF_KEYS[key]] = value
        elif m := _HF_LAYER.match(key):
            i, module, kind = m.groups()
            if module.startswith("attention.attention."):
                qkv.setdefault((i, kind), {})[module.rsplit(".", 1)[1]] = value
            elif module in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[module]}.{kind}"] = value
            else:
                raise state_dicts.StateDictMismatch(f"{what}: unexpected ViTModel key {key!r}")
        elif not key.startswith("pooler."):
            raise state_dicts.StateDictMismatch(f"{what}: unexpected ViTModel key {key!r}")
    for (i, kind), parts in qkv.items():
        missing = [n for n in ("query", "key", "value") if n not in parts]
        if missing:
            raise state_dicts.StateDictMismatch(f"{what}: encoder.layer.{i}.attention.attention.{missing} missing")
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts[n] for n in ("query", "key", "value")])
    return out


def config_from_state_dict(sd: dict[str, np.ndarray], what: str, heads: int | None = None):
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise state_dicts.StateDictMismatch(f"{what}: not a DINO ViT state dict ({key!r} missing; keys start with "
                                       f"{sorted(sd)[:5]})")
    width, channels, patch, _ = sd["patch_embed.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise state_dicts.StateDictMismatch(f"{what}: pos_embed holds {tokens} patches, not a square grid")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    return vit.encoder_config(width=int(width), layers=layers, heads=heads or max(int(width) // HEAD_DIM, 1),
                              mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), act="gelu", eps=1e-6,
                              image_size=grid * int(patch), patch_size=int(patch), channels=int(channels),
                              patch_bias=True, pre_norm=False)


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    c, m, p = cfg.width, cfg.mlp_dim, cfg.patch_size
    shapes = {"cls_token": (1, 1, c), "pos_embed": (1, (cfg.image_size // p) ** 2 + 1, c),
              "patch_embed.proj.weight": (c, cfg.channels, p, p), "patch_embed.proj.bias": (c,),
              "norm.weight": (c,), "norm.bias": (c,)}
    block = {"norm1.weight": (c,), "norm1.bias": (c,), "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
             "attn.proj.weight": (c, c), "attn.proj.bias": (c,), "norm2.weight": (c,), "norm2.bias": (c,),
             "mlp.fc1.weight": (m, c), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (c, m), "mlp.fc2.bias": (c,)}
    for i in range(cfg.layers):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def _block_params(sd: dict[str, np.ndarray], i: int, c: int) -> dict:
    g = lambda name: np.asarray(sd[f"blocks.{i}.{name}"], np.float32)  # noqa: E731
    qkv_w, qkv_b = g("attn.qkv.weight"), g("attn.qkv.bias")
    lin = lambda w, b: {"kernel": w.T, "bias": b}  # noqa: E731
    attn = {name: lin(qkv_w[j * c:(j + 1) * c], qkv_b[j * c:(j + 1) * c])
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = lin(g("attn.proj.weight"), g("attn.proj.bias"))
    norm = lambda n: {"scale": g(f"{n}.weight"), "bias": g(f"{n}.bias")}  # noqa: E731
    return {"norm1": norm("norm1"), "attn": attn, "norm2": norm("norm2"),
            "mlp": {"fc1": lin(g("mlp.fc1.weight"), g("mlp.fc1.bias")),
                    "fc2": lin(g("mlp.fc2.weight"), g("mlp.fc2.bias"))}}


def params_from_state_dict(sd: dict[str, np.ndarray], cfg, what: str) -> dict:
    """Clean DINO state dict -> nested param dict of `vit.VisionTransformer` (float32 numpy)."""
    state_dicts.check_state_dict(sd, expected_shapes(cfg), what)
    for key, value in sd.items():
        if not np.isfinite(np.asarray(value, np.float32)).all():
            raise ValueError(f"{what}: {key!r} holds NaN or inf")
    blocks = [_block_params(sd, i, cfg.width) for i in range(cfg.layers)]
    f32 = lambda k: np.asarray(sd[k], np.float32)  # noqa: E731
    return {"patch": {"kernel": f32("patch_embed.proj.weight").transpose(2, 3, 1, 0),
                      "bias": f32("patch_embed.proj.bias")},
            "cls_token": f32("cls_token").reshape(-1), "position_embedding": f32("pos_embed")[0],
            "encoder": {"blocks": _stack(blocks)},
            "post_norm": {"scale": f32("norm.weight"), "bias": f32("norm.bias")}}


def _stack(trees: list[dict]) -> dict:
    return {k: _stack([t[k] for t in trees]) if isinstance(trees[0][k], dict) else np.stack([t[k] for t in trees])
            for k in trees[0]}


def _hf_folder(path: pathlib.Path, heads: int | None):
    """(hub-layout state dict, config) of a HF ViTModel folder; the config's fields are checked against the weights."""
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'}: not JSON: {e}") from e
    weights = path / "pytorch_model.bin" if not list(path.glob("*.safetensors")) else path
    sd = hub_state_dict_from_hf(state_dicts.read_state_dict(weights), str(path))
    cfg = config_from_state_dict(sd, str(path), heads or hf.get("num_attention_heads"))
    cfg.eps = float(hf.get("layer_norm_eps", 1e-12))  # ViTConfig's default
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise ValueError(f"{path}: only ViTs with exact GELU and qkv biases (DINO) are supported, got hidden_act "
                         f"{hf.get('hidden_act')!r}, qkv_bias {hf.get('qkv_bias')!r}")
    return sd, cfg


def load_dino(path, *, heads: int | None = None) -> vit.VisionTransformer:
    """A DINO ViT from a HF `ViTModel` folder or a `.pth` / `.safetensors` torch-hub state dict (never downloads)."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no DINO weights at {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a DINO folder needs the HF ViTModel config.json")
        sd, cfg = _hf_folder(path, heads)
    else:
        sd = clean_state_dict(state_dicts.read_state_dict(path, nested=NESTED))
        cfg = config_from_state_dict(sd, str(path), heads)
    params = params_from_state_dict(sd, cfg, str(path))
    model = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    load_param_dict(model, params)
    return model


# ------------------------------------------------------------------------------------------- EMU-Edit DINO score
def cls_preprocess(image) -> np.ndarray:
    """(H, W, 3) image -> float32 (224, 224, 3): shortest side to 256 (PIL bicubic), centre crop 224 (torchvision's
    rounding), /255, ImageNet mean / std."""
    x = imgs.to_uint8(image)
    h, w = x.shape[:2]
    new_h, new_w = (CLS_RESIZE, int(CLS_RESIZE * w / h)) if h <= w else (int(CLS_RESIZE * h / w), CLS_RESIZE)
    if (new_h, new_w) != (h, w):
        x = np.asarray(Image.fromarray(x).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = int(round((new_h - CLS_CROP) / 2.0)), int(round((new_w - CLS_CROP) / 2.0))
    x = x[top:top + CLS_CROP, left:left + CLS_CROP].astype(np.float32) / 255.0
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


class ClsSimilarity:
    """`similarity(sources, outputs)` -> (B,) cosine of DINO CLS features (the module docstring's EMU-Edit DINO)."""

    def __init__(self, dino: vit.VisionTransformer):
        self.dino = dino
        self._features = nnx.jit(lambda m, x: m(x))

    def features(self, images) -> np.ndarray:
        pixels = np.stack([cls_preprocess(im) for im in images])
        return np.asarray(self._features(self.dino, jnp.asarray(pixels)), np.float64)

    def __call__(self, sources, outputs) -> np.ndarray:
        a, b = self.features(sources), self.features(outputs)
        return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-8)
