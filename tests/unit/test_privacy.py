"""Pseudonymisation transform, key loading and the ready-made stages. No Ray: stage functions are called directly."""

import datetime as dt
import hashlib
import hmac
import json
import os

import pyarrow as pa
import pytest

from storage import StorageError
from storage.formats import encode
from storage.privacy import (
    KEY_ENV,
    KEY_FILE_ENV,
    META_COLUMNS,
    META_KEY_ID,
    PrivacyError,
    key_id,
    load_key,
    pseudonymise,
)
from workflows import Stage, Workflow, stage
from workflows.privacy import pseudonymise_source, pseudonymise_stage

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
EMAILS = ["alice@example.com", "bob@example.org", None, "alice@example.com"]


@pytest.fixture(autouse=True)
def no_key_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def people() -> pa.Table:
    return pa.table(
        {
            "email": EMAILS,
            "user_id": pa.array([101, 202, 303, 101], pa.int64()),
            "score": [0.5, 1.5, 2.5, 3.5],
        }
    ).replace_schema_metadata({"origin": "crm"})


def write_key(tmp_path, data: bytes, mode: int):
    path = tmp_path / "pseudonym.key"
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# -- pseudonymise ----------------------------------------------------------------------------------


def test_tokens_are_deterministic_hmac_sha256_and_repeat_for_equal_values():
    out = pseudonymise(people(), ["email"], KEY)
    assert out.equals(pseudonymise(people(), ["email"], KEY))
    tokens = out.column("email").to_pylist()
    expected = hmac.new(KEY, b"str\x00alice@example.com", hashlib.sha256).hexdigest()[:32]
    assert tokens[0] == tokens[3] == expected
    assert tokens[1] != tokens[0] and all(len(t) == 32 for t in tokens if t)


def test_different_keys_give_different_tokens():
    a = pseudonymise(people(), ["email"], KEY).column("email").to_pylist()
    b = pseudonymise(people(), ["email"], OTHER_KEY).column("email").to_pylist()
    assert all(x != y for x, y in zip(a, b, strict=True) if x is not None)


def test_nulls_stay_null_and_all_null_columns_work():
    assert pseudonymise(people(), ["email"], KEY).column("email").to_pylist()[2] is None
    t = pa.table({"n": pa.nulls(3), "s": pa.array([None, None, None], pa.string())})
    out = pseudonymise(t, ["n", "s"], KEY)
    assert out.column("n").to_pylist() == out.column("s").to_pylist() == [None, None, None]


def test_int_and_str_of_the_same_digits_differ_but_int_widths_and_encodings_do_not():
    t = pa.table(
        {
            "i64": pa.array([1], pa.int64()),
            "i8": pa.array([1], pa.int8()),
            "s": ["1"],
            "dict": pa.array(["1"]).dictionary_encode(),
            "large": pa.array(["1"], pa.large_string()),
        }
    )
    out = pseudonymise(t, t.column_names, KEY)
    tok = {c: out.column(c)[0].as_py() for c in t.column_names}
    assert tok["i64"] != tok["s"]
    assert tok["i64"] == tok["i8"]
    assert tok["s"] == tok["dict"] == tok["large"]


def test_other_types_are_canonicalised_deterministically():
    t = pa.table(
        {
            "ts_s": pa.array([1, None], pa.timestamp("s")),
            "ts_ms": pa.array([1000, None], pa.timestamp("ms")),
            "date": [dt.date(2024, 1, 2), None],
            "flag": [True, None],
            "nested": [[1, 2], None],
            "struct": [{"a": 1, "b": "x"}, None],
        }
    )
    out = pseudonymise(t, t.column_names, KEY)
    assert out.equals(pseudonymise(t, t.column_names, KEY))
    assert out.column("ts_s").to_pylist() == out.column("ts_ms").to_pylist()  # same instant
    assert all(out.column(c)[0].as_py() and out.column(c)[1].as_py() is None for c in t.column_names)
    assert all(out.schema.field(c).type == pa.string() for c in t.column_names)


