"""The body of `POST /<app>/generate`, checked: pure functions of bytes (no Ray, no FastAPI, no torch).

Every refusal is an `InvalidInput` (422 for a wrong parameter, 413 for a prompt over the limit) whose message
names the field and what to send instead, and never echoes the client's text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.batcher import GenerationParams
from serving.validation import InvalidInput, _kind, load_json

SHAPE = '{"prompt": "text", "max_tokens": 64, "temperature": 0.0, "seed": null, "stop": [], "stream": false}'
FIELDS = ("prompt", "max_tokens", "temperature", "seed", "stop", "stream")
MAX_TEMPERATURE = 100.0  # beyond this sampling is uniform noise; a larger value is a client mistake
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_stop_strings: int
    max_stop_chars: int
    default_max_tokens: int = 64


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    params: GenerationParams
    stream: bool


def parse_generate(
    body: bytes, content_type: str | None, limits: Limits, encode: Callable[[str], list[int]]
) -> GenerateRequest:
    """The checked request; `encode` is the model's tokenizer (the prompt limit is in its tokens)."""
    doc = load_json(body, content_type, SHAPE)
    if not isinstance(doc, dict):
        raise InvalidInput(422, f"body is a JSON {_kind(doc)}, not an object: send {SHAPE}")
    unknown = sorted(json.dumps(k)[:40] for k in doc if k not in FIELDS)
    if unknown:
        raise InvalidInput(422, f"unknown field(s) {', '.join(unknown[:5])}: the fields are {', '.join(FIELDS)}")
    prompt = doc.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        got = "an empty string" if prompt == "" else ("missing" if "prompt" not in doc else f"a {_kind(prompt)}")
        raise InvalidInput(422, f'"prompt" is {got}: send the text to continue as a non-empty string')
    try:
        ids = encode(prompt)
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: not text UTF-8 can carry
        raise InvalidInput(422, '"prompt" holds an unpaired surrogate escape (\\ud800-\\udfff): send text') from None
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidInput(
            413, f'"prompt" is {len(ids)} tokens; at most {limits.max_prompt_tokens} are accepted: shorten it'
        )
    max_tokens = doc.get("max_tokens", limits.default_max_tokens)
    if not _is_int(max_tokens) or not 1 <= max_tokens <= limits.max_new_tokens:
        raise InvalidInput(422, f'"max_tokens" must be an integer in [1, {limits.max_new_tokens}]')
    temperature = doc.get("temperature", 0.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or not 0 <= temperature <= MAX_TEMPERATURE
    ):
        raise InvalidInput(422, f'"temperature" must be a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy)')
    seed = doc.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise InvalidInput(422, '"seed" must be null or an integer in [0, 2**63 - 1]')
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput(422, '"stream" must be true (server-sent events) or false (one JSON answer)')
    stops = _stops(doc.get("stop", []), limits)
    params = GenerationParams(max_tokens=max_tokens, temperature=float(temperature), seed=seed, stop=stops)
    return GenerateRequest(ids, params, stream)


def _stops(value: Any, limits: Limits) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    rule = f"a string or a list of at most {limits.max_stop_strings} non-empty strings"
    rule += f" of at most {limits.max_stop_chars} characters"
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidInput(422, f'"stop" must be {rule}')
    if len(stops) > limits.max_stop_strings:
        raise InvalidInput(422, f'"stop" has {len(stops)} strings: send at most {limits.max_stop_strings}')
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise InvalidInput(422, f'"stop" strings must be at most {limits.max_stop_chars} characters long')
    return tuple(stops)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` (or a literal such as `[DONE]`) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)
    return f"data: {data}\n\n".encode()
