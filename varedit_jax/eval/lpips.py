"""LPIPS with the SqueezeNet 1.1 backbone (torchmetrics `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`,
PIE-Bench's choice) in Flax NNX, on weights from disk.

Weights, both supplied by the user (nothing is downloaded):
  backbone  torchvision's ImageNet `squeezenet1_1` state dict (`squeezenet1_1-b8a52dc0.pth` or a .safetensors with
            its keys): features.0.{weight,bias} and features.{3,4,6,7,9,10,11,12}.{squeeze,expand1x1,expand3x3}.*;
            classifier.* is ignored.
  heads     the LPIPS linear heads: lin{k}.model.{0|1}.weight (1, C_k, 1, 1), k = 0..6 (shipped inside the
            `torchmetrics` and `lpips` packages as `.../squeeze.pth`).
Computation (inputs NHWC in [-1, 1]): x = (x - shift) / scale (shift -0.030, -0.088, -0.188; scale 0.458, 0.448,
0.450); the 7 ReLU outputs of SqueezeNet 1.1 (after conv1, fire3-4, fire5-6, fire7, fire8, fire9, fire10 with
3x3 / stride 2 ceil-mode max pools between groups); each normalised over channels by sqrt(sum x^2 + 1e-8);
d_k = squared difference, weighted channel sum by head k, mean over space; LPIPS = sum over k.
Verified: equal to `lpips.LPIPS(net="squeeze", pnet_rand=True)` of lpips 0.1.4 (with torchvision 0.28.0 / torch
2.13.0; its real linear heads from the wheel, a random backbone) to rtol 1e-4 in float32 (tests/test_eval_models.py),
and to a plain PyTorch implementation (tests/test_eval_pie.py). With ImageNet SqueezeNet weights the numbers are then
those of lpips / torchmetrics (which ships the same heads and architecture); that last step is not run here.
"""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varedit_jax.params import load_param_dict, logical_init, logical_param
from varedit_jax import state_dicts

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision squeezenet1_1 Fire modules: (features index, in channels, squeeze channels, expand channels per branch)
FIRES = ((3, 64, 16, 64), (4, 128, 16, 64), (6, 128, 32, 128), (7, 256, 32, 128), (9, 256, 48, 192),
         (10, 384, 48, 192), (11, 384, 64, 256), (12, 512, 64, 256))
# Fire modules ending each LPIPS slice after the first (relu1 = conv1), and the max pools before fire 0, 2, 4.
SLICE_ENDS = (1, 3, 4, 5, 6, 7)
POOL_BEFORE = (0, 2, 4)
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
_HEAD = re.compile(r"^lin(\d+)\.model\.\d+\.weight$")
_SLICE = re.compile(r"^net\.slice\d+\.(\d+\..+)$")
_HIGHEST = jax.lax.Precision.HIGHEST


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, padding="VALID") -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding, param_dtype=jnp.float32,
                    precision=_HIGHEST, rngs=rngs,
                    kernel_init=logical_init(nnx.initializers.lecun_normal(),
                                                      ("conv_h", "conv_w", "conv_in", "conv_out")),
                    bias_init=logical_init(nnx.initializers.zeros_init(), ("conv_out",)))


def max_pool_ceil(x: jax.Array) -> jax.Array:
    """MaxPool2d(3, stride 2, ceil_mode=True) on NHWC: windows may run past the bottom / right edge."""
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n - 3) // 2) + 1
        if (out - 1) * 2 >= n:  # the last window must start inside the input
            out -= 1
        pads.append((0, max((out - 1) * 2 + 3 - n, 0)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), [(0, 0)] + pads + [(0, 0)])


class Fire(nnx.Module):
    def __init__(self, cin: int, squeeze: int, expand: int, rngs: nnx.Rngs):
        self.squeeze = _conv(cin, squeeze, 1, rngs)
        self.expand1x1 = _conv(squeeze, expand, 1, rngs)
        self.expand3x3 = _conv(squeeze, expand, 3, rngs, padding=((1, 1), (1, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jax.nn.relu(self.squeeze(x))
        return jnp.concatenate([jax.nn.relu(self.expand1x1(s)), jax.nn.relu(self.expand3x3(s))], axis=-1)


class Lpips(nnx.Module):
    """`__call__(a, b)`: a, b (B, H, W, 3) in [-1, 1] -> (B,) LPIPS distances."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = _conv(3, 64, 3, rngs, stride=2)
        self.fires = nnx.List([Fire(cin, sq, ex, rngs) for _, cin, sq, ex in FIRES])
        self.heads = nnx.List([logical_param(jnp.full((c,), 1.0 / c, jnp.float32), ("unmodeled",))
                               for c in CHANNELS])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The 7 slice outputs (relu1 .. relu7) of the scaled input."""
        x = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        x = jax.nn.relu(self.conv1(x))
        outs = [x]
        for i, fire in enumerate(self.fires):
            x = fire(max_pool_ceil(x) if i in POOL_BEFORE else x)
            if i in SLICE_ENDS:
                outs.append(x)
        return outs

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        total = 0.0
        for fa, fb, head in zip(self.features(a), self.features(b), self.heads):
            na = fa * jax.lax.rsqrt(jnp.sum(fa * fa, -1, keepdims=True) + 1e-8)
            nb = fb * jax.lax.rsqrt(jnp.sum(fb * fb, -1, keepdims=True) + 1e-8)
            total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", (na - nb) ** 2, head[...], precision=_HIGHEST),
                                     axis=(1, 2))
        return total


# ------------------------------------------------------------------------------------------------------ loading
def expected_backbone_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,)}
    for idx, cin, sq, ex in FIRES:
        for name, (o, i, k) in (("squeeze", (sq, cin, 1)), ("expand1x1", (ex, sq, 1)), ("expand3x3", (ex, sq, 3))):
            shapes[f"features.{idx}.{name}.weight"] = (o, i, k, k)
            shapes[f"features.{idx}.{name}.bias"] = (o,)
    return shapes