def test_chunking_does_not_change_tokens():
    chunked = pa.table({"email": pa.chunked_array([EMAILS[:1], EMAILS[1:]])})
    whole = pa.table({"email": EMAILS})
    assert pseudonymise(chunked, ["email"], KEY).column("email").to_pylist() == (
        pseudonymise(whole, ["email"], KEY).column("email").to_pylist()
    )


def test_untouched_columns_order_and_metadata():
    table = people()
    out = pseudonymise(table, ["email"], KEY)
    assert out.column_names == table.column_names
    for name in ("user_id", "score"):
        assert out.column(name).equals(table.column(name))
        assert out.schema.field(name).equals(table.schema.field(name))
    meta = out.schema.metadata
    assert meta[b"origin"] == b"crm"
    assert json.loads(meta[META_COLUMNS.encode()]) == ["email"]
    assert meta[META_KEY_ID.encode()].decode() == key_id(KEY)
    assert key_id(KEY) == hashlib.sha256(b"tierflow-key-id" + KEY).hexdigest()[:16]


def test_metadata_contains_no_key_material():
    out = pseudonymise(people(), ["email", "user_id"], KEY)
    blob = b"".join(k + v for k, v in out.schema.metadata.items())
    assert KEY not in blob and KEY.hex().encode() not in blob and KEY.hex()[:16].encode() not in blob
    assert KEY not in encode(out)[1]


def test_prefix_and_output_length():
    out = pseudonymise(people(), ["email"], KEY, prefix="u_", output_length=16)
    token = out.column("email")[0].as_py()
    assert token.startswith("u_") and len(token) == 18
    for bad in (15, 65, True, "32"):
        with pytest.raises(PrivacyError, match="output_length"):
            pseudonymise(people(), ["email"], KEY, output_length=bad)


def test_unknown_column_lists_the_tables_columns():
    with pytest.raises(PrivacyError, match=r"'phone'.*\['email', 'user_id', 'score'\]"):
        pseudonymise(people(), ["email", "phone"], KEY)


def test_bad_requests_are_refused():
    with pytest.raises(PrivacyError, match="not one string"):
        pseudonymise(people(), "email", KEY)
    with pytest.raises(PrivacyError, match="no columns"):
        pseudonymise(people(), [], KEY)
    with pytest.raises(PrivacyError, match="at least 32 bytes"):
        pseudonymise(people(), ["email"], KEY[:16])
    once = pseudonymise(people(), ["email"], KEY)
    with pytest.raises(PrivacyError, match="one key per table"):
        pseudonymise(once, ["user_id"], OTHER_KEY)
    twice = pseudonymise(once, ["user_id"], KEY)
    assert json.loads(twice.schema.metadata[META_COLUMNS.encode()]) == ["email", "user_id"]


def test_privacy_error_is_a_storage_error():
    assert issubclass(PrivacyError, StorageError)


# -- keys ------------------------------------------------------------------------------------------


def test_key_from_env_hex(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    assert load_key() == KEY
    monkeypatch.setenv(KEY_ENV, f"  {KEY.hex().upper()}\n")
    assert load_key() == KEY


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (KEY[:31].hex(), "holds 31 bytes"),
        (KEY.hex()[:-1], "not a hex string"),
        ("zz" * 32, "not a hex string"),
    ],
)
def test_short_or_malformed_env_key_is_refused_without_echoing_it(monkeypatch, value, match):
    monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(PrivacyError, match=match) as err:
        load_key()
    msg = str(err.value)
    assert value not in msg and value[:8] not in msg
    assert KEY_ENV in msg and "secrets.token_hex(32)" in msg


def test_missing_key_names_both_variables_and_how_to_generate():
    with pytest.raises(PrivacyError) as err:
        load_key()
    msg = str(err.value)
    assert KEY_ENV in msg and KEY_FILE_ENV in msg and "secrets.token_hex(32)" in msg


