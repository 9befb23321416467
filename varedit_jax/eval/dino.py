"""DINO ViTs (facebookresearch/dino, e.g. `dino_vitb8` for PIE-Bench's structure distance) on weights from disk.

Source: the torch-hub state dict the user downloaded (`dino_vitb8_pretrain.pth`, or a `.safetensors` with the same
keys): cls_token (1, 1, C), pos_embed (1, 1 + N, C), patch_embed.proj.{weight (C, 3, p, p), bias},
blocks.{i}.norm1, attn.qkv (3C, C) + bias, attn.proj, norm2, mlp.fc1, mlp.fc2, norm. A training checkpoint holding
it under "teacher" / "student" / "state_dict" / "model", with "module." / "backbone." prefixes, also loads; "head.*"
(the DINO projection head) is ignored. Width, patch, depth and image size (sqrt(N) x patch) come from the shapes; the
head count is not visible in the weights: every released DINO ViT uses 64-wide heads, which is the default.
Architecture (`vit.VisionTransformer`): patch conv with bias, no pre-norm, LayerNorm eps 1e-6, exact GELU, fused qkv
split into query / key / value.
"""
import pathlib
import re

import numpy as np
from flax import nnx

from varedit_jax.params import load_param_dict
from varedit_jax import state_dicts
from varedit_jax.eval import vit

NESTED = (("teacher",), ("student",), ("state_dict",), ("model",))
HEAD_DIM = 64
_PREFIX = re.compile(r"^(module\.)?(backbone\.)?")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def clean_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips "module." / "backbone." prefixes and drops the projection head."""
    out = {_PREFIX.sub("", k): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if not k.startswith("head.")}


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


def load_dino(path, *, heads: int | None = None) -> vit.VisionTransformer:
    """A DINO ViT from a `.pth` / `.safetensors` state dict on disk (never downloads)."""
    path = pathlib.Path(path).expanduser()
    sd = clean_state_dict(state_dicts.read_state_dict(path, nested=NESTED))
    cfg = config_from_state_dict(sd, str(path), heads)
    params = params_from_state_dict(sd, cfg, str(path))
    model = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    load_param_dict(model, params)
    return model
