"""The training input pipeline: contents, determinism, per-process shards, exact resume, decode failures, sizes."""
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from data_pipelines import build, records, toy
from varedit_jax import data, images, schedules
from varedit_jax.text import TextTokenizer

TOY_SIZE, STRIDE, N_TOY = 32, 2, 24  # 0.06M square schedule ends at 16x16 -> 32 px with stride 2


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    texts = [toy.render_pair(0, i, 32)["instruction"] for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "sp"), vocab_size=64,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    return str(folder / "sp.model")


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy") / "ds")
    build.build(toy.Reader(N_TOY, size=TOY_SIZE, seed=3), out, {"format": "toy"}, shard_size=10)
    return out


def _png(arr) -> bytes:
    return records.encode_png(np.asarray(arr, np.uint8))


def _rand(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_dataset(out, recs: list[bytes | dict]) -> str:
    """A finished dataset of the given records (dicts are encoded; bytes are written as they are)."""
    state = records.BuildDir(out, {"format": "test"})
    state.commit([(str(i), r if isinstance(r, bytes) else records.encode_record(r)) for i, r in enumerate(recs)],
                 [], [])
    state.finalize()
    return out


def _record(rid, src, tgt, mask=None, text="edit it"):
    return dict(id=rid, instruction=text, source=_png(src), target=_png(tgt), source_size=list(src.shape[:2]),
                target_size=list(tgt.shape[:2]), mask=None if mask is None else _png(mask), task="")


def _config(paths, **overrides):
    c = data.default_config()
    c.paths = paths if isinstance(paths, (list, tuple)) else [paths]
    c.pn, c.stride, c.max_text_len, c.read_threads, c.prefetch_buffer_size = "0.06M", STRIDE, 16, 2, 4
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _batches(config, n, *, spiece, seed=0, batch_size=4, **kw):
    config.spiece_model = spiece
    it = iter(data.make_dataset(config, seed=seed, batch_size=batch_size, **kw))
    return [next(it) for _ in range(n)]


def _equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_contents(toy_dir, spiece):
    (batch,) = _batches(_config(toy_dir, shuffle=False), 1, spiece=spiece)
    assert batch["source"].shape == batch["target"].shape == (4, TOY_SIZE, TOY_SIZE, 3)
    assert batch["source"].dtype == np.float32 and batch["mask"].dtype == np.uint8
    assert batch["text_ids"].shape == (4, 16) and batch["text_ids"].dtype == np.int32
    assert batch["text_mask"].dtype == bool and batch["has_mask"].all() and not batch["num_replaced"].any()
    assert list(batch["id"]) == [f"toy:s3:{TOY_SIZE}px:{i}" for i in range(4)]
    tok = TextTokenizer(spiece)
    ids, mask = tok([toy.render_pair(3, i, TOY_SIZE)["instruction"] for i in range(4)], 16)
    np.testing.assert_array_equal(batch["text_ids"], ids)
    np.testing.assert_array_equal(batch["text_mask"], mask)
    for i in range(4):
        p = toy.render_pair(3, i, TOY_SIZE)
        assert batch["instruction"][i] == p["instruction"]
        # same size as the template: no resampling, exact x / 255 * 2 - 1
        np.testing.assert_array_equal(batch["source"][i], p["source"].astype(np.float32) / 255 * 2 - 1)
        np.testing.assert_array_equal(batch["target"][i], p["target"].astype(np.float32) / 255 * 2 - 1)
        np.testing.assert_array_equal(batch["mask"][i], p["mask"])


def test_order_is_deterministic_by_seed(toy_dir, spiece):
    def ids(seed):
        return [i for b in _batches(_config(toy_dir), 9, spiece=spiece, seed=seed) for i in b["id"]]
    a, b, c = ids(1), ids(1), ids(2)
    assert a == b and a != c
    epoch = a[:N_TOY]
    assert sorted(epoch) == sorted(f"toy:s3:{TOY_SIZE}px:{i}" for i in range(N_TOY))  # a permutation per epoch
    assert a[N_TOY:2 * N_TOY - 12] != epoch[:N_TOY - 12]  # the next epoch is reshuffled


def test_two_processes_get_disjoint_slices(toy_dir, spiece):
    per_process = [[i for b in _batches(_config(toy_dir), 6, spiece=spiece, seed=5, batch_size=4, process_index=p,
                                        process_count=2) for i in b["id"]] for p in range(2)]
    assert all(len(ids) == 12 for ids in per_process)
    first_epoch = [set(ids) for ids in per_process]
    assert not first_epoch[0] & first_epoch[1]
    assert first_epoch[0] | first_epoch[1] == {f"toy:s3:{TOY_SIZE}px:{i}" for i in range(N_TOY)}
    with pytest.raises(ValueError, match="multiple"):
        data.make_dataset(_config(toy_dir, spiece_model=spiece), seed=0, batch_size=3, process_index=0,
                          process_count=2)


def test_finite_epochs_give_equal_steps_per_process(toy_dir, spiece):
    cfg = _config(toy_dir, num_epochs=1, spiece_model=spiece)
    counts = [len(list(data.make_dataset(cfg, seed=0, batch_size=10, process_index=p, process_count=2)))
              for p in range(2)]
    assert counts == [2, 2]  # 24 records, 5 per process and step, the remainder dropped


def test_resume_with_get_state_set_state(toy_dir, spiece):
    cfg = _config(toy_dir, templates=("1.0", "0.5", "2.0"), spiece_model=spiece)
    it = iter(data.make_dataset(cfg, seed=7, batch_size=4))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(data.make_dataset(cfg, seed=7, batch_size=4))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        _equal(a, b)


def test_resume_through_orbax(toy_dir, spiece, tmp_path):
    cfg = _config(toy_dir, spiece_model=spiece)
    it = iter(data.make_dataset(cfg, seed=2, batch_size=4))
    next(it), next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = iter(data.make_dataset(cfg, seed=2, batch_size=4))
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for a, b in zip(expected, [next(fresh) for _ in range(3)]):
        _equal(a, b)
    mngr.close()


def test_undecodable_records_are_replaced_and_counted(tmp_path, spiece):
    good = [_record(f"r{i}", _rand(8, 8, i), _rand(8, 8, 100 + i)) for i in range(6)]
    broken_image = dict(good[0], id="bad-image", source=b"\x89PNG broken")
    recs = [good[0], b"not msgpack at all", good[1], broken_image, good[2], good[3], good[4], good[5]]
    out = _write_dataset(str(tmp_path / "ds"), recs)
    cfg = _config(out, shuffle=False)
    batches = _batches(cfg, 2, spiece=spiece, batch_size=4)
    ids = [i for b in batches for i in b["id"]]
    # storage order, each bad record replaced by the next one
    assert ids == ["r0", "r1", "r1", "r2", "r2", "r3", "r4", "r5"]
    assert [int(n) for b in batches for n in b["num_replaced"]] == [0, 1, 0, 1, 0, 0, 0, 0]
    assert all(b["source"].shape == (4, TOY_SIZE, TOY_SIZE, 3) for b in batches)
    again = _batches(cfg, 2, spiece=spiece, batch_size=4)
    for a, b in zip(batches, again):
        _equal(a, b)


def test_untokenizable_instruction_is_replaced(tmp_path, spiece):
    recs = [_record(f"r{i}", _rand(8, 8, i), _rand(8, 8, 50 + i), text=t)
            for i, t in enumerate(["make it red", "UNTOKENIZABLE", "make it blue", "make it green"])]
    out = _write_dataset(str(tmp_path / "ds"), recs)
    real = TextTokenizer(spiece)

    def tokenizer(texts, max_length):
        if "UNTOKENIZABLE" in texts:
            raise ValueError("no pieces")
        return real(texts, max_length)

    cfg = _config(out, shuffle=False)
    (batch,) = _batches(cfg, 1, spiece=spiece, tokenizer=tokenizer)
    assert list(batch["id"]) == ["r0", "r2", "r2", "r3"] and list(batch["num_replaced"]) == [0, 1, 0, 0]
    np.testing.assert_array_equal(batch["text_ids"][1], real(["make it blue"], 16)[0][0])


def test_target_is_resized_to_the_source_size_first():
    src, tgt = _rand(20, 40, 2), _rand(10, 30, 3)
    mask = np.zeros((10, 30), np.uint8)
    mask[2:5, 6:12] = 1
    ex = data.preprocess(records.decode_record(records.encode_record(_record("x", src, tgt, mask))), (16, 16))
    tgt_at_src = Image.fromarray(tgt).resize((40, 20), Image.Resampling.BICUBIC)
    expected = images.cover_resize(tgt_at_src, (16, 16), Image.Resampling.LANCZOS).astype(np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(ex["target"], expected, atol=1e-6)
    mask_at_src = Image.fromarray(mask).resize((40, 20), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(ex["mask"], images.cover_resize(mask_at_src, (16, 16), Image.Resampling.NEAREST))
    assert ex["mask"].sum() > 0 and ex["has_mask"]
    assert ex["source"].min() >= -1 and ex["source"].max() <= 1


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_every_template_pixel_size(resolution):
    pn = schedules.pn_for_resolution(resolution)
    record = records.decode_record(records.encode_record(_record("x", _rand(24, 36, 4), _rand(24, 36, 5))))
    for template in schedules.TEMPLATES:
        h, w = schedules.scale_schedule(template, pn)[-1]
        size = data.image_size(template, pn, 16)
        assert size == (h * 16, w * 16)
        ex = data.preprocess(record, size)
        assert ex["source"].shape == ex["target"].shape == (*size, 3)
        assert ex["mask"].shape == size
    assert data.image_size("1.0", pn, 16) == (resolution, resolution)


def test_one_template_per_step_shared_by_processes(toy_dir, spiece):
    templates = ("1.0", "0.5", "2.0", "1.333")
    cfg = _config(toy_dir, templates=templates)
    streams = [_batches(cfg, 8, spiece=spiece, seed=4, batch_size=4, process_index=p, process_count=2)
               for p in range(2)]
    used = set()
    for step in range(8):
        template = data.template_for_step(4, step, templates)
        used.add(template)
        for batches in streams:
            assert batches[step]["source"].shape[1:3] == data.image_size(template, "0.06M", STRIDE)
    assert len(used) > 1
    assert data.template_for_step(4, 3, ("1.0",)) == "1.0"


def test_global_batch_on_8_devices(toy_dir, spiece):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    (local,) = _batches(_config(toy_dir), 1, spiece=spiece, batch_size=8)
    g = data.global_batch(local, sharding)
    for k in ("source", "target", "mask", "has_mask", "text_ids", "text_mask", "num_replaced"):
        assert isinstance(g[k], jax.Array) and g[k].sharding == sharding, k
        assert len(g[k].addressable_shards) == 8 and g[k].addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(g[k]), local[k])
    assert isinstance(g["id"], np.ndarray) and list(g["id"]) == list(local["id"])


def test_unfinished_dataset_is_rejected(tmp_path, spiece):
    with pytest.raises(FileNotFoundError, match="not a finished"):
        data.make_dataset(_config(str(tmp_path), spiece_model=spiece), seed=0, batch_size=2)


@pytest.mark.slow
def test_mp_prefetch_workers_give_the_same_batches(toy_dir, spiece):
    cfg = _config(toy_dir, templates=("1.0", "0.5"))
    expected = _batches(cfg, 4, spiece=spiece, seed=3)
    cfg.num_workers = 2
    cfg.spiece_model = spiece
    it = iter(data.make_dataset(cfg, seed=3, batch_size=4))
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    it.close()
    for a, b in zip(expected, got):
        _equal(a, b)
    resumed = iter(data.make_dataset(cfg, seed=3, batch_size=4))
    resumed.set_state(state)
    for a in expected[2:]:
        _equal(a, next(resumed))
    resumed.close()
