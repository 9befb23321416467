"""GPT-Success / GPT-Overedit / GPT-Balance with any OpenAI-compatible chat-completions endpoint.

Protocol (VAREdit Appendix A.2.2, from OmniEdit / VIEScore's two-image "SC" rules): one user message holding the
judge prompt of the paper's Figure 9 (`render_prompt`, the instruction substituted; "and 'score2'" spaced as in
VIEScore) followed by the source and the edited image as base64 PNG data URLs, in that order (VIEScore sends JPEG;
PNG keeps small edits intact). The judge answers `{"score": [success, overedit], "reasoning": ...}` on 0-10;
GPT-Over. is 10 for a minimal yet effective edit. Per sample Bal. = harmonic mean, 0 if either score
is 0 (`scores.balance`); the reported Bal. is the mean over samples, `balance_of_means` is given beside it.

Client: `JudgeConfig` names the endpoint (`base_url` + "/chat/completions"), the model and the environment variable
holding the API key (sent as a Bearer token; none when unset, for local servers); `JudgeConfig.from_env()` takes
the URL from $OPENAI_BASE_URL and the model from $VAREDIT_JUDGE_MODEL. Raw replies are cached on disk, one
JSON file per key = sha256(model, prompt version, instruction, source pixel hash, edited pixel hash), so a rerun
never re-queries and replies can be re-parsed offline. HTTP 408 / 409 / 429 / 5xx and network errors are retried
with exponential backoff; other 4xx replies fail that item; 401 / 403 / 404 stop the run (`JudgeSetupError`: a
wrong key, model or URL). At most `concurrency` requests are in flight. A reply without two parseable scores in
[0, 10] is a counted failure: its result keeps the raw text, its scores are NaN and it is left out of the means.
Judge scores drift with the judge model and its version: compare numbers only from one judge.
"""
import ast
import base64
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np

from varedit_jax import images as imgs
from varedit_jax.eval import scores

log = logging.getLogger(__name__)

PROMPT_VERSION = "varedit-fig9-v1"
# The judge prompt of the paper's Figure 9 (the chat roles "Human:" / "Assistant:" and the two <Image> slots are the
# message structure: the text part below, then the two images).
JUDGE_PROMPT = (
    'You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated '
    'image(s) based on the given rules. You will have to give your output in this way (Keep your reasoning concise '
    'and short.):{"score": [...], "reasoning" : "..."} and don\'t output anything else.\n'
    'Two images will be provided:\n'
    'The first being the original AI-generated image and the second being an edited version of the first. The '
    'objective is to evaluate how successfully the editing instruction has been executed in the second image. Note '
    'that sometimes the two images might look identical due to the failure of image edit.\n'
    'From a scale 0 to 10:\n'
    'A score from 0 to 10 will be given based on the success of the editing.\n'
    ' - 0 indicates that the scene in the edited image does not follow the editing instruction at all.\n'
    ' - 10 indicates that the scene in the edited image follow the editing instruction text perfectly.\n'
    ' - If the object in the instruction is not present in the original image at all, the score will be 0.\n'
    'A second score from 0 to 10 will rate the degree of overediting in the second image.\n'
    ' - 0 indicates that the scene in the edited image is completely different from the original.\n'
    ' - 10 indicates that the edited image can be recognized as a minimal edited yet effective version of '
    'original.\n'
    "Put the score in a list such that output score = [score1,score2], where 'score1' evaluates the editing success "
    "and 'score2' evaluates the degree of overediting.\n"
    'Editing instruction: <EDITING INSTRUCTION>\n')
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
FATAL_STATUS = (401, 403, 404)  # wrong key, model or URL: every request would fail the same way