def test_both_sources_set_is_ambiguous(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    monkeypatch.setenv(KEY_FILE_ENV, str(write_key(tmp_path, OTHER_KEY, 0o600)))
    with pytest.raises(PrivacyError, match="only one"):
        load_key()


def test_key_from_file_mode_600_with_trailing_newline(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_FILE_ENV, str(write_key(tmp_path, KEY + b"\n", 0o600)))
    assert load_key() == KEY
    monkeypatch.setenv(KEY_FILE_ENV, str(write_key(tmp_path, KEY, 0o400)))
    assert load_key() == KEY


def test_key_file_readable_by_others_is_refused(monkeypatch, tmp_path):
    secret = b"k" * 40
    path = write_key(tmp_path, secret, 0o644)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    with pytest.raises(PrivacyError, match="chmod 600") as err:
        load_key()
    assert "644" in str(err.value) and secret.decode() not in str(err.value)


def test_short_or_missing_key_file_is_refused(monkeypatch, tmp_path):
    secret = b"s" * 31
    monkeypatch.setenv(KEY_FILE_ENV, str(write_key(tmp_path, secret, 0o600)))
    with pytest.raises(PrivacyError, match="holds 31 bytes") as err:
        load_key()
    assert secret.decode() not in str(err.value)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(PrivacyError, match="cannot be opened"):
        load_key()
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path))
    with pytest.raises(PrivacyError, match="not a regular file"):
        load_key()


def test_custom_variable_names(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY.hex())
    assert load_key(env="MY_KEY", file_env="MY_KEY_FILE") == KEY


# -- stages ----------------------------------------------------------------------------------------


class FakeContext:
    def __init__(self):
        self.tags = {}

    def set_tag(self, key, value):
        self.tags[key] = str(value)


def test_pseudonymise_source_never_outputs_raw_values(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    s = pseudonymise_source(people, ["email", "user_id"])
    assert isinstance(s, Stage) and s.name == "pseudonymise" and not s.cache
    assert s.parameters == {}  # a source: no upstream, no run-time parameter can switch it off
    ctx = FakeContext()
    out = s.fn(ctx=ctx)
    assert out.equals(pseudonymise(people(), ["email", "user_id"], KEY))
    data = encode(out)[1]
    for raw in ("alice@example.com", "bob@example.org", "alice", "example.com"):
        assert raw.encode() not in data
    assert ctx.tags[META_KEY_ID] == key_id(KEY) and KEY.hex() not in str(ctx.tags)


def test_pseudonymise_source_withholds_loader_error_messages(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.hex())

    def broken():
        raise ValueError("CSV parse error on row: alice@example.com,101")

    with pytest.raises(PrivacyError, match="raised ValueError") as err:
        pseudonymise_source(broken, ["email"]).fn()
    assert "alice" not in str(err.value) and err.value.__suppress_context__
    with pytest.raises(PrivacyError, match=r"not a pyarrow\.Table"):
        pseudonymise_source(lambda: {"email": EMAILS}, ["email"]).fn()


def test_stage_without_key_fails_before_loading(tmp_path):
    loaded = []
    s = pseudonymise_source(lambda: loaded.append(1) or people(), ["email"])
    with pytest.raises(PrivacyError, match=KEY_ENV):
        s.fn()
    assert not loaded


def test_pseudonymise_stage_wires_to_its_upstream(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.hex())

    @stage
    def raw() -> pa.Table:
        return people()

    s = pseudonymise_stage(["email"], name="pseudo")
    wf = Workflow("w", [raw, s])
    assert [(e.upstream, e.downstream, e.param) for e in wf.edges] == [("raw", "pseudo", "table")]
    assert wf.param_names["pseudo"] == {} and not s.cache and '"email"' in s.version
    out = s.fn(people())
    assert out.equals(pseudonymise(people(), ["email"], KEY))
    assert b"alice@example.com" not in encode(out)[1]


def test_stage_factories_check_their_arguments_up_front():
    with pytest.raises(PrivacyError, match="not one string"):
        pseudonymise_stage("email")
    with pytest.raises(PrivacyError, match="output_length"):
        pseudonymise_source(people, ["email"], output_length=8)
    with pytest.raises(PrivacyError, match="callable"):
        pseudonymise_source(people(), ["email"])
