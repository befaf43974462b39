"""The endpoint's request validator and output guard: pure functions, no Ray, no HTTP."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.contract import InputSpec
from serving.validation import (
    BrokenOutput,
    EndpointError,
    InvalidInput,
    check_model,
    check_outputs,
    parse_instances,
    probe,
)
from tests.fixtures.hostile_bodies import REPORTED_LITERALS, expected_statuses, hostile_cases, reported_body

SPEC = InputSpec(4)
DIGITS = InputSpec(64)


def parse(body: bytes | str, spec: InputSpec = SPEC, content_type: str | None = "application/json", max_rows=8):
    raw = body.encode() if isinstance(body, str) else body
    return parse_instances(raw, content_type, spec, max_rows=max_rows)


def refusal(body: bytes | str, **kw) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse(body, **kw)
    return info.value


def encodable(exc: EndpointError) -> bool:
    """As Starlette's JSONResponse encodes a body: no NaN, UTF-8."""
    json.dumps(exc.body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return isinstance(exc.message, str) and exc.message.isascii()


def test_a_valid_body_becomes_a_float32_array():
    rows = parse('{"instances": [[0, 1.5, 16, -2], [1e-300, 3e38, 0, 0]]}')
    assert rows.dtype == np.float32 and rows.shape == (2, 4)
    assert rows[0].tolist() == [0.0, 1.5, 16.0, -2.0] and np.isfinite(rows).all()


@pytest.mark.parametrize("literal", REPORTED_LITERALS)
def test_the_reported_bodies_are_422_with_an_encodable_message_that_names_the_fix(literal):
    exc = refusal(reported_body(literal), spec=DIGITS)
    assert exc.status == 422 and encodable(exc)
    assert "send finite" in exc.message or "send float32" in exc.message, exc.message
    if literal == "1e300":  # finite in JSON and float64, but not in the model's float32
        assert "instances[0][0] = 1e+300 overflows float32" in exc.message


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        ("", "application/json", 422, "empty body"),
        ("[[[[" * 5000 + "]]]]" * 5000, "application/json", 422, "nested too deeply"),
        ('{"instances": [[1, 2, 3, 4]]}', "text/plain", 422, "application/json"),
        ('{"instances": [[1, 2, 3, 4]]}', "application/jsonx", 422, "not JSON"),
        ('{"instances": [[1, 2, 3, 4]], "x": 1}', "application/json", 422, 'unknown field(s) "x"'),
        ('{"instances": []}', "application/json", 422, "at least 1 row"),
        ('{"instances": [[1, 2, 3]]}', "application/json", 422, "instances[0] has 3 features"),
        ('{"instances": [[1, 2, 3, true]]}', "application/json", 422, "instances[0][3] is a boolean"),
        ('{"instances": [[1, 2, 3, "4"]]}', "application/json", 422, "instances[0][3] is a string"),
        ('{"instances": [[1, 2, 3, ' + "9" * 400 + "]]}", "application/json", 422, "overflows to infinity"),
        ('{"instances": [[1, 2, 3, ' + "9" * 5000 + "]]}", "application/json", 422, "thousands of digits"),
        ('{"instances": [' + "[1, 2, 3, 4], " * 8 + "[1, 2, 3, 4]]}", "application/json", 413, "at most 8"),
        ("[1, 2]", "application/json", 422, "is a JSON list, not an object"),
    ],
)
def test_each_kind_of_bad_body_names_its_problem(body, content_type, status, says):
    exc = refusal(body, content_type=content_type)
    assert (exc.status, says in exc.message) == (status, True), exc.message
    assert encodable(exc)


def test_invalid_utf8_and_client_strings_are_never_echoed_raw():
    assert "not valid UTF-8" in refusal(b'{"instances": [[\xc3\x28]]}').message
    exc = refusal('{"instances": [[1, 2, 3, 4]], "\\ud800\\u00e9": 1}')  # a lone surrogate in a key
    assert encodable(exc) and "\\ud800" in exc.message  # escaped, so the 422 itself can be encoded


def test_a_missing_content_type_is_read_as_json_and_parameters_are_ignored():
    assert parse('{"instances": [[1, 2, 3, 4]]}', content_type=None).shape == (1, 4)
    assert parse('{"instances": [[1, 2, 3, 4]]}', content_type="application/json; charset=UTF-8").shape == (1, 4)