def render_prompt(instruction: str) -> str:
    """The Figure 9 prompt text for one instruction."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("the judge needs a non-empty instruction")
    return JUDGE_PROMPT.replace("<EDITING INSTRUCTION>", instruction.strip())


# ------------------------------------------------------------------------------------------------------ parsing
_NUMBER = r"-?\d+(?:\.\d+)?"
_SCORE_LIST = re.compile(rf"[\"']?scores?[\"']?\s*[:=]\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[\],]", re.IGNORECASE)
_ANY_PAIR = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _valid(pair) -> tuple[float, float] | None:
    try:
        s, o = (float(v) for v in pair)
    except (TypeError, ValueError):
        return None
    return (s, o) if all(math.isfinite(v) and 0.0 <= v <= 10.0 for v in (s, o)) else None


def _from_object(obj) -> tuple[float, float] | None:
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if str(key).strip().lower() in ("score", "scores"):
            if isinstance(value, str):
                match = _ANY_PAIR.search(value)
                value = match.groups() if match else None
            if isinstance(value, (list, tuple)) and len(value) == 2:
                return _valid(value)
    return None


def _objects(text: str):
    """Candidate dicts: the whole text, fenced blocks, then every balanced {...} span, as JSON or Python literals."""
    chunks = [text] + _FENCE.findall(text)
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            depth, start = depth + 1, i if depth == 0 else start
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                chunks.append(text[start:i + 1])
    for chunk in chunks:
        for load in (json.loads, ast.literal_eval):
            try:
                yield load(chunk.strip())
                break
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                continue


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(success, overedit) from a judge reply, or None.

    Accepted, in order: a JSON / Python dict with "score" (or "scores") = [s, o] (also as a string "[s, o]"),
    possibly inside a ```json fence or surrounded by text; a `score = [s, o]` / `"score": [s, o]` fragment; a lone
    `[s, o]` pair when the reply holds exactly one. Both values must be numbers in [0, 10].
    """
    if not isinstance(reply, str):
        return None
    for obj in _objects(reply):
        if (found := _from_object(obj)) is not None:
            return found
    if match := _SCORE_LIST.search(reply):
        return _valid(match.groups())
    pairs = _ANY_PAIR.findall(reply)
    return _valid(pairs[0]) if len(pairs) == 1 else None


