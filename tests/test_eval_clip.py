"""CLIP on tiny random weights in the Hugging Face layout (varedit_jax/eval/clip.py, clip_tokenizer.py, vit.py).

The folder is written here with the real HF key names; the model is checked against a plain PyTorch forward
written below and, when `transformers` is installed, against HF `CLIPModel` / `CLIPTokenizerFast` /
`CLIPImageProcessor` on the same folder. Metric formulas are checked against numpy on known vectors.
"""
import json

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from varedit_jax import state_dicts

pytest.importorskip("regex", reason="the CLIP tokenizer needs the regex package")
from varedit_jax.eval import clip  # noqa: E402
from varedit_jax.eval import clip_tokenizer as ct  # noqa: E402

CORPUS = ["a photo of a cat", "a photo of a dog on the grass", "remove the red car", "make the sky blue"]
TINY = dict(width=32, layers=2, heads=4, mlp=64, image=32, patch=8, ctx=16, proj=24)


def write_tokenizer(folder, corpus=CORPUS, num_merges=40) -> dict:
    """A byte-level BPE vocabulary laid out as CLIP's (256 bytes, 256 bytes + "</w>", merges, 2 specials) with
    merges learned greedily from `corpus`; writes vocab.json + merges.txt."""
    table = ct.byte_table()
    vocab = {}
    for suffix in ("", "</w>"):
        for b in range(256):
            vocab[table[b] + suffix] = len(vocab)
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for text in corpus for w in text.lower().split()]
    merges = []
    for _ in range(num_merges):
        counts = {}
        for w in words:
            for pair in zip(w[:-1], w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        vocab["".join(best)] = len(vocab)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        words = merged
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab


def write_clip_folder(folder, seed=0, width=32, layers=2, heads=4, mlp=64, image=32, patch=8, ctx=16, proj=24):
    """A tiny random CLIPModel folder: HF key names, config.json, preprocessor_config.json, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = len(write_tokenizer(folder))
    rng = np.random.default_rng(seed)
    r = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    sd = {"text_model.embeddings.token_embedding.weight": r(vocab_size, width),
          "text_model.embeddings.position_embedding.weight": r(ctx, width),
          "vision_model.embeddings.class_embedding": r(width),
          "vision_model.embeddings.patch_embedding.weight": r(width, 3, patch, patch),
          "vision_model.embeddings.position_embedding.weight": r((image // patch) ** 2 + 1, width),
          "visual_projection.weight": r(proj, width), "text_projection.weight": r(proj, width),
          "logit_scale": np.array(2.6592, np.float32)}
    for name in ("text_model.final_layer_norm", "vision_model.pre_layrnorm", "vision_model.post_layernorm"):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(width), r(width)
    for tower in ("text_model", "vision_model"):
        for i in range(layers):
            p = f"{tower}.encoder.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd[f"{p}self_attn.{name}.weight"], sd[f"{p}self_attn.{name}.bias"] = r(width, width), r(width)
            for name in ("layer_norm1", "layer_norm2"):
                sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = 1 + r(width), r(width)
            sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"] = r(mlp, width), r(mlp)
            sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"] = r(width, mlp), r(width)
    safetensors.numpy.save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": proj,
        "text_config": {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": mlp,
                        "num_attention_heads": heads, "num_hidden_layers": layers, "max_position_embeddings": ctx,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": vocab_size - 2,
                        "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1},
        "vision_config": {"hidden_size": width, "intermediate_size": mlp, "num_attention_heads": heads,
                          "num_hidden_layers": layers, "image_size": image, "patch_size": patch,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image, "width": image}, "size": {"shortest_edge": image}, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "resample": 3, "image_mean": list(clip.CLIP_MEAN),
        "image_std": list(clip.CLIP_STD), "image_processor_type": "CLIPImageProcessor"}))
    return sd


def torch_clip(sd, pixels, ids, lengths, heads=4):
    """Plain PyTorch CLIP forward from the HF state dict: (image features, text features), unnormalised."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.tensor(v) for k, v in sd.items()}

    def tower(h, prefix, causal):
        b, n, c = h.shape
        d = c // heads
        i = 0
        while f"{prefix}.encoder.layers.{i}.mlp.fc1.weight" in t:
            p = f"{prefix}.encoder.layers.{i}."
            y = F.layer_norm(h, (c,), t[p + "layer_norm1.weight"], t[p + "layer_norm1.bias"], 1e-5)
            q, k, v = (F.linear(y, t[f"{p}self_attn.{m}_proj.weight"], t[f"{p}self_attn.{m}_proj.bias"])
                       .reshape(b, n, heads, d).transpose(1, 2) for m in "qkv")
            logits = q @ k.transpose(-1, -2) * d ** -0.5
            if causal:
                logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            h = h + F.linear(o, t[p + "self_attn.out_proj.weight"], t[p + "self_attn.out_proj.bias"])
            y = F.layer_norm(h, (c,), t[p + "layer_norm2.weight"], t[p + "layer_norm2.bias"], 1e-5)
            y = F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])
            h = h + F.linear(y * torch.sigmoid(1.702 * y), t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
            i += 1
        return h

    with torch.no_grad():
        x = torch.tensor(pixels).permute(0, 3, 1, 2)
        w = t["vision_model.embeddings.patch_embedding.weight"]
        patches = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
        cls = t["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
        h = torch.cat([cls, patches], 1) + t["vision_model.embeddings.position_embedding.weight"]
        c = h.shape[-1]
        h = F.layer_norm(h, (c,), t["vision_model.pre_layrnorm.weight"], t["vision_model.pre_layrnorm.bias"], 1e-5)
        h = tower(h, "vision_model", False)[:, 0]
        h = F.layer_norm(h, (c,), t["vision_model.post_layernorm.weight"], t["vision_model.post_layernorm.bias"],
                         1e-5)
        image = h @ t["visual_projection.weight"].T
        ids_t = torch.tensor(ids, dtype=torch.long)
        h = t["text_model.embeddings.token_embedding.weight"][ids_t]
        h = h + t["text_model.embeddings.position_embedding.weight"][:ids_t.shape[1]]
        h = tower(h, "text_model", True)
        h = F.layer_norm(h, (c,), t["text_model.final_layer_norm.weight"], t["text_model.final_layer_norm.bias"],
                         1e-5)
        text = h[torch.arange(len(ids)), torch.tensor(lengths, dtype=torch.long) - 1] @ t["text_projection.weight"].T
    return image.numpy(), text.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    sd = write_clip_folder(folder)
    return folder, sd, clip.load_clip(folder, batch_size=3)


def _images(n, rng, shapes=((48, 40), (32, 64), (32, 32), (40, 40))):
    return [rng.integers(0, 256, shapes[i % len(shapes)] + (3,), dtype=np.uint8) for i in range(n)]


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_layout_normalisation_truncation(tiny):
    folder, _, model = tiny
    tok = model.tokenizer
    ids, lengths = tok(["a photo of a cat", "A   PHOTO\tof a CAT ", "", "cat " * 20])
    assert ids.shape == (4, TINY["ctx"]) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0], ids[1])  # lowercase + whitespace runs collapse
    assert ids[0, 0] == tok.bos_id and ids[0, lengths[0] - 1] == tok.eos_id
    assert (ids[0, lengths[0]:] == tok.eos_id).all()  # padded with EOS, as HF
    assert lengths[2] == 2 and list(ids[2, :2]) == [tok.bos_id, tok.eos_id]
    assert lengths[3] == TINY["ctx"] and ids[3, -1] == tok.eos_id  # truncated, EOS kept last
    # "cat</w>" was merged into one symbol by the corpus merges; an unseen word falls back to byte symbols.
    assert tok.encode("cat") == [tok.vocab["cat</w>"]]
    assert tok.encode("zq") == [tok.vocab["z"], tok.vocab["q</w>"]]
    assert tok.encode("it's") == tok.encode("it") + tok.encode("'s")
    with pytest.raises(TypeError):
        tok("a single string")


