"""Metric models from their released layouts against the reference libraries themselves, on tiny random weights
created here offline: DINO (HF `ViTModel` folders, as facebook/dino-vitb8) vs `transformers.ViTModel`; LPIPS-squeeze
(the `lpips` package's state dict) vs `lpips.LPIPS(net="squeeze", pnet_rand=True)` with its real linear heads; the
EMU-Edit DINO preprocessing vs torchvision's transforms."""
import pathlib

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from varedit_jax import state_dicts
from varedit_jax.eval import dino, lpips as lp

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16,
                layer_norm_eps=1e-6)


def write_dino_folder(folder, seed=0, image_size=224):
    """A tiny random `transformers.ViTModel` saved with save_pretrained (the released DINO folder layout); returns
    the torch model. The metrics feed DINO 224 x 224 inputs."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    config = transformers.ViTConfig(**TINY_VIT, image_size=image_size)
    model = transformers.ViTModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # HF initialises LayerNorms to the identity: perturb them so they are exercised
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def write_lpips_file(path):
    """`lpips.LPIPS(net="squeeze", pnet_rand=True)` (random backbone, the wheel's linear heads) saved as safetensors;
    returns the torch model."""
    lpips_pkg = pytest.importorskip("lpips")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = lpips_pkg.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False).eval()
    safetensors.numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(path))
    return model


@pytest.fixture(scope="module")
def hf_dino(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino_hf")
    return write_dino_folder(folder, image_size=32), dino.load_dino(folder)


def test_dino_hf_folder_matches_transformers_vit(hf_dino):
    torch = pytest.importorskip("torch")
    ref, model = hf_dino
    assert model.cfg.eps == 1e-6 and model.cfg.heads == 2 and model.encoder.num_layers == 2
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    keys = {}
    hooks = [layer.attention.k_proj.register_forward_hook(lambda m, i, o, n=n: keys.__setitem__(n, o.numpy()))
             for n, layer in enumerate(ref.layers)]
    with torch.no_grad():
        out = ref(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).last_hidden_state[:, 0].numpy()
    for h in hooks:
        h.remove()
    for layer in range(2):
        np.testing.assert_allclose(np.asarray(model.keys(pixels, layer)), keys[layer], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(model(pixels)), out, atol=1e-4, rtol=1e-4)


def test_dino_hf_folder_errors(tmp_path, hf_dino):
    with pytest.raises(FileNotFoundError, match="config.json"):
        dino.load_dino(tmp_path)
    ref, _ = hf_dino
    folder = tmp_path / "bad"
    ref.save_pretrained(folder)
    sd = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    del sd["encoder.layer.1.attention.attention.value.weight"]
    safetensors.numpy.save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(state_dicts.StateDictMismatch, match="value"):
        dino.load_dino(folder)


def test_emu_dino_preprocessing_matches_torchvision_transforms(tmp_path):
    pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    pipeline = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(dino.IMAGENET_MEAN, dino.IMAGENET_STD)])
    rng = np.random.default_rng(2)
    for shape in ((512, 512), (300, 420), (401, 257)):
        img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        ref = pipeline(Image.fromarray(img)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(dino.cls_preprocess(img), ref, atol=1e-5)
    write_dino_folder(tmp_path)
    sim = dino.ClsSimilarity(dino.load_dino(tmp_path))
    a, b = rng.integers(0, 256, (2, 300, 300, 3), dtype=np.uint8)
    got = sim([a, a], [a, b])
    assert got[0] == pytest.approx(1.0, abs=1e-6) and got[1] < 1.0


def test_lpips_package_layout_and_released_files_match_lpips_library(tmp_path):
    torch = pytest.importorskip("torch")
    lpips_pkg = pytest.importorskip("lpips")
    ref = write_lpips_file(tmp_path / "lpips_squeeze.safetensors")
    wheel_heads = state_dicts.read_state_dict(pathlib.Path(lpips_pkg.__file__).parent / "weights/v0.1/squeeze.pth")
    np.testing.assert_array_equal(ref.state_dict()["lin3.model.1.weight"].numpy(),
                                  wheel_heads["lin3.model.1.weight"])  # the released heads, not random ones
    metric = lp.load_lpips(tmp_path / "lpips_squeeze.safetensors")
    rng = np.random.default_rng(3)
    a = rng.uniform(-1, 1, (3, 45, 38, 3)).astype(np.float32)  # odd sizes exercise the ceil-mode pools
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    b[2] = a[2]
    with torch.no_grad():
        want = ref(torch.tensor(a).permute(0, 3, 1, 2), torch.tensor(b).permute(0, 3, 1, 2)).reshape(-1).numpy()
    got = metric.distances(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got[0] > 0 and got[2] == pytest.approx(0.0, abs=1e-7)
    # the two released files (torchvision backbone + the wheel's heads) in a folder load to the same metric
    folder = tmp_path / "released"
    folder.mkdir()
    backbone, heads = lp.split_lpips_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, "x")
    safetensors.numpy.save_file(backbone, str(folder / "squeezenet1_1-b8a52dc0.safetensors"))
    torch.save({k: torch.tensor(v) for k, v in heads.items()}, folder / "squeeze.pth")  # as the wheel ships it
    np.testing.assert_allclose(lp.load_lpips(folder).distances(a, b), got, rtol=1e-6)


def test_lpips_load_errors(tmp_path):
    backbone = {f"net.slice1.{k}": np.zeros(s, np.float32) for k, s in (("0.weight", (64, 3, 3, 3)),)}
    safetensors.numpy.save_file({**backbone, "scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)},
                                str(tmp_path / "bad.safetensors"))
    with pytest.raises(state_dicts.StateDictMismatch, match="scaling_layer.shift"):
        lp.load_lpips(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(backbone, str(tmp_path / "bad.safetensors"))
    with pytest.raises(state_dicts.StateDictMismatch, match="features.0.bias"):
        lp.load_lpips(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="squeeze.pth"):
        lp.load_lpips(tmp_path)  # a folder without the released files
