"""The flan-T5 text encoder: tokenisation, last hidden state and packing vs the official fixture (t5/), relative
position buckets, sharded folders, the toy encoder, empty texts, bf16 compute."""
import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from helpers import fixtures_root, load_index, load_npz
from varedit_jax import loading, sharding, text
from varedit_jax.assets import toy_text_encoder

ATOL = 1e-4  # the bound for the last hidden state at valid positions (measured ~2e-6)


def _prompt_params():
    folder = fixtures_root() / "t5"
    if not folder.is_dir():
        return [pytest.param(None, id="t5-missing", marks=pytest.mark.skip(reason=f"no t5/ in {fixtures_root()}"))]
    prompts = load_index(folder / "prompts.json")["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{folder / 'prompts.json'}: expected a non-empty list under 'prompts'")
    return [pytest.param(i, id=f"t5-prompt{i}") for i in range(len(prompts))]


@pytest.fixture(scope="module")
def fixture():
    """(folder, prompts index, io.npz, encoder, tokenizer, our ids, mask, features) for the whole prompt batch."""
    folder = fixtures_root() / "t5"
    if not folder.is_dir():
        pytest.skip(f"fixture folder 't5' is not in fixture root {fixtures_root()}")
    index = load_index(folder / "prompts.json")
    _, encoder, tok = loading.load_text_encoder(folder)
    ids, mask = tok(index["prompts"], index["max_length"])
    features, out_mask = jax.jit(lambda i, m: text.encode(encoder, i, m))(ids, mask)
    return dict(folder=folder, index=index, io=load_npz(folder / "io.npz"), encoder=encoder, tok=tok, ids=ids,
                mask=mask, features=np.asarray(features), out_mask=np.asarray(out_mask))


@pytest.mark.parity
@pytest.mark.parametrize("i", _prompt_params())
def test_tokenizer_matches_hf(fixture, i):
    ref = fixture["io"]
    np.testing.assert_array_equal(fixture["ids"][i], ref["input_ids"][i])
    np.testing.assert_array_equal(fixture["mask"][i], ref["attention_mask"][i].astype(bool))
    pieces = fixture["index"]["sentencepiece_encode_without_eos"][i]
    n = int(fixture["mask"][i].sum())
    np.testing.assert_array_equal(fixture["ids"][i, :n - 1], pieces[:n - 1])  # truncation keeps the first pieces


@pytest.mark.parity
@pytest.mark.parametrize("i", _prompt_params())
def test_last_hidden_state_matches_hf(fixture, i):
    valid = fixture["io"]["attention_mask"][i].astype(bool)
    got, want = fixture["features"][i], fixture["io"]["last_hidden_state"][i]
    err = np.abs(got[valid] - want[valid]).max()
    assert err <= ATOL, f"prompt {i}: max |diff| {err:.3g} at valid positions"
    assert not got[~valid].any(), "encode must zero the rows past the text length"
    np.testing.assert_array_equal(fixture["out_mask"][i], valid)


@pytest.mark.parity
def test_pack_matches_infinity_varlen(fixture):
    ref = fixture["io"]
    kv, lens, cu = text.pack(fixture["features"], fixture["out_mask"])
    np.testing.assert_array_equal(lens, ref["lens"])
    np.testing.assert_array_equal(cu, ref["cu_seqlens_k"])
    assert lens.dtype == cu.dtype == np.int32 and kv.shape == ref["kv_compact"].shape
    np.testing.assert_allclose(kv, ref["kv_compact"], atol=ATOL, rtol=0)


@pytest.mark.parity
def test_padding_length_does_not_change_features(fixture):
    """Infinity pads to 512: more padding columns leave every prompt's valid rows unchanged."""
    pad = ((0, 0), (0, fixture["ids"].shape[1]))
    ids, mask = np.pad(fixture["ids"], pad), np.pad(fixture["mask"], pad)
    features = np.asarray(text.encode(fixture["encoder"], ids, mask)[0])
    t = fixture["ids"].shape[1]
    np.testing.assert_allclose(features[:, :t], fixture["features"], atol=1e-5, rtol=0)
    assert not features[:, t:].any()