def test_tokenizer_matches_hf_fast_tokenizer(tiny):
    transformers = pytest.importorskip("transformers", reason="HF comparison needs transformers")
    folder, _, model = tiny
    texts = CORPUS + ["A  PHOTO of café 123!", "", "x" * 40, "don't   stop, ok?"]
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(folder))
    enc = hf(texts, padding="max_length", max_length=TINY["ctx"], truncation=True)
    ids, lengths = model.tokenizer(texts)
    np.testing.assert_array_equal(ids, np.asarray(enc["input_ids"]))
    np.testing.assert_array_equal(lengths, np.asarray(enc["attention_mask"]).sum(-1))


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ct.ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a</w>": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="special token"):
        ct.ClipTokenizer.from_folder(tmp_path)
    tok = ct.ClipTokenizer({"a</w>": 0, ct.BOS: 1, ct.EOS: 2}, [])
    assert tok.encode("a") == [0]
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        tok.encode("b")


# ------------------------------------------------------------------------------------------------------ model
def test_embeddings_match_plain_torch(tiny):
    _, sd, model = tiny
    rng = np.random.default_rng(1)
    images = _images(5, rng)  # 5 > batch_size 3: two batches
    texts = CORPUS + ["a red cat"]
    img, txt = model.image_embeddings(images), model.text_embeddings(texts)
    assert img.shape == (5, TINY["proj"]) and txt.shape == (5, TINY["proj"])
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-6)
    ids, lengths = model.tokenizer(texts)
    ref_img, ref_txt = torch_clip(sd, model.preprocess(images), ids, lengths)
    np.testing.assert_allclose(img, clip.normalize(ref_img), atol=2e-5)
    np.testing.assert_allclose(txt, clip.normalize(ref_txt), atol=2e-5)
    assert np.abs(img[0] - img[1]).max() > 1e-3  # different images, different embeddings


