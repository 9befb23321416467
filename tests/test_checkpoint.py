"""Checkpoints that carry their config: `resolve`, and configs stored by older versions migrated on load (checked
with checkpoints written by the pre-rename code, tests/data/pre_rename_checkpoints)."""
import numpy as np
import pytest

from helpers import TESTS_DIR
from varedit_jax import checkpoint, editor, loading, sampler
from varedit_jax.assets import toy_text_encoder

OLD = TESTS_DIR / "data" / "pre_rename_checkpoints"


def test_migrate_renames_fields_kinds_and_config_files():
    old = {"kind": "vae", "vae": {"path": "p", "config": "/repo/configs/vae_d56.py"},
           "toy": {"tokenizer_steps": 7, "seed": 1}, "text": {"path": "t"}}
    new = checkpoint.migrate(old)
    assert new == {"kind": "image_tokenizer", "image_tokenizer": {"path": "p",
                                                                  "config": "/repo/configs/image_tokenizer_d56.py"},
                   "toy": {"image_tokenizer_steps": 7, "seed": 1}, "text": {"path": "t"}}
    assert old["kind"] == "vae" and "vae" in old  # the input is not modified
    assert checkpoint.migrate(new) == new  # today's configs pass through


def test_checkpoints_written_before_the_renames_still_load():
    config = checkpoint.load_config(OLD / "transformer")
    assert "vae" not in config and config.image_tokenizer.path == "image_tok"
    assert config.image_tokenizer.config.endswith("configs/toy_image_tokenizer.py")
    assert config.toy.image_tokenizer_steps == 600 and config.conditioning == "sar"
    config, model = loading.load_transformer(OLD / "transformer")
    assert model.cfg.embed_dim == 32 and checkpoint.resolve(OLD / "transformer")[1] == 3
    image_tok = loading.load_image_tokenizer(OLD / "image_tok")  # stored with kind "vae"
    assert image_tok.codebook_dim == 8 and image_tok.stride == 4


def test_an_old_checkpoint_edits(tmp_path):
    text_dir = toy_text_encoder.build(tmp_path / "t5", ["make it red", "add a cat"], seed=0, d_model=16, d_kv=8,
                                      num_heads=2, d_ff=32, num_layers=1, vocab_size=64)
    edit = editor.Editor.from_checkpoint(OLD / "transformer", str(OLD / "image_tok"), str(text_dir), batch_size=1)
    out = edit.edit([np.zeros((64, 64, 3), np.uint8)], ["make it red"], sampler.SamplingOptions(seed=0),
                    preprocess="train")
    assert out[0].shape == (64, 64, 3) and out[0].dtype == np.uint8


def test_resolve_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.resolve(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint.resolve(tmp_path)
