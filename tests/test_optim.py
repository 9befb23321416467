"""The optimizer (varedit_jax/optim.py): the official no-decay set, AdamW + clipping against a NumPy re-statement of
torch's AdamW, the warmup + constant schedule and the EMA."""
import jax
import ml_collections
import numpy as np
import pytest

from varedit_jax import optim, transformer
from varedit_jax.convert import infinity as convert_infinity

# The official rule (Infinity trainer param groups), stated on official state-dict names and shapes.
OFFICIAL_NO_DECAY = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                     "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
                     "text_proj_for_sos.ca.mat_q")


def _official_decays(name: str, value: np.ndarray) -> bool:
    return value.ndim > 1 and not name.endswith(".bias") and not any(n in name for n in OFFICIAL_NO_DECAY)


@pytest.fixture(scope="module")
def model_cfg():
    return transformer.default_model_config(embed_dim=32, depth=2, num_heads=2, bits=8, text_dim=16, text_max_len=8, text_pool_heads=1,
                                            block_chunks=1, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def params(model_cfg):
    return jax.device_get(transformer.param_dict(transformer.build(model_cfg, seed=0)))


def test_decay_set_is_the_official_one(model_cfg, params):
    """The decayed elements of our params are exactly the decayed elements of the exported official state dict."""
    mask = optim.decay_mask(params)
    ours = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    official = convert_infinity.export_weights(ml_collections.ConfigDict({"model": model_cfg.to_dict()}), params)
    theirs = sum(v.size for k, v in official.items() if _official_decays(k, v))
    assert ours == theirs > 0
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:  # and tensor by tensor
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        name, _ = convert_infinity.official_key(keys)
        if keys[0] == "blocks":
            name = convert_infinity.block_prefix(0, model_cfg.depth, model_cfg.block_chunks) + name
        assert transformer.weight_decay(keys) == _official_decays(name, official[name]), name
    assert mask["word_embed"]["kernel"] and mask["blocks"]["sa"]["mat_qkv"]
    assert not mask["cfg_uncond"] and not mask["lvl_embed"]["embedding"]
    assert not mask["text_proj_for_sos"]["mat_q"]  # 3-D officially, excluded by name
    assert mask["text_proj_for_sos"]["mat_kv"] and not mask["text_proj_for_sos"]["proj"]["bias"]


def _numpy_adamw(params, grads_seq, mask, cfg):
    """torch.optim.AdamW after clip_grad_norm_(clip): p *= 1 - lr wd (decay set); p -= lr m^ / (sqrt(v^) + eps)."""
    p = [np.asarray(x, np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_seq, start=1):
        norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
        scale = min(1.0, cfg.clip / norm)
        lr = cfg.lr * min(1.0, (t - 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for i, g in enumerate(grads):
            g = g.astype(np.float64) * scale
            m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * g
            v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * g * g
            if mask[i]:
                p[i] = p[i] * (1 - lr * cfg.weight_decay)
            p[i] = p[i] - lr * (m[i] / (1 - cfg.b1 ** t)) / (np.sqrt(v[i] / (1 - cfg.b2 ** t)) + cfg.eps)
    return p


@pytest.mark.parametrize("warmup,grad_scale", [(0, 1.0), (2, 100.0)])  # 100x: the global norm clips
def test_adamw_with_clipping_matches_torch_semantics(params, warmup, grad_scale):
    cfg = optim.default_config()
    cfg.lr, cfg.warmup_steps, cfg.weight_decay = 1e-2, warmup, 0.1  # large enough that decay shows
    tx = optim.make(cfg, params)
    rng = np.random.default_rng(0)
    grads_seq = [jax.tree.map(lambda x: (rng.standard_normal(np.shape(x)) * grad_scale * 1e-2).astype(np.float32),
                              params) for _ in range(3)]
    norm = float(optim.global_norm(grads_seq[0]))
    assert (norm > cfg.clip) == (grad_scale > 1)
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for g in grads_seq:
        u, state = update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    want = _numpy_adamw(jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads_seq],
                        jax.tree.leaves(optim.decay_mask(params)), cfg)
    for got, ref in zip(jax.tree.leaves(jax.device_get(p)), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_learning_rate_warmup_then_constant():
    cfg = optim.default_config()
    cfg.lr, cfg.warmup_steps = 1e-3, 4
    lr = optim.learning_rate(cfg)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 100)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    cfg.warmup_steps = 0
    assert float(optim.learning_rate(cfg)(0)) == pytest.approx(1e-3)


def test_default_hyperparameters_are_the_official_ones():
    cfg = optim.default_config()
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip, cfg.ema_decay) == (0.9, 0.97, 1e-8, 0.005, 5.0, 0.0)


def test_ema_update():
    ema = {"a": np.full((3,), 2.0, np.float32)}
    new = optim.update_ema(ema, {"a": np.zeros((3,), np.float32)}, 0.75)
    np.testing.assert_allclose(new["a"], 1.5)