def params_from_state_dicts(backbone: dict[str, np.ndarray], heads: dict[str, np.ndarray], what: str) -> dict:
    """torchvision squeezenet1_1 + LPIPS head state dicts -> nested param dict of `Lpips`."""
    backbone = {k: v for k, v in backbone.items() if not k.startswith("classifier.")}
    state_dicts.check_state_dict(backbone, expected_backbone_shapes(), f"{what} (SqueezeNet 1.1 backbone)")
    found = {int(m.group(1)): v for k, v in heads.items() if (m := _HEAD.match(k))}
    want = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    got = {f"lin{k}.model.1.weight": v for k, v in found.items()}
    state_dicts.check_state_dict(got, want, f"{what} (LPIPS heads lin0..lin6)")
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    conv = lambda key: {"kernel": f32(backbone[f"{key}.weight"]).transpose(2, 3, 1, 0),  # noqa: E731
                        "bias": f32(backbone[f"{key}.bias"])}
    return {"conv1": conv("features.0"),
            "fires": {i: {n: conv(f"features.{idx}.{n}") for n in ("squeeze", "expand1x1", "expand3x3")}
                      for i, (idx, _, _, _) in enumerate(FIRES)},
            "heads": {k: f32(found[k]).reshape(-1) for k in range(len(CHANNELS))}}


class LpipsMetric:
    """`metric(a, b) -> float` for two (H, W, 3) images in [-1, 1] (float); batched `distances(a, b)`."""

    def __init__(self, model: Lpips):
        self.model = model
        self._run = nnx.jit(lambda m, a, b: m(a, b))

    def distances(self, a, b) -> np.ndarray:
        return np.asarray(self._run(self.model, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))

    def __call__(self, a, b) -> float:
        return float(self.distances(np.asarray(a)[None], np.asarray(b)[None])[0])


def split_lpips_state_dict(sd: dict[str, np.ndarray], what: str) -> tuple[dict, dict]:
    """An `lpips.LPIPS(net="squeeze")` state dict -> (torchvision backbone dict, heads dict)."""
    for name, want in (("shift", SHIFT), ("scale", SCALE)):
        got = sd.get(f"scaling_layer.{name}")
        if got is not None and not np.allclose(np.asarray(got).reshape(-1), want, atol=1e-6):
            raise state_dicts.StateDictMismatch(f"{what}: scaling_layer.{name} is {np.ravel(got)}, expected {want}")
    backbone = {f"features.{m.group(1)}": v for k, v in sd.items() if (m := _SLICE.match(k))}
    heads = {k: v for k, v in sd.items() if _HEAD.match(k)}
    if not backbone:
        raise state_dicts.StateDictMismatch(f"{what}: no net.slice*.* keys: not an lpips.LPIPS(net='squeeze') "
                                            f"state dict (keys start with {sorted(sd)[:4]})")
    return backbone, heads


def _released_files(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    backbones = sorted(p for p in folder.iterdir() if p.name.startswith("squeezenet1_1"))
    heads = folder / "squeeze.pth"
    if len(backbones) != 1 or not heads.is_file():
        raise FileNotFoundError(f"{folder}: expected one squeezenet1_1*.pth / .safetensors (torchvision) and the "
                                f"LPIPS heads squeeze.pth, found {sorted(p.name for p in folder.iterdir())}")
    return backbones[0], heads


def load_lpips(path, heads_path=None) -> LpipsMetric:
    """LPIPS-squeeze from an lpips.LPIPS state-dict file, a folder of the two released files, or explicit
    (backbone, heads) files (see the module docstring)."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no LPIPS weights at {path}")
    if heads_path is None and path.is_dir():
        path, heads_path = _released_files(path)
    if heads_path is None:
        backbone, heads = split_lpips_state_dict(state_dicts.read_state_dict(path), str(path))
        what = str(path)
    else:
        heads_path = pathlib.Path(heads_path).expanduser()
        backbone, heads = state_dicts.read_state_dict(path), state_dicts.read_state_dict(heads_path)
        what = f"{path} + {heads_path}"
    params = params_from_state_dicts(backbone, heads, what)
    model = nnx.eval_shape(lambda: Lpips(rngs=nnx.Rngs(0)))
    load_param_dict(model, params)
    return LpipsMetric(model)