def test_pack_rejects_left_padding():
    mask = np.array([[0, 1, 1], [1, 1, 0]], bool)
    with pytest.raises(ValueError, match="right-padded"):
        text.pack(np.zeros((2, 3, 4), np.float32), mask)


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (64, 256)])
def test_relative_buckets_match_torch_reference(buckets, max_distance):
    """The PyTorch float32 bucket formula (HF `_relative_position_bucket`, bidirectional) at lengths past the
    fixture's (bucket edges depend on float32 rounding of the log)."""
    torch = pytest.importorskip("torch", reason="the reference bucket formula runs in torch")
    length = 700
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = buckets // 2
    exact = half // 2
    dist = rel.abs()
    large = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    want = (rel > 0).to(torch.long) * half + torch.where(dist < exact, dist, large)
    got = text.relative_position_buckets(length, buckets, max_distance)
    np.testing.assert_array_equal(got, want.numpy())
    assert got.min() == 0 and got.max() == buckets - 1


def _shard(folder, out, n_shards=2):
    """Copies an HF folder with its weights split into `n_shards` safetensors + index (HF sharded layout)."""
    sd = safetensors.numpy.load_file(folder / "model.safetensors")
    keys = sorted(sd)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::n_shards]}
        safetensors.numpy.save_file(part, out / name)
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", text.SPIECE_FILE):
        (out / name).write_bytes((folder / name).read_bytes())
    return out


@pytest.mark.parity
def test_sharded_folder_loads_the_same(fixture, tmp_path):
    sharded = _shard(fixture["folder"], tmp_path)
    _, encoder, tok = loading.load_text_encoder(sharded)
    ids, mask = tok(fixture["index"]["prompts"], fixture["index"]["max_length"])
    np.testing.assert_array_equal(ids, fixture["ids"])
    params = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731
    same = jax.tree.map(np.array_equal, params(encoder), params(fixture["encoder"]))
    assert all(jax.tree.leaves(same))


def test_sharded_folder_with_a_missing_shard_is_refused(tmp_path):
    folder = fixtures_root() / "t5"
    if not folder.is_dir():
        pytest.skip("no t5 fixture")
    _shard(folder, tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises((FileNotFoundError, ValueError)):
        loading.load_text_encoder(tmp_path)


# --------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    corpus = ["make the red circle blue", "move the green square to the left", "remove the yellow triangle",
              "add a purple circle at the top right", "enlarge the blue square"]
    return toy_text_encoder.build(tmp_path_factory.mktemp("toy") / "t5", corpus, seed=3), corpus


def test_empty_and_whitespace_texts_are_refused(toy_dir):
    tok = text.TextTokenizer(toy_dir[0])
    with pytest.raises(text.EmptyTextError) as e:
        tok(["move the circle", "", "  \t ", "red"], 8)
    assert e.value.indices == [1, 2]
    assert pickle.loads(pickle.dumps(e.value)).indices == [1, 2]  # crosses grain worker boundaries intact
    with pytest.raises(ValueError, match="max_length"):
        tok(["red"], 0)
    with pytest.raises(TypeError):
        tok([b"red"], 8)


def test_tokenizer_layout_truncation_and_pickle(toy_dir):
    tok = text.TextTokenizer(toy_dir[0] / text.SPIECE_FILE)
    long = " ".join(toy_dir[1])
    ids, mask = tok(["red", long], 6)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 6)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == text.EOS_ID and not ids[0, n:].any() and mask[0, :n].all()
    assert mask[1].all() and ids[1, -1] == text.EOS_ID and text.EOS_ID not in ids[1, :-1]
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone(["red", long], 6)[0], ids)


def test_tokenizer_refuses_bad_models(tmp_path):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="sentencepiece"):
        text.TextTokenizer(bad)
    with pytest.raises(FileNotFoundError):
        text.TextTokenizer(tmp_path / "missing.model")


# --------------------------------------------------------------------------------------------- toy encoder
def _toy_params(folder):
    return jax.device_get(loading.load_params(folder, (text.KIND,), "text encoder")[1])