# ------------------------------------------------------------------------------------------------------- client
@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Endpoint and client settings. base_url e.g. "https://api.openai.com/v1" or a local server's "/v1" URL.
    temperature / max_tokens are sent only when set (the paper does not state them)."""
    base_url: str
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str | None = None
    concurrency: int = 4
    max_retries: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 120.0
    temperature: float | None = None
    max_tokens: int | None = None

    @classmethod
    def from_env(cls, **overrides) -> "JudgeConfig":
        """base_url from $OPENAI_BASE_URL (default https://api.openai.com/v1), model from $VAREDIT_JUDGE_MODEL
        (default gpt-4o); keyword arguments override both and set the other fields."""
        fields = dict(base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                      model=os.environ.get("VAREDIT_JUDGE_MODEL", "gpt-4o"))
        return cls(**{**fields, **overrides})

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("judge concurrency must be >= 1, max_retries and backoff_s >= 0, timeout_s > 0")


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    id: str
    source: np.ndarray
    edited: np.ndarray
    instruction: str


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """success / overedit / balance are NaN when the reply did not parse or the request failed (error says why)."""
    id: str
    success: float
    overedit: float
    balance: float
    reply: str | None
    cached: bool
    error: str | None = None


class JudgeError(RuntimeError):
    """A request that failed after all retries, or with a non-retryable HTTP error (counted per item)."""


class JudgeSetupError(RuntimeError):
    """HTTP 401 / 403 / 404: the endpoint, key or model is wrong; `Judge.judge` stops with it."""


class ReplyCache:
    """One JSON file per request key under `root` ({"key", "model", "instruction", "reply", ...}), written
    atomically; safe for concurrent threads of one process."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> str | None:
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable judge cache entry %s: %s", path, e)
            return None

    def put(self, key: str, record: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)
        os.replace(tmp, self.root / f"{key}.json")


def request_key(model: str, instruction: str, source_hash: str, edited_hash: str) -> str:
    payload = json.dumps([PROMPT_VERSION, model, instruction, source_hash, edited_hash])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(imgs.png_bytes(image)).decode("ascii")


def _reply_text(body: dict) -> str:
    """choices[0].message.content as text (string content, or the text parts of a content list)."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat-completions response: {str(body)[:200]}") from e
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError(f"reply content is {type(content).__name__}, not text")
    return content


class Judge:
    """`judge(items) -> [JudgeResult]` in item order (see the module docstring)."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.cache = ReplyCache(config.cache_dir) if config.cache_dir else None
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(config.api_key_env, "")
        self._sleep = time.sleep
        self._lock = threading.Lock()
        self.requests_sent = 0

    def body(self, item: JudgeItem) -> dict:
        return self.body_for(render_prompt(item.instruction), [item.source, item.edited])

    def body_for(self, text: str, images: Sequence) -> dict:
        """One user message: `text`, then each image as a PNG data URL, in order."""
        content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": _data_url(im)}}
                                                      for im in images]
        body = {"model": self.config.model, "messages": [{"role": "user", "content": content}]}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        return body

    def _post(self, body: dict) -> str:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._sleep(self.config.backoff_s * 2 ** (attempt - 1))
            with self._lock:
                self.requests_sent += 1
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    return _reply_text(json.loads(response.read().decode("utf-8")))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code in FATAL_STATUS:
                    raise JudgeSetupError(f"HTTP {e.code} from {self.url} (check base_url, model and "
                                          f"${self.config.api_key_env}): {detail}") from e
                if e.code not in RETRY_STATUS:
                    raise JudgeError(f"HTTP {e.code} from {self.url}: {detail}") from e
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"network error: {e}"
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                last = f"bad response: {e}"
            log.warning("judge request failed (attempt %d of %d): %s", attempt + 1, self.config.max_retries + 1,
                        last)
        raise JudgeError(f"judge request to {self.url} failed after {self.config.max_retries + 1} attempts: {last}")

    def ask(self, key: str, item_id: str, text: str, images: Sequence, **meta) -> tuple[str | None, bool, str | None]:
        """(reply, cached, error) of one request (`body_for(text, images)`), through the cache under `key`; a failed
        request gives (None, False, why). `meta` goes into the cache record."""
        reply = self.cache.get(key) if self.cache else None
        if reply is not None:
            return reply, True, None
        try:
            reply = self._post(self.body_for(text, images))
        except JudgeError as e:
            return None, False, str(e)
        if self.cache:
            self.cache.put(key, dict(key=key, id=item_id, model=self.config.model, reply=reply, time=time.time(),
                                     **meta))
        return reply, False, None

    def judge_one(self, item: JudgeItem) -> JudgeResult:
        key = request_key(self.config.model, item.instruction, imgs.pixel_hash(item.source),
                          imgs.pixel_hash(item.edited))
        reply, cached, error = self.ask(key, item.id, render_prompt(item.instruction), [item.source, item.edited],
                                        prompt=PROMPT_VERSION, instruction=item.instruction)
        if error is not None:
            nan = float("nan")
            return JudgeResult(item.id, nan, nan, nan, None, False, error)
        parsed = parse_scores(reply)
        if parsed is None:
            nan = float("nan")
            return JudgeResult(item.id, nan, nan, nan, reply, cached, "unparseable reply")
        s, o = parsed
        return JudgeResult(item.id, s, o, float(scores.balance(s, o)), reply, cached)

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(self.judge_one, items))


def summarize_judge(results: Sequence[JudgeResult]) -> dict:
    """gpt_success, gpt_overedit, gpt_balance (mean of per-sample Bal.: the reported value), gpt_balance_of_means,
    n (judged samples), n_failed (unparseable replies and failed requests) and failed (their ids)."""
    row = scores.summarize([r.success for r in results], [r.overedit for r in results])
    failed = [r.id for r in results if r.error is not None]
    return dict(gpt_success=row["success"], gpt_overedit=row["preservation"], gpt_balance=row["balance"],
                gpt_balance_of_means=row["balance_of_means"], n=row["n"], n_failed=len(failed), failed=failed)