def test_embeddings_and_preprocessing_match_hf(tiny):
    transformers = pytest.importorskip("transformers", reason="HF comparison needs transformers")
    torch = pytest.importorskip("torch")
    folder, _, model = tiny
    rng = np.random.default_rng(2)
    images, texts = _images(4, rng), CORPUS
    hf = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    processor = transformers.CLIPImageProcessorPil.from_pretrained(str(folder))
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(model.preprocess(images), pixels.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    enc = transformers.CLIPTokenizerFast.from_pretrained(str(folder))(
        texts, padding="max_length", max_length=TINY["ctx"], truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_out = hf.get_image_features(pixel_values=pixels)
        text_out = hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    as_np = lambda o: getattr(o, "pooler_output", o).numpy()  # noqa: E731
    np.testing.assert_allclose(model.image_embeddings(images), clip.normalize(as_np(image_out)), atol=2e-5)
    np.testing.assert_allclose(model.text_embeddings(texts), clip.normalize(as_np(text_out)), atol=2e-5)


def test_preprocessing_resize_crop_and_squash_path_agree():
    pre = clip.ImagePreprocessor(size=32, crop=(32, 32))
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(wide).resize((64, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pre.resize_crop(wide), resized[:, 16:48])  # shortest edge, centre crop
    out = pre([wide, wide.astype(np.float32) / 127.5 - 1.0])
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # uint8 and [-1, 1] inputs agree
    # The reference EMU-Edit path squashes with torch bicubic (no antialias); on a smooth square image it is close.
    torch = pytest.importorskip("torch")
    y, x = np.mgrid[0:96, 0:96] / 95.0
    smooth = (255 * np.stack([x, y, (x + y) / 2], -1)).astype(np.uint8)
    squash = torch.nn.functional.interpolate(torch.tensor(smooth / 255.0).permute(2, 0, 1)[None].float(),
                                             size=(32, 32), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    squash = (squash.numpy() - np.asarray(clip.CLIP_MEAN)) / np.asarray(clip.CLIP_STD)
    assert np.abs(pre([smooth])[0] - squash).max() < 0.1  # both in normalised units (std ~0.27)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        clip.load_clip(tmp_path / "missing")
    folder = tmp_path / "bad"
    sd = write_clip_folder(folder)
    sd.pop("text_projection.weight")
    sd["vision_model.embeddings.class_embedding"] = np.zeros(7, np.float32)
    safetensors.numpy.save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(state_dicts.StateDictMismatch, match="text_projection.weight"):
        clip.load_clip(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        clip.load_clip(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        clip.load_clip(folder)


# ---------------------------------------------------------------------------------------------------- metrics
def test_metric_formulas_on_known_vectors():
    i_in = clip.normalize(np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    i_out = clip.normalize(np.array([[1.0, 1.0, 0], [0, 1.0, 0]]))
    t_in = clip.normalize(np.array([[0, 0, 1.0], [1.0, 0, 0]]))
    t_out = clip.normalize(np.array([[0, 1.0, 1.0], [1.0, 0, 0]]))  # sample 1: identical captions
    got = clip.emu_edit_scores(i_in, i_out, t_in, t_out)
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    np.testing.assert_allclose(got["clip_out"], [cos(i_out[0], t_out[0]), cos(i_out[1], t_out[1])])
    np.testing.assert_allclose(got["clip_i"], [cos(i_in[0], i_out[0]), 1.0])
    np.testing.assert_allclose(got["clip_dir"][0], cos(i_out[0] - i_in[0], t_out[0] - t_in[0]))
    assert got["clip_dir"][1] == 0.0  # zero text (and image) delta: 0, not NaN
    assert np.isfinite(got["clip_dir"]).all()
    np.testing.assert_allclose(clip.clip_score(i_out, t_out), 100 * np.maximum(got["clip_out"], 0))
    assert clip.clip_score(np.array([[1.0, 0]]), np.array([[-1.0, 0]]))[0] == 0.0  # clamped at 0
    np.testing.assert_allclose(clip.cosine(np.array([[3.0, 4.0]]), np.array([[4.0, 3.0]])), [24 / 25])


def test_emu_and_pie_metrics_end_to_end(tiny):
    _, _, model = tiny
    rng = np.random.default_rng(4)
    sources, outputs = _images(3, rng, ((32, 32),)), _images(3, rng, ((32, 32),))
    emu = clip.emu_edit_metrics(model, sources, outputs, ["a cat", "a dog", "a car"], ["a dog", "a dog", "a red car"])
    assert set(emu) == {"clip_out", "clip_dir", "clip_i"} and all(v.shape == (3,) for v in emu.values())
    assert emu["clip_dir"][1] == 0.0
    same = clip.emu_edit_metrics(model, sources, sources, ["a cat"] * 3, ["a dog"] * 3)
    np.testing.assert_allclose(same["clip_i"], 1.0, atol=1e-6)
    masks = [np.zeros((32, 32), np.uint8), np.ones((32, 32), np.uint8), np.eye(32, dtype=np.uint8)]
    pie = clip.pie_bench_metrics(model, outputs, ["a dog", "a cat", "a car"], masks)
    assert np.isnan(pie["clip_edit"][0])  # empty edit mask
    np.testing.assert_allclose(pie["clip_edit"][1], pie["clip_whole"][1], atol=1e-6)  # full mask = whole image
    masked = outputs[2] * masks[2][..., None]
    expected = clip.clip_score(model.image_embeddings([masked]), model.text_embeddings(["a car"]))
    np.testing.assert_allclose(pie["clip_edit"][2], expected[0], atol=1e-6)
    assert ((pie["clip_whole"] >= 0) & (pie["clip_whole"] <= 100)).all()
    with pytest.raises(ValueError, match="mask shape"):
        clip.pie_bench_metrics(model, outputs[:1], ["x"], [np.ones((8, 8))])
    with pytest.raises(ValueError, match="same length"):
        clip.emu_edit_metrics(model, sources, outputs[:2], ["a"] * 3, ["b"] * 3)
