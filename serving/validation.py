"""Request and response checks for a model endpoint: pure functions of bytes and arrays (no Ray, no FastAPI).

Parameterised by the model's `serving.contract.InputSpec` (features per row, dtype, optional value range),
so any model's endpoint can use them. Every refusal is an `EndpointError` whose message is plain ASCII: it never echoes
the client's input verbatim (FastAPI's own 422 does, and a `NaN` or `1e999` in it made the 422 itself fail
to encode, a 500), and it says what to send instead.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

import numpy as np

_JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json")
_NUMBER = (int, float)  # exact types: JSON true/false arrive as bool, a subclass of int
_SHOWN = 5  # offending indices named in a message


class EndpointError(Exception):
    """A request the endpoint answers with an error: `status` and a JSON-encodable `body`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def body(self) -> dict[str, str]:
        return {"detail": self.message}


class InvalidInput(EndpointError):
    """The client's request is wrong (422) or too big (413); nothing reached the model."""


class BrokenOutput(EndpointError):
    """The model produced non-finite outputs for inputs inside its declared range: the model is at fault (500)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message)


class RowSpec(Protocol):
    """What a model takes per row: `serving.contract.InputSpec` (width, dtype, optional [min, max])."""

    width: int
    dtype: str
    min: float | None
    max: float | None


def dtype_max(spec: RowSpec) -> float:
    dt = np.dtype(spec.dtype)
    return float(np.finfo(dt).max if dt.kind == "f" else np.iinfo(dt).max)


def has_range(spec: RowSpec) -> bool:
    return spec.min is not None or spec.max is not None


def example(spec: RowSpec) -> str:
    return f'{{"instances": [[{spec.width} numbers], ...]}}'


def probe(spec: RowSpec) -> np.ndarray:
    """One row inside the declared range (zeros where allowed): a healthy model answers it finitely."""
    low = -np.inf if spec.min is None else spec.min
    high = np.inf if spec.max is None else spec.max
    return np.full((1, spec.width), np.clip(0.0, low, high), dtype=spec.dtype)


def parse_instances(body: bytes, content_type: str | None, spec: RowSpec, *, max_rows: int) -> np.ndarray:
    """The rows of a `{"instances": [[...], ...]}` body as a (rows, n_features) array of `spec.dtype`.

    Raises `InvalidInput` (never anything else) for any body that is not that.
    """
    doc = load_json(body, content_type, example(spec), numbers=f"{spec.dtype} values")
    return instances_array(doc, spec, max_rows=max_rows)


def load_json(body: bytes, content_type: str | None, shape: str, *, numbers: str = "plain numbers") -> Any:
    """The JSON document of a request body, or `InvalidInput` naming the problem and the `shape` to send.

    A missing content type is read as JSON, like FastAPI does; any other non-JSON type is refused. NaN and
    Infinity literals, over-deep nesting and integers of thousands of digits are refused here too."""
    if content_type is not None and not _JSON_TYPE.fullmatch(content_type.split(";", 1)[0].strip().lower()):
        raise InvalidInput(
            422, f"Content-Type {_show(content_type)} is not JSON: send the body as application/json, {shape}"
        )
    if not body.strip():
        raise InvalidInput(422, f"empty body: send JSON {shape}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(422, f"body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except InvalidInput:
        raise
    except RecursionError:
        raise InvalidInput(422, f"JSON nested too deeply: send {shape}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(422, f"body is not valid JSON ({exc.msg} at char {exc.pos}): send {shape}") from None
    except ValueError:  # an integer literal over Python's 4300-digit limit
        raise InvalidInput(422, f"a number has thousands of digits: send {numbers}") from None


def instances_array(doc: Any, spec: RowSpec, *, max_rows: int) -> np.ndarray:
    """Check an already-decoded JSON document; see `parse_instances`."""
    if not isinstance(doc, dict):
        raise InvalidInput(422, f"body is a JSON {_kind(doc)}, not an object: send {example(spec)}")
    extra = sorted(_show(k) for k in doc if k != "instances")
    if extra:
        raise InvalidInput(422, f"unknown field(s) {', '.join(extra[:_SHOWN])}: send only {example(spec)}")
    if "instances" not in doc:
        raise InvalidInput(422, f'missing field "instances": send {example(spec)}')
    rows = doc["instances"]
    if not isinstance(rows, list) or not rows:
        got = "an empty list" if isinstance(rows, list) else f"a {_kind(rows)}"
        raise InvalidInput(422, f'"instances" is {got}: send a valid list of at least 1 row, {example(spec)}')
    if len(rows) > max_rows:
        raise InvalidInput(413, f"{len(rows)} instances: at most {max_rows} per request; split the request")
    n = spec.width
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise InvalidInput(
                422, f"instances[{i}] is a {_kind(row)}: each instance is a list of exactly {n} features"
            )
        if len(row) != n:
            raise InvalidInput(
                422, f"instances[{i}] has {len(row)} features: each instance must have exactly {n} features"
            )
        if not set(map(type, row)) <= {int, float}:  # map(type) keeps the common all-numbers case in C
            j, bad = next((j, v) for j, v in enumerate(row) if type(v) not in _NUMBER)
            raise InvalidInput(422, f"instances[{i}][{j}] is a {_kind(bad)}: each feature must be a valid number")
    try:
        values = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        raise InvalidInput(
            422, f"a value overflows to infinity: send finite {spec.dtype} numbers (|x| <= {dtype_max(spec):.7g})"
        ) from None
    check_values(values, spec)
    return values.astype(spec.dtype)


def check_values(values: np.ndarray, spec: RowSpec) -> None:
    """Refuse (InvalidInput 422) float64 rows the model cannot take: non-finite, beyond its dtype or range."""
    if not np.isfinite(values).all():
        raise InvalidInput(
            422,
            f"{_index(~np.isfinite(values))} overflows to infinity: send finite {spec.dtype} numbers "
            f"(|x| <= {dtype_max(spec):.7g})",
        )
    _check_bound(values, np.abs(values) > dtype_max(spec), f"overflows {spec.dtype}, the model's input type", spec)
    if np.dtype(spec.dtype).kind != "f" and (values != np.round(values)).any():
        _check_bound(values, values != np.round(values), "is not a whole number (the model takes integers)", spec)
    if spec.min is not None:
        _check_bound(values, values < spec.min, "is below the model's input range", spec)
    if spec.max is not None:
        _check_bound(values, values > spec.max, "is above the model's input range", spec)


def check_outputs(outputs: np.ndarray, spec: RowSpec) -> None:
    """Refuse to answer with non-finite outputs (JSON has no NaN; a null probability is a wrong answer).

    Blame the input (422) unless the spec declares a range: inputs inside it that still give non-finite
    outputs mean the model is broken (500). A model that fails even `probe(spec)` is refused at load.
    """
    finite = np.isfinite(outputs).reshape(len(outputs), -1).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite).tolist()
    shown = ", ".join(map(str, bad[:_SHOWN])) + (", ..." if len(bad) > _SHOWN else "")
    if has_range(spec):
        raise BrokenOutput(
            f"the model gave non-finite outputs for instances [{shown}], whose values are inside its input "
            "range: the model is broken; roll back to the previous version"
        )
    raise InvalidInput(
        422,
        f"instances [{shown}] drive the model to non-finite outputs (NaN or infinity): their values are far "
        "outside what it was trained on; send values in its training range",
    )


def check_model(probe_outputs: np.ndarray, spec: RowSpec) -> None:
    """Refuse a model at load whose outputs for `probe(spec)` are non-finite: it is broken for any input."""
    if not np.isfinite(probe_outputs).all():
        raise BrokenOutput(
            f"the model gives non-finite outputs for {probe(spec)[0, :3].tolist()}... ({spec.width} "
            "features): its weights are broken (NaN or overflow); retrain it or serve another version"
        )


def _check_bound(values: np.ndarray, outside: np.ndarray, problem: str, spec: RowSpec) -> None:
    if outside.any():
        low = "-inf" if spec.min is None else f"{spec.min:g}"
        high = "inf" if spec.max is None else f"{spec.max:g}"
        allowed = f"[{low}, {high}]" if has_range(spec) else f"|x| <= {dtype_max(spec):.7g}"
        i, j = np.argwhere(outside)[0]
        raise InvalidInput(
            422, f"{_index(outside)} = {values[i, j]:.7g} {problem}: send {spec.dtype} values in {allowed}"
        )


def _index(mask: np.ndarray) -> str:
    i, j = np.argwhere(mask)[0]
    return f"instances[{i}][{j}]"


def _reject_constant(name: str) -> Any:
    raise InvalidInput(
        422, f"{name} is not a number this endpoint accepts: send finite numbers (standard JSON has no {name})"
    )


def _kind(value: Any) -> str:
    names = {bool: "boolean", str: "string", list: "list", dict: "object", type(None): "null"}
    return names.get(type(value), "number")


def _show(value: str) -> str:
    """A client's string, safe to put in a message: ASCII-escaped (lone surrogates too) and short."""
    shown = json.dumps(value)  # ensure_ascii: escapes non-ASCII, lone surrogates included
    return shown if len(shown) <= 40 else shown[:36] + '..."'
