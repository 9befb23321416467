"""PIE-Bench metrics (varedit_jax/eval/pie_metrics.py, dino.py, lpips.py): pixel metrics against independent numpy
and torchmetrics, masking semantics, DINO keys / structure distance and LPIPS against plain PyTorch on random weights.
"""
import numpy as np
import pytest
import safetensors.numpy

from varedit_jax import state_dicts
from varedit_jax.eval import dino
from varedit_jax.eval import lpips as lp
from varedit_jax.eval import pie_metrics as pm


def _pair(shape=(20, 24, 3), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-50, 50, shape), 0, 255).astype(np.uint8)
    return a, b


def _ssim_numpy(a, b, crop=True):
    """Direct 2-D SSIM (11x11 Gaussian as an outer product, explicit window sums)."""
    a, b = a.astype(np.float64) / 255, b.astype(np.float64) / 255
    x = np.arange(-5, 6)
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    pa, pb = (np.pad(v, ((5, 5), (5, 5), (0, 0)), mode="reflect") for v in (a, b))
    h, w = a.shape[:2]

    def blur(v):
        return sum(k[i, j] * v[i:i + h, j:j + w] for i in range(11) for j in range(11))

    ma, mb = blur(pa), blur(pb)
    va, vb = np.maximum(blur(pa * pa) - ma ** 2, 0), np.maximum(blur(pb * pb) - mb ** 2, 0)
    cov = blur(pa * pb) - ma * mb
    m = ((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4))
    return (m[5:-5, 5:-5] if crop else m).mean()