def test_a_declared_range_is_enforced_and_named():
    spec = InputSpec(2, min=0, max=16)
    assert parse('{"instances": [[0, 16]]}', spec=spec).tolist() == [[0.0, 16.0]]
    exc = refusal('{"instances": [[0, 16.5]]}', spec=spec)
    assert "instances[0][1] = 16.5 is above the model's input range" in exc.message and "[0, 16]" in exc.message


def test_integer_models_take_whole_numbers_and_the_probe_row_is_inside_the_range():
    ints = InputSpec(2, dtype="int64")
    assert parse('{"instances": [[1, 2]]}', spec=ints).dtype == np.int64
    assert "is not a whole number" in refusal('{"instances": [[1, 2.5]]}', spec=ints).message
    assert probe(InputSpec(3, min=1, max=2)).tolist() == [[1.0, 1.0, 1.0]]


def test_non_finite_outputs_are_refused_and_blamed_on_the_input_or_the_model():
    check_outputs(np.array([[0.5, 0.5]], dtype=np.float32), SPEC)  # finite: answered
    outputs = np.array([[0.5, 0.5], [np.nan, np.nan], [0.1, np.inf]], dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"instances \[1, 2\] drive the model to non-finite") as info:
        check_outputs(outputs, SPEC)  # no declared range: the input drove the model out of its domain
    assert info.value.status == 422
    with pytest.raises(BrokenOutput, match="model is broken") as broken:
        check_outputs(outputs, InputSpec(4, min=0, max=16))  # in range: the model's fault
    assert broken.value.status == 500 and encodable(broken.value)


def test_the_seeded_hostile_bodies_get_the_statuses_the_fuzz_test_expects():
    seen = set()
    for category, body, content_type in hostile_cases(seed=16, count=3000):
        try:
            rows = parse(body, spec=DIGITS, content_type=content_type, max_rows=1024)
        except InvalidInput as exc:
            assert exc.status in expected_statuses(category) and encodable(exc), (category, body[:80], exc)
            seen.add((category, exc.status))
        else:
            assert 200 in expected_statuses(category), (category, body[:80])
            assert rows.shape[1] == 64 and np.isfinite(rows).all()
            seen.add((category, 200))
    assert {("valid", 200), ("shape", 413), ("nonfinite", 422), ("content_type", 422)} <= seen


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10**330), max_value=10**330)
near_valid = st.fixed_dictionaries(
    {"instances": st.lists(st.lists(numbers | json_values, min_size=3, max_size=5), min_size=1, max_size=4)}
)


def check_any(body: bytes, content_type: str | None, spec: InputSpec) -> None:
    """The property: a float32 array of finite, in-range rows, or an encodable 413/422, nothing else."""
    try:
        rows = parse_instances(body, content_type, spec, max_rows=3)
    except InvalidInput as exc:
        assert exc.status in (413, 422) and encodable(exc)
        return
    assert rows.dtype == np.dtype(spec.dtype) and rows.ndim == 2 and rows.shape[1] == spec.width
    assert 1 <= len(rows) <= 3 and np.isfinite(rows).all()
    if spec.min is not None:
        assert rows.min() >= spec.min and rows.max() <= spec.max


specs = st.sampled_from([SPEC, InputSpec(4, min=-1, max=1), InputSpec(4, dtype="float64")])
content_types = st.sampled_from([None, "application/json", "text/plain", "application/problem+json", ""])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_values | near_valid, spec=specs, content_type=content_types)
def test_any_json_document_is_rows_or_an_encodable_4xx(doc, spec, content_type):
    check_any(json.dumps(doc, allow_nan=True).encode(), content_type, spec)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), spec=specs)
def test_any_bytes_are_rows_or_an_encodable_4xx(body, spec):
    check_any(body, "application/json", spec)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.floats(width=32), min_size=6, max_size=6))
def test_the_output_guard_refuses_exactly_the_non_finite_rows(values):
    outputs = np.array(values, dtype=np.float32).reshape(3, 2)
    bad = [i for i, row in enumerate(outputs.tolist()) if not all(math.isfinite(v) for v in row)]
    if not bad:
        check_outputs(outputs, SPEC)
        return
    with pytest.raises(InvalidInput) as info:
        check_outputs(outputs, SPEC)
    assert info.value.message.startswith(f"instances [{', '.join(map(str, bad))}]") and encodable(info.value)


def test_a_model_with_non_finite_outputs_on_the_probe_row_is_refused_at_load():
    check_model(np.array([[0.2, 0.8]], dtype=np.float32), SPEC)
    with pytest.raises(BrokenOutput, match=r"weights are broken.*serve another version"):
        check_model(np.array([[np.nan, np.nan]], dtype=np.float32), SPEC)
