"""The `edit` command and `editor.Editor` end to end on a toy model built here (a tiny random transformer, a tiny
random tokenizer and the toy text encoder, saved as checkpoints): single, multi-turn and batch edits, the Python
API, pre/post-processing geometry, and the error paths (exit code 2, one line)."""
import dataclasses
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from helpers import REPO_ROOT
from transformer_cases import random_params
from varedit_jax import checkpoint, edit, editor, image_tokenizer, sampler, transformer
from varedit_jax.assets import toy_text_encoder

CORPUS = ["make it red", "add a cat", "remove the tree", "turn the sky blue", "a photo of a dog", "draw a circle"]
DEVICES = ["--devices", "2", "--batch-size", "2"]  # every CLI run shares one compiled program


def _save_tokenizer(path, codebook_dim: int):
    cfg = image_tokenizer.default_model_config(base_ch=8, ch_mult=(1, 1, 2), num_res_blocks=1, patch_size=4,
                                         codebook_dim=codebook_dim, norm_groups=4)
    model = image_tokenizer.build(cfg, seed=0)
    checkpoint.save_params(path, image_tokenizer.param_dict(model), ml_collections.ConfigDict({"kind": "image_tokenizer", "model": cfg}))
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Checkpoints of the toy editing model: `ckpt` (full config), `imported` (kind + model only, like an
    imported official checkpoint), and mismatching components."""
    root = tmp_path_factory.mktemp("toy_editor")
    image_tok = _save_tokenizer(root / "image_tok", 8)
    text = str(toy_text_encoder.build(root / "t5", CORPUS, seed=0, d_model=16, d_kv=8, num_heads=2,
                                                 d_ff=32, num_layers=1, vocab_size=64))
    model_cfg = transformer.default_model_config(embed_dim=32, depth=2, num_heads=2, mlp_dim=64, bits=8, text_dim=16,
                                                 text_max_len=16, text_pool_heads=1, block_chunks=1, remat="none",
                                                 drop_path_rate=0.0)
    params = random_params(model_cfg, seed=0, std=0.3)
    full = ml_collections.ConfigDict({"kind": "varedit", "conditioning": "sar", "pn": "0.06M", "model": model_cfg,
                                      "image_tokenizer": {"path": image_tok},
                                      "text": {"path": text, "max_len": 16}})
    checkpoint.save_params(root / "ckpt", params, full)
    checkpoint.save_params(root / "imported", params, ml_collections.ConfigDict(
        {"kind": "varedit", "model": model_cfg}))
    rng = np.random.default_rng(0)
    images = {"square": rng.integers(0, 256, (64, 64, 3), np.uint8),
              "wide": rng.integers(0, 256, (48, 80, 3), np.uint8)}
    for name, arr in images.items():
        Image.fromarray(arr).save(root / f"{name}.png")
    (root / "corrupt.png").write_bytes(b"not a png at all")
    return dict(root=root, ckpt=str(root / "ckpt"), imported=str(root / "imported"), image_tok=image_tok, text=text,
                image_tok_bits4=_save_tokenizer(root / "image_tok4", 4),
                text24=str(toy_text_encoder.build(root / "t5_24", CORPUS, seed=0, d_model=24, d_kv=8,
                                                             num_heads=3, d_ff=32, num_layers=1, vocab_size=64)))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = edit.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_single_turns_and_batch(toy, tmp_path, capsys):
    root = toy["root"]
    # single edit, official preprocessing: a non-square input comes back at its own size
    rc, out, err = _run(capsys, "--checkpoint", toy["ckpt"], "--image", root / "wide.png", "--instruction",
                        "make it red", "--out", tmp_path / "wide_out.png", *DEVICES)
    assert rc == 0, err
    assert _png(tmp_path / "wide_out.png").shape == (48, 80, 3)
    # the same edit on a square image with the training preprocessing (identity at the model size)
    rc, _, err = _run(capsys, "--checkpoint", toy["ckpt"], "--image", root / "square.png", "--instruction",
                      "make it red", "--out", tmp_path / "red.png", "--preprocess", "train", *DEVICES)
    assert rc == 0, err
    red = _png(tmp_path / "red.png")
    assert red.shape == (64, 64, 3) and red.std() > 0
    # multi-turn: turn 0 equals the single edit; turn 1 equals editing turn 0's saved output with seed + 1
    rc, out, err = _run(capsys, "--checkpoint", toy["ckpt"], "--image", root / "square.png", "--turns",
                        "make it red", "add a cat", "--out", tmp_path / "turns.png", "--preprocess", "train", *DEVICES)
    assert rc == 0, err
    np.testing.assert_array_equal(_png(tmp_path / "turns.turn0.png"), red)
    rc, _, err = _run(capsys, "--checkpoint", toy["ckpt"], "--image", tmp_path / "turns.turn0.png", "--instruction",
                      "add a cat", "--seed", "1", "--out", tmp_path / "cat.png", "--preprocess", "train", *DEVICES)
    assert rc == 0, err
    np.testing.assert_array_equal(_png(tmp_path / "turns.png"), _png(tmp_path / "cat.png"))
    assert (_png(tmp_path / "cat.png") != red).any()
    # batch: bad rows reported, good rows written; row 0 reproduces the single edit (key = fold_in(seed, row))
    rows = [{"image": str(root / "square.png"), "instruction": "make it red", "out": "out/0.png"},
            {"image": "missing.png", "instruction": "add a cat", "out": "out/1.png"},
            {"image": str(root / "square.png"), "instruction": "add a cat", "out": "out/2.png"},
            {"image": str(root / "square.png"), "instruction": "   ", "out": "out/3.png"},
            "{not json",
            {"image": str(root / "corrupt.png"), "instruction": "add a cat", "out": "out/5.png"},
            {"image": str(root / "square.png"), "instruction": "turn the sky blue", "out": "out/6.png",
             "negative": "draw a circle"},
            {"image": str(root / "square.png"), "out": "out/7.png"}]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    rc, out, err = _run(capsys, "--checkpoint", toy["ckpt"], "--batch", batch, "--preprocess", "train", *DEVICES)
    assert rc == 1
    for i, reason in ((1, "no image"), (3, "empty instruction"), (4, "invalid JSON"), (5, "cannot decode"),
                      (7, "missing")):
        assert any(line.startswith(f"bad row {i} ") and reason in line for line in err.splitlines()), (i, err)
    assert "wrote 3 images, skipped 5 bad rows" in out
    np.testing.assert_array_equal(_png(tmp_path / "out" / "0.png"), red)
    assert not (tmp_path / "out" / "1.png").exists()
    assert (_png(tmp_path / "out" / "2.png") != red).any() and (tmp_path / "out" / "6.png").is_file()


def test_editor_api(toy):
    """Editor.edit on a list (PIL and uint8) equals one-at-a-time edits with the same global indices; negative
    prompts and per-scale guidance lists change the output; an imported-style checkpoint takes the paths as arguments."""
    root = toy["root"]
    mesh = sampler.inference_mesh(jax.devices()[:2])
    edit = editor.Editor.from_checkpoint(toy["imported"], toy["image_tok"], toy["text"], mesh=mesh, batch_size=2)
    square = _png(root / "square.png")
    images = [Image.open(root / "square.png"), square, np.ascontiguousarray(square[::-1])]
    prompts = ["make it red", "add a cat", "remove the tree"]
    options = sampler.SamplingOptions(seed=3)
    opts = dict(options=options, preprocess="train", resolution=256)
    together = edit.edit(images, prompts, **opts)
    assert [o.shape for o in together] == [(64, 64, 3)] * 3
    for i in (2, 0):
        alone = edit.edit([images[i]], [prompts[i]], indices=[i], **opts)
        np.testing.assert_array_equal(alone[0], together[i])
    negative = edit.edit(images[:1], prompts[:1], negative="draw a circle", **opts)
    assert (negative[0] != together[0]).any()
    per_scale = edit.edit(images[:1], prompts[:1], **dict(opts, options=dataclasses.replace(options, guidance=[1.0] * 7)))
    assert (per_scale[0] != together[0]).any()
    with pytest.raises(ValueError, match="pass a resolution"):
        edit.edit(images[:1], prompts[:1], preprocess="train")
    with pytest.raises(ValueError, match="empty instruction"):
        edit.edit(images[:1], [""], **opts)


def test_preprocessing_geometry():
    red = np.zeros((20, 40, 3), np.uint8)
    red[..., 0] = 255
    square = editor.preprocess_image(red, (16, 16), "official")  # white pad below the wide image, then resize
    assert square.shape == (16, 16, 3)
    assert (square[:6, :, 0] > 200).all() and (square[:6, :, 1] < 60).all()
    assert (square[10:] > 200).all()
    back = editor.postprocess_image(square, (20, 40), "official")
    assert back.shape == (20, 40, 3)
    crop = editor.preprocess_image(red, (16, 16), "train")
    assert crop.shape == (16, 16, 3) and (crop[..., 0] == 255).all()
    assert editor.postprocess_image(crop, (20, 40), "train") is crop
    assert editor.choose_template((20, 40), "official") == "1.0"
    assert editor.choose_template((20, 40), "train") == "0.5"
    with pytest.raises(ValueError, match="preprocess"):
        editor.choose_template((20, 40), "stretch")


def test_errors(toy, tmp_path, capsys):
    root = toy["root"]
    base = ["--checkpoint", toy["ckpt"], "--out", tmp_path / "o.png", *DEVICES]
    cases = [
        (["--image", root / "missing.png", "--instruction", "add a cat"], "no image"),
        (["--image", root / "corrupt.png", "--instruction", "add a cat"], "cannot decode"),
        (["--image", root / "square.png", "--instruction", "  "], "empty instruction"),
        (["--image", root / "square.png", "--turns", "add a cat", ""], "empty instruction"),
        (["--image", root / "square.png", "--instruction", "a", "--turns", "b"], "exactly one of"),
        (["--image", root / "square.png", "--instruction", "a", "--image-tokenizer", toy["image_tok_bits4"]], "bits"),
        (["--image", root / "square.png", "--instruction", "a", "--text-encoder", toy["text24"]], "text_dim"),
        (["--image", root / "square.png", "--instruction", "a", "--image-tokenizer", root / "nowhere"], "no image tokenizer"),
        (["--image", root / "square.png", "--instruction", "a", "--tensor", "3"], "does not divide"),
    ]
    for extra, message in cases:
        rc, _, err = _run(capsys, *base, *extra)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert rc == 2 and last.startswith("error:") and message in last, (extra, rc, err)
    rc, _, err = _run(capsys, "--checkpoint", toy["ckpt"], "--batch", root / "none.jsonl")
    assert rc == 2 and "no batch file" in err.strip().splitlines()[-1]
    rc, _, err = _run(capsys, "--checkpoint", toy["ckpt"], "--batch", root / "none.jsonl", "--image", root / "a.png")
    assert rc == 2 and "does not combine with --image" in err.strip().splitlines()[-1]
    rc, _, err = _run(capsys, "--checkpoint", toy["imported"], "--image", root / "square.png", "--instruction", "a",
                      "--out", tmp_path / "o.png", "--resolution", "256")
    assert rc == 2 and "pass --image-tokenizer" in err.strip().splitlines()[-1]
    rc, _, err = _run(capsys, "--checkpoint", tmp_path / "no_ckpt", "--image", root / "square.png",
                      "--instruction", "a", "--out", tmp_path / "o.png")
    assert rc == 2 and "no transformer" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_command_line_entry_point(toy, tmp_path):
    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, "-m", "varedit_jax.edit", "--checkpoint", toy["ckpt"], "--image",
                           str(toy["root"] / "wide.png"), "--instruction", "make it red", "--out", str(out),
                           "--devices", "1", "--guidance", "3,3,3,3,3,3,3", "--tau", "0.7"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert _png(out).shape == (48, 80, 3) and "turn 0" in proc.stdout


@pytest.mark.slow
def test_aot_flag(capsys):
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu (the tpu extra)")
    rc, out, err = _run(capsys, "--checkpoint", REPO_ROOT / "configs" / "varedit_tiny.py", "--aot", "v5p-8",
                        "--tensor", "2", "--batch-size", "2")
    assert rc == 0, err
    assert "compiled the sampler for v5p-8" in out and "GiB" in out
