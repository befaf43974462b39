"""The /generate body checks (serving.generate_request): pure, no Ray."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.generate_request import FIELDS, Limits, parse_generate, sse
from serving.generation import encode
from serving.validation import InvalidInput

LIMITS = Limits(max_prompt_tokens=32, max_new_tokens=100, max_stop_strings=2, max_stop_chars=8)


def parse(doc, content_type="application/json"):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_generate(body, content_type, LIMITS, encode)


def refusal(doc, **kw) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse(doc, **kw)
    return info.value


def test_a_full_request():
    req = parse({"prompt": "héllo", "max_tokens": 7, "temperature": 0.5, "seed": 3, "stop": ["\n"], "stream": True})
    assert req.prompt_ids == list("héllo".encode()) and req.stream
    assert (req.params.max_tokens, req.params.temperature, req.params.seed, req.params.stop) == (7, 0.5, 3, ("\n",))
    defaults = parse({"prompt": "a", "stop": "x"})
    assert not defaults.stream and defaults.params.max_tokens == 64 and defaults.params.stop == ("x",)
    assert defaults.params.temperature == 0.0 and defaults.params.seed is None


@pytest.mark.parametrize(
    ("doc", "status", "says"),
    [
        ({"prompt": "a", "max_tokens": 0}, 422, '"max_tokens" must be an integer in [1, 100]'),
        ({"prompt": "a", "max_tokens": 101}, 422, "[1, 100]"),
        ({"prompt": "a", "max_tokens": True}, 422, "max_tokens"),
        ({"prompt": "a", "max_tokens": 5.0}, 422, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, 422, '"temperature" must be a number in [0, 100]'),
        ({"prompt": "a", "temperature": "hot"}, 422, "temperature"),
        (b'{"prompt": "a", "temperature": 1e999}', 422, "temperature"),  # parses as inf
        ({"prompt": "a", "seed": -1}, 422, '"seed"'),
        ({"prompt": "a", "seed": 2**64}, 422, '"seed"'),
        ({"prompt": "a", "stop": ["a", "b", "c"]}, 422, "at most 2"),
        ({"prompt": "a", "stop": ["123456789"]}, 422, "at most 8 characters"),
        ({"prompt": "a", "stop": [""]}, 422, "non-empty strings"),
        ({"prompt": "a", "stop": 5}, 422, '"stop" must be'),
        ({"prompt": "a", "stream": "yes"}, 422, '"stream" must be true'),
        ({"prompt": "a", "top_k": 5}, 422, 'unknown field(s) "top_k"'),
        ({"prompt": ""}, 422, '"prompt" is an empty string'),
        ({"max_tokens": 3}, 422, '"prompt" is missing'),
        ({"prompt": ["a"]}, 422, '"prompt" is a list'),
        ({"prompt": "x" * 33}, 413, '"prompt" is 33 tokens; at most 32'),
        ({"prompt": "é" * 17}, 413, "34 tokens"),  # the limit is in the model's tokens (bytes), not characters
        ([1, 2], 422, "not an object"),
        (b"{", 422, "not valid JSON"),
        (b'{"prompt": "a", "temperature": NaN}', 422, "NaN is not a number"),
        (b'{"prompt": "\\ud800"}', 422, "unpaired surrogate"),
    ],
)
def test_refusals_name_the_field_and_the_fix(doc, status, says):
    err = refusal(doc)
    assert err.status == status and says in err.message
    assert err.message.isascii()


def test_refusals_never_echo_the_input():
    secret = "SECRET-PROMPT-TEXT"
    assert secret not in refusal({"prompt": secret * 10}).message
    assert secret not in refusal({"prompt": "a", "stop": [secret]}).message


def test_non_json_content_type():
    assert "is not JSON" in refusal({"prompt": "a"}, content_type="text/plain").message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.text(max_size=40) | json_values,
            "max_tokens": st.integers(-5, 200) | json_values,
            "temperature": st.floats(allow_nan=True) | json_values,
            "seed": st.integers(-(2**64), 2**64) | json_values,
            "stop": st.lists(st.text(max_size=10), max_size=4) | json_values,
            "stream": st.booleans() | json_values,
        },
    )
    | json_values
)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(bodies)
def test_any_json_body_is_a_request_or_a_clear_refusal(doc):
    body = json.dumps(doc).encode()  # may hold NaN / Infinity literals, as hostile clients send
    try:
        req = parse_generate(body, "application/json", LIMITS, encode)
    except InvalidInput as err:
        assert err.status in (413, 422) and err.message.isascii()
        return
    assert isinstance(doc, dict) and set(doc) <= set(FIELDS)
    assert 1 <= len(req.prompt_ids) <= LIMITS.max_prompt_tokens
    assert 1 <= req.params.max_tokens <= LIMITS.max_new_tokens and req.params.temperature >= 0


def test_sse_framing():
    assert sse({"text": "a\nb"}) == b'data: {"text": "a\\nb"}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