def _same_params(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_toy_encoder_is_deterministic_reused_and_loads(toy_dir, tmp_path):
    out, corpus = toy_dir
    assert {p.name for p in out.iterdir()} >= {"checkpoints", text.SPIECE_FILE, toy_text_encoder.MANIFEST}
    again = toy_text_encoder.build(tmp_path / "again", corpus, seed=3)
    assert (again / text.SPIECE_FILE).read_bytes() == (out / text.SPIECE_FILE).read_bytes()
    assert _same_params(_toy_params(again), _toy_params(out))
    stamp = (out / toy_text_encoder.MANIFEST).stat().st_mtime_ns
    assert toy_text_encoder.build(out, corpus, seed=3) == out
    assert (out / toy_text_encoder.MANIFEST).stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = toy_text_encoder.build(tmp_path / "other", corpus, seed=4)
    assert not _same_params(_toy_params(other), _toy_params(out))
    toy_text_encoder.build(again, corpus, seed=4)  # other inputs: rebuilt in place
    assert _same_params(_toy_params(again), _toy_params(other))

    config, encoder, tok = loading.load_text_encoder(out)
    assert config.model.d_model == 64 and config.model.vocab_size == tok.vocab_size <= 512
    ids, mask = tok(corpus[:2], 16)
    features, _ = text.encode(encoder, ids, mask)
    assert features.shape == (2, 16, 64) and features.dtype == jnp.float32
    assert np.isfinite(np.asarray(features)).all() and np.asarray(features)[mask].std() > 0.1


def test_toy_encoder_small_corpus_and_foreign_folder(tmp_path):
    out = toy_text_encoder.build(tmp_path / "tiny", ["make it red"], seed=0, vocab_size=4)
    config, _, tok = loading.load_text_encoder(out)
    assert 4 < tok.vocab_size == config.model.vocab_size  # grown to cover every character
    ids, mask = tok(["make it red"], 12)
    assert mask.sum() > 1 and (ids[mask] != 2).all()  # no <unk> on the training text
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        toy_text_encoder.build(foreign, ["make it red"], seed=0)
    with pytest.raises(ValueError, match="non-blank"):
        toy_text_encoder.build(tmp_path / "blank", ["", "  "], seed=0)


# --------------------------------------------------------------------------------------------- compute dtype
@pytest.mark.parity
def test_bfloat16_compute_stays_close(fixture):
    config, encoder, tok = loading.load_text_encoder(fixture["folder"], dtype="bfloat16")
    assert config.model.dtype == "bfloat16"
    features, mask = text.encode(encoder, fixture["ids"], fixture["mask"])
    assert features.dtype == jnp.float32
    ref = fixture["io"]["last_hidden_state"]
    valid = fixture["io"]["attention_mask"].astype(bool)
    err = np.abs(np.asarray(features)[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    assert 1e-5 < err < 0.1, err  # really computed in bf16, and still the same function


# --------------------------------------------------------------------------------------------- sharding
def test_every_parameter_has_logical_axis_names():
    vocabulary = {name for name, _ in sharding.DEFAULT_RULES}
    model = nnx.eval_shape(lambda: text.T5Encoder(text.default_model_config(), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
        assert set(names) <= vocabulary, (path, names)
        assert ("layers" in names) == ("blocks" in path), (path, names)
        if path[-1] == "kernel":
            assert {"heads", "mlp"} & set(names), (path, names)  # the big matrices shard over tensor
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    assert count == 1_223_527_424  # flan-T5-XL encoder


def test_tensor_sharded_encoder_matches(toy_dir):
    """heads / mlp sharded over the tensor axis, batch over data: same features as on one device."""
    _, encoder, tok = loading.load_text_encoder(toy_dir[0])
    ids, mask = tok(toy_dir[1][:4], 16)
    ref = np.asarray(text.encode(encoder, ids, mask)[0])
    mesh = jax.make_mesh((1, 2, 1, 4), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    graphdef, state = nnx.split(encoder)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        run = jax.jit(lambda s, i, m: text.encode(nnx.merge(graphdef, s), i, m)[0])
        out = run(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert state["blocks"]["ffn"]["wi_0"]["kernel"][...].sharding.spec == P(None, None, "tensor")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
