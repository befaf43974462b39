"""`tierflow init` refuses what it cannot write well; `tierflow doctor`'s checks fail with a fix (no Ray)."""

import socket

import pytest

from workflows.doctor import check_mlflow, check_ports, check_store
from workflows.errors import ValidationError
from workflows.starter import init


def test_init_writes_three_files_and_never_overwrites(tmp_path):
    written = init("churn_model", tmp_path)
    assert sorted(p.name for p in written) == ["churn_model.py", "test_churn_model.py", "tierflow.toml"]
    text = (tmp_path / "churn_model.py").read_text()
    compile(text, "churn_model.py", "exec")
    assert 'register_model="churn-model"' in text and 'Workflow("churn_model"' in text
    with pytest.raises(ValidationError, match="already exist"):
        init("churn_model", tmp_path)


@pytest.mark.parametrize("name", ["my-flow", "2fast", "class", "../x"])
def test_init_refuses_names_that_are_not_modules(tmp_path, name):
    with pytest.raises(ValidationError, match="not a Python module name"):
        init(name, tmp_path)
    assert not list(tmp_path.iterdir())


def test_doctor_store_check_fails_on_an_unwritable_store_and_says_how_to_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    check = check_store(str(blocker / "store"))
    assert not check.ok and "TIERFLOW_STORE" in check.fix
    assert check_store(str(tmp_path / "store")).ok


def test_doctor_mlflow_check_names_an_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    check = check_mlflow(f"http://127.0.0.1:{port}")
    assert not check.ok and "mlflow server" in check.fix


def test_doctor_port_check_sees_a_held_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setattr("workflows.doctor.PORTS", {port: "a test port"})
        (check,) = check_ports()
        assert not check.ok and "in use" in check.detail
    (check,) = check_ports()
    assert check.ok