def test_psnr_mse_known_values():
    a = np.zeros((8, 8, 3), np.float32) - 1.0  # black in [-1, 1]
    b = a + 0.2  # 0.1 in [0, 1] units
    assert pm.mse(a, b) == pytest.approx(0.01)
    assert pm.psnr(a, b) == pytest.approx(20.0)
    assert pm.psnr(a, a) == float("inf") and pm.mse(a, a) == 0.0
    u8 = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 4).astype(np.uint8)
    assert pm.mse(u8, u8 // 2) == pytest.approx(np.mean((u8 / 255.0 - (u8 // 2) / 255.0) ** 2))


def test_ssim_matches_direct_computation_and_torchmetrics():
    a, b = _pair()
    assert pm.ssim(a, b) == pytest.approx(_ssim_numpy(a, b), abs=1e-8)
    assert pm.ssim(a, b, crop=False) == pytest.approx(_ssim_numpy(a, b, crop=False), abs=1e-8)
    assert pm.ssim(a, a) == pytest.approx(1.0) and pm.ssim(a, b) < 0.99
    with pytest.raises(ValueError):
        pm.ssim(a[:10, :10], b[:10, :10])
    torch = pytest.importorskip("torch")
    tmi = pytest.importorskip("torchmetrics.image", reason="torchmetrics comparison")
    t = lambda x: torch.tensor(x.astype(np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    import torchmetrics
    ref = tmi.StructuralSimilarityIndexMeasure(data_range=1.0)(t(a), t(b)).item()
    new_torchmetrics = tuple(int(v) for v in torchmetrics.__version__.split(".")[:2]) >= (1, 5)
    assert pm.ssim(a, b, crop=not new_torchmetrics) == pytest.approx(ref, abs=2e-6)
    assert pm.psnr(a, b) == pytest.approx(tmi.PeakSignalNoiseRatio(data_range=1.0)(t(a), t(b)).item(), abs=1e-4)


def test_background_preservation_masking():
    a, b = _pair((24, 24, 3), seed=1)
    mask = np.zeros((24, 24), np.uint8)
    mask[4:12, 6:18] = 1
    c = b.copy()
    c[mask.astype(bool)] = 255 - c[mask.astype(bool)]  # changes inside the edit region do not count
    got, same = pm.background_preservation(a, b, mask), pm.background_preservation(a, c, mask)
    for key in ("psnr", "mse", "ssim"):
        assert got[key] == pytest.approx(same[key])
    keep = (1 - mask)[..., None]
    ua, ub = a / 255.0 * keep, b / 255.0 * keep  # zeros in the edit region, still counted in the mean
    assert got["mse"] == pytest.approx(np.mean((ua - ub) ** 2))
    assert got["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((ua - ub) ** 2)))
    assert got["ssim"] == pytest.approx(_ssim_numpy((ua * 255), (ub * 255)), abs=1e-8)
    assert np.isnan(got["lpips"])  # no LPIPS model given
    full = pm.background_preservation(a, b, np.ones((24, 24)))
    assert all(np.isnan(v) for v in full.values())  # empty unedited region
    with pytest.raises(ValueError, match="mask shape"):
        pm.background_preservation(a, b, mask[:-1])


# ------------------------------------------------------------------------------------------------------- DINO
def _dino_state_dict(width=32, layers=2, patch=16, image=224, mlp=64, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    sd = {"cls_token": r(1, 1, width), "pos_embed": r(1, (image // patch) ** 2 + 1, width),
          "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
          "norm.weight": 1 + r(width), "norm.bias": r(width)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width), p + "norm2.weight": 1 + r(width),
                   p + "norm2.bias": r(width), p + "attn.qkv.weight": r(3 * width, width),
                   p + "attn.qkv.bias": r(3 * width), p + "attn.proj.weight": r(width, width),
                   p + "attn.proj.bias": r(width), p + "mlp.fc1.weight": r(mlp, width), p + "mlp.fc1.bias": r(mlp),
                   p + "mlp.fc2.weight": r(width, mlp), p + "mlp.fc2.bias": r(width)})
    return sd


def _torch_dino_keys(sd, pixels, heads, layer):
    """Plain PyTorch DINO forward (timm-style blocks): keys (T, C) of block `layer`, heads concatenated."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.tensor(v) for k, v in sd.items()}
    with torch.no_grad():
        x = torch.tensor(pixels).permute(0, 3, 1, 2)
        w = t["patch_embed.proj.weight"]
        h = F.conv2d(x, w, t["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
        h = torch.cat([t["cls_token"], h], 1) + t["pos_embed"]
        n, c = h.shape[1], h.shape[2]
        d = c // heads
        for i in range(layer + 1):
            p = f"blocks.{i}."
            y = F.layer_norm(h, (c,), t[p + "norm1.weight"], t[p + "norm1.bias"], 1e-6)
            qkv = F.linear(y, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"]).reshape(1, n, 3, heads, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            if i == layer:  # the reference hooks attn.qkv: keys (heads, T, d) -> (T, heads * d)
                return k[0].transpose(0, 1).reshape(n, c).numpy()
            o = ((q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(1, n, c)
            h = h + F.linear(o, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
            y = F.layer_norm(h, (c,), t[p + "norm2.weight"], t[p + "norm2.bias"], 1e-6)
            h = h + F.linear(F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
                             t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    sd = _dino_state_dict()
    path = tmp_path_factory.mktemp("dino") / "dino_tiny.safetensors"
    safetensors.numpy.save_file({f"module.backbone.{k}": v for k, v in sd.items()}
                                | {"module.head.last_layer.weight": np.zeros((2, 2), np.float32)}, str(path))
    return sd, dino.load_dino(path, heads=2)


def test_dino_keys_match_plain_torch_and_structure_distance(tiny_dino):
    sd, model = tiny_dino
    assert model.cfg.image_size == 224 and model.cfg.patch_size == 16 and model.encoder.num_layers == 2
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = np.clip(src.astype(int) + rng.integers(-60, 60, src.shape), 0, 255).astype(np.uint8)
    metric = pm.StructureDistance(model)
    pixels = pm.structure_preprocess(src)
    assert pixels.shape == (224, 224, 3) and np.abs(pixels).max() > 100  # 0-255 values normalised: the quirk
    ref = _torch_dino_keys(sd, pixels[None], heads=2, layer=1)
    np.testing.assert_allclose(metric.keys(src), ref, atol=2e-4, rtol=1e-4)
    ref_out = _torch_dino_keys(sd, pm.structure_preprocess(out)[None], heads=2, layer=1)
    expected = np.mean((pm.self_similarity(ref) - pm.self_similarity(ref_out)) ** 2)
    assert metric(src, out) == pytest.approx(expected, rel=1e-3)
    assert metric(src, src) == 0.0
    assert metric(src, out) > 0
    with pytest.raises(ValueError, match="same shape"):
        metric(src, out[:128])
    with pytest.raises(ValueError, match="224x224"):  # non-square inputs need position interpolation
        metric(src[:200], out[:200])


def test_structure_preprocess_matches_torch_antialiased_resize():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for shape in ((512, 512, 3), (300, 500, 3), (200, 1000, 3)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        mine = pm.structure_preprocess(img)
        h, w = pm.structure_size(*shape[:2])
        assert mine.shape == (h, w, 3) and min(h, w) <= 224 and max(h, w) <= 480
        x = torch.tensor(img.astype(np.float32)).permute(2, 0, 1)[None]
        ref = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        ref = (ref[0].permute(1, 2, 0).numpy() - np.asarray(pm.IMAGENET_MEAN)) / np.asarray(pm.IMAGENET_STD)
        np.testing.assert_allclose(mine, ref, atol=0.05)  # values up to ~1100
    assert pm.structure_size(200, 1000) == (96, 480)  # the long side is capped at 480


def test_self_similarity_and_dino_load_errors(tmp_path):
    keys = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    sim = pm.self_similarity(keys)
    np.testing.assert_allclose(sim, [[1, 1, 0], [1, 1, 0], [0, 0, 0]])  # zero key: 0 via the eps clamp
    sd = _dino_state_dict(layers=1)
    del sd["blocks.0.attn.qkv.bias"]
    path = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(sd, str(path))
    with pytest.raises(state_dicts.StateDictMismatch, match="attn.qkv.bias"):
        dino.load_dino(path, heads=2)
    safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, str(path))
    with pytest.raises(state_dicts.StateDictMismatch, match="not a DINO"):
        dino.load_dino(path)


# ------------------------------------------------------------------------------------------------------ LPIPS
def _squeeze_state_dicts(seed=0):
    rng = np.random.default_rng(seed)
    backbone = {k: (rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.05)).astype(np.float32)
                for k, s in lp.expected_backbone_shapes().items()}
    backbone["classifier.1.weight"] = np.zeros((10, 512, 1, 1), np.float32)
    heads = {f"lin{k}.model.1.weight": rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
             for k, c in enumerate(lp.CHANNELS)}
    return backbone, heads


def _torch_lpips(backbone, heads, a, b):
    """Plain PyTorch LPIPS-squeeze (torchvision squeezenet1_1 features + LPIPS heads), inputs NCHW in [-1, 1]."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.tensor(v) for k, v in backbone.items()}

    def fire(x, i):
        s = F.relu(F.conv2d(x, t[f"features.{i}.squeeze.weight"], t[f"features.{i}.squeeze.bias"]))
        return torch.cat([F.relu(F.conv2d(s, t[f"features.{i}.expand1x1.weight"], t[f"features.{i}.expand1x1.bias"])),
                          F.relu(F.conv2d(s, t[f"features.{i}.expand3x3.weight"], t[f"features.{i}.expand3x3.bias"],
                                          padding=1))], 1)

    def feats(x):
        shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
        scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
        x = F.relu(F.conv2d((x - shift) / scale, t["features.0.weight"], t["features.0.bias"], stride=2))
        outs = [x]
        pool = lambda y: F.max_pool2d(y, 3, 2, ceil_mode=True)  # noqa: E731
        x = fire(fire(pool(x), 3), 4)
        outs.append(x)
        x = fire(fire(pool(x), 6), 7)
        outs.append(x)
        x = fire(pool(x), 9)
        outs.append(x)
        for i in (10, 11, 12):
            x = fire(x, i)
            outs.append(x)
        return outs

    with torch.no_grad():
        total = 0
        for k, (fa, fb) in enumerate(zip(feats(torch.tensor(a)), feats(torch.tensor(b)))):
            na = fa / torch.sqrt(1e-8 + (fa ** 2).sum(1, keepdim=True))
            nb = fb / torch.sqrt(1e-8 + (fb ** 2).sum(1, keepdim=True))
            total = total + F.conv2d((na - nb) ** 2, torch.tensor(heads[f"lin{k}.model.1.weight"])).mean((2, 3))
    return total[:, 0].numpy()


def test_lpips_matches_plain_torch_and_plugs_into_background_metrics(tmp_path):
    backbone, heads = _squeeze_state_dicts()
    safetensors.numpy.save_file(backbone, str(tmp_path / "squeezenet1_1.safetensors"))
    safetensors.numpy.save_file(heads, str(tmp_path / "squeeze_heads.safetensors"))
    metric = lp.load_lpips(tmp_path / "squeezenet1_1.safetensors", tmp_path / "squeeze_heads.safetensors")
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (2, 45, 38, 3)).astype(np.float32)  # odd sizes exercise the ceil-mode pools
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    got = metric.distances(a, b)
    ref = _torch_lpips(backbone, heads, a.transpose(0, 3, 1, 2), b.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert metric(a[0], a[0]) == pytest.approx(0.0, abs=1e-7) and got.min() > 0
    src, out = ((a[0] + 1) * 127.5).round().astype(np.uint8), ((b[0] + 1) * 127.5).round().astype(np.uint8)
    mask = np.zeros(src.shape[:2], np.uint8)
    mask[:10] = 1
    row = pm.background_preservation(src, out, mask, lpips=metric)
    keep = 1.0 - mask[..., None]
    expected = metric((src / 127.5 - 1) * keep + (keep - 1) * 1.0, (out / 127.5 - 1) * keep + (keep - 1) * 1.0)
    assert row["lpips"] == pytest.approx(expected, rel=1e-4)  # masked pixels are 0 in [0, 1] = -1 in [-1, 1]
    heads.pop("lin6.model.1.weight")
    safetensors.numpy.save_file(heads, str(tmp_path / "squeeze_heads.safetensors"))
    with pytest.raises(state_dicts.StateDictMismatch, match="lin6"):
        lp.load_lpips(tmp_path / "squeezenet1_1.safetensors", tmp_path / "squeeze_heads.safetensors")


def test_evaluate_and_summarize_rows(tiny_dino):
    _, model = tiny_dino
    rng = np.random.default_rng(3)
    sources = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    outputs = [sources[0], 255 - sources[1], sources[2]]
    masks = [np.zeros((64, 64)), np.zeros((64, 64)), np.ones((64, 64))]
    rows = pm.evaluate(sources, outputs, masks, structure=pm.StructureDistance(model))
    assert rows[0]["structure_distance"] == 0.0 and rows[0]["psnr"] == float("inf")
    assert rows[1]["structure_distance"] > 0 and np.isnan(rows[2]["psnr"]) and np.isnan(rows[0]["clip_whole"])
    summary = pm.summarize_pie(rows)
    assert summary["n_psnr"] == 2 and summary["n_structure_distance"] == 3 and summary["n_clip_whole"] == 0
    assert summary["mse"] == pytest.approx((rows[0]["mse"] + rows[1]["mse"]) / 2)
    with pytest.raises(ValueError, match="same length"):
        pm.evaluate(sources, outputs[:2], masks)
