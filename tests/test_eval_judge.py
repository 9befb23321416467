"""GPT-Balance judge client (varedit_jax/eval/judge.py) against a fake OpenAI-compatible server on 127.0.0.1.

The server (`helpers.FakeServer`) runs in a daemon thread for the module's tests only, answers canned replies keyed by
the instruction in the prompt, and is shut down at teardown; every request loop in the client is bounded (retries, timeouts).
"""
import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from helpers import FakeServer
from varedit_jax.eval import judge as jd


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _items(instructions, seed=0):
    rng = np.random.default_rng(seed)
    return [jd.JudgeItem(f"id{i}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                         rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), text)
            for i, text in enumerate(instructions)]


def _config(server, tmp_path, **kw):
    settings = dict(model="fake-judge", cache_dir=str(tmp_path / "cache"), backoff_s=0.0, timeout_s=10,
                    max_retries=3, concurrency=2)
    return jd.JudgeConfig(base_url=server.url, **{**settings, **kw})


def test_parse_scores_variants():
    cases = {
        '{"score": [8, 6], "reasoning": "ok"}': (8, 6),
        '```json\n{\n"score" : [7.5, 9],\n"reasoning" : "fine"\n}\n```': (7.5, 9),
        'Sure! Here is my evaluation: {"score": [3, 10], "reasoning": "barely"} Hope it helps.': (3, 10),
        "{'score': [4, 5], 'reasoning': 'single quotes'}": (4, 5),
        '{"scores": "[2, 8]"}': (2, 8),
        'output score = [9, 1] because ...': (9, 1),
        '"score": [6, 7], "reasoning": "truncated': (6, 7),
        'The result is [0, 10].': (0, 10),
    }
    for reply, expected in cases.items():
        assert jd.parse_scores(reply) == expected, reply
    for bad in ("no scores here", '{"score": [11, 5]}', '{"score": [5]}', "[1, 2] and [3, 4]", "",
                '{"score": ["a", "b"]}', None):
        assert jd.parse_scores(bad) is None, bad


def test_prompt_and_request_body():
    prompt = jd.render_prompt("  make the sky blue ")
    assert prompt.endswith("Editing instruction: make the sky blue\n")
    assert "score1' evaluates the editing success" in prompt and "degree of overediting" in prompt
    assert '{"score": [...], "reasoning" : "..."}' in prompt
    with pytest.raises(ValueError):
        jd.render_prompt(" ")
    item = _items(["x"])[0]
    body = jd.Judge(jd.JudgeConfig(base_url="http://127.0.0.1:1/v1", temperature=0.0)).body(item)
    parts = body["messages"][0]["content"]
    assert body["temperature"] == 0.0 and "max_tokens" not in body and body["model"] == "gpt-4o"
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    for part, image in zip(parts[1:], (item.source, item.edited)):  # [source, edited], lossless PNG
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        np.testing.assert_array_equal(decoded, image)
    with pytest.raises(ValueError):
        jd.JudgeConfig(base_url="api.example/v1")


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("VAREDIT_JUDGE_MODEL", "local-vlm")
    config = jd.JudgeConfig.from_env(concurrency=8)
    assert (config.base_url, config.model, config.concurrency) == ("http://127.0.0.1:8000/v1", "local-vlm", 8)
    assert jd.JudgeConfig.from_env(model="gpt-4.1").model == "gpt-4.1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert jd.JudgeConfig.from_env().base_url == "https://api.openai.com/v1"


def test_judge_end_to_end_with_cache_retries_and_failures(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test")
    server.replies = {"add a hat": '{"score": [8, 6], "reasoning": "good"}',
                      "remove the car": '```json\n{"score": [10, 0]}\n```',
                      "make it night": "I refuse to grade this.",
                      "paint it red": "score = [4, 4]"}
    server.fail_first = {"paint it red": 2}  # two 500s, then the answer
    items = _items(["add a hat", "remove the car", "make it night", "paint it red"])
    judge = jd.Judge(_config(server, tmp_path, api_key_env="FAKE_JUDGE_KEY"))
    results = judge.judge(items)
    assert [r.id for r in results] == ["id0", "id1", "id2", "id3"]
    assert (results[0].success, results[0].overedit) == (8, 6)
    assert results[0].balance == pytest.approx(2 * 8 * 6 / 14)
    assert results[1].balance == 0.0  # severe over-editing: Bal. 0
    assert results[2].error == "unparseable reply" and results[2].reply == "I refuse to grade this."
    assert math.isnan(results[2].success)
    assert results[3].success == 4 and not results[3].cached
    assert len(server.requests) == 4 + 2 and judge.requests_sent == 6  # two retries after the 500s
    assert all(r["auth"] == "Bearer sk-test" and r["path"] == "/v1/chat/completions" for r in server.requests)
    summary = jd.summarize_judge(results)
    assert summary["n"] == 3 and summary["n_failed"] == 1 and summary["failed"] == ["id2"]
    assert summary["gpt_success"] == pytest.approx((8 + 10 + 4) / 3)
    assert summary["gpt_balance"] == pytest.approx((2 * 48 / 14 + 0 + 4) / 3)
    assert summary["gpt_balance_of_means"] == pytest.approx(
        2 * summary["gpt_success"] * summary["gpt_overedit"] / (summary["gpt_success"] + summary["gpt_overedit"]))
    # A rerun is served from the cache (the unparseable reply too), without a single request.
    again = jd.Judge(_config(server, tmp_path)).judge(items)
    assert len(server.requests) == 6 and all(r.cached for r in again)
    assert [(r.success, r.overedit, r.reply) for r in again if r.error is None] == \
        [(r.success, r.overedit, r.reply) for r in results if r.error is None]
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 4 and json.loads(cached[0].read_text())["model"] == "fake-judge"
    # A different judge model or edited image is a different cache key.
    other = jd.Judge(_config(server, tmp_path, model="other-judge")).judge(items[:1])
    assert len(server.requests) == 7 and not other[0].cached


def test_exhausted_retries_are_counted_not_cached(server, tmp_path):
    server.replies = {"always broken": 503}
    judge = jd.Judge(_config(server, tmp_path, max_retries=2))
    sleeps = []
    judge._sleep = sleeps.append
    result = judge.judge(_items(["always broken"]))[0]
    assert result.error is not None and "3 attempts" in result.error and result.reply is None
    assert len(server.requests) == 3 and sleeps == [0.0, 0.0]
    assert not list((tmp_path / "cache").glob("*.json"))
    assert jd.summarize_judge([result])["n_failed"] == 1


def test_backoff_grows_exponentially(server, tmp_path):
    server.fail_first = {"slow": 3}
    judge = jd.Judge(_config(server, tmp_path, backoff_s=0.5))
    sleeps = []
    judge._sleep = sleeps.append
    assert judge.judge(_items(["slow"]))[0].error is None
    assert sleeps == [0.5, 1.0, 2.0]


def test_setup_errors_stop_the_run(server, tmp_path):
    server.replies = {"x": 401}
    with pytest.raises(jd.JudgeSetupError, match="401"):
        jd.Judge(_config(server, tmp_path)).judge(_items(["x"]))
    assert len(server.requests) == 1  # not retried
    unreachable = jd.JudgeConfig(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.0, timeout_s=2)
    result = jd.Judge(unreachable).judge(_items(["y"]))[0]
    assert "network error" in result.error


def test_concurrency_is_bounded(server, tmp_path):
    server.delay = 0.05
    results = jd.Judge(_config(server, tmp_path, concurrency=2)).judge(_items([f"edit {i}" for i in range(6)]))
    assert len(results) == 6 and all(r.error is None for r in results)
    assert 1 <= server.max_in_flight <= 2
