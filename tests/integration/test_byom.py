"""Bring your own model (issue 15): user architectures go train -> register -> load in a fresh process ->
serve over HTTP -> roll out a second version -> roll back, on real Ray Serve, MLflow (sqlite) and torch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from ray import serve

from serving.config import ServeConfig
from serving.loading import registry_source
from serving.rollout import Rollout
from storage import ArtifactStore, StoreConfig
from tests.conftest import free_port, ship_by_value, start_local_ray
from tests.fixtures import byom_workflows as fx
from workflows import StageFailedError
from workflows.engine import run_workflow
from workflows.lineage import MLflowHook

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ship_by_value(fx.__name__)
    tmp = tmp_path_factory.mktemp("byom")
    port = free_port()
    store = StoreConfig.from_urls([str(tmp / "store")])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    start_local_ray(num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        runs = {}
        for seed in (0, 1):  # two versions of each model; the breast_cancer runs also deploy (v1, then v2)
            params = {"bc_small.seed": seed, "bc_wide.seed": seed, "serve.port": port}
            runs[f"bc{seed}"] = run_workflow(
                fx.breast_cancer, params=params, store_config=store, hooks=[MLflowHook(uri)]
            )
            runs[f"db{seed}"] = run_workflow(
                fx.diabetes, params={"db_train.seed": seed}, store_config=store, hooks=[MLflowHook(uri)]
            )
        yield {"store": store, "uri": uri, "port": port, "tmp": tmp, "runs": runs}
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def _post(env, app: str, rows) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{env['port']}/{app}/predict", json={"instances": rows}, timeout=30)


def _served(env, name: str) -> dict:
    run = env["runs"][name]
    return ArtifactStore(env["store"]).get(run.records["serve"].artifact)


def test_each_user_model_registers_versions_with_signature_and_example(env):
    client = MlflowClient(env["uri"])
    for name, width, task in (("byom-bc", 30, "classifier"), ("byom-diabetes", 10, "regressor")):
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        assert [str(v.version) for v in versions] == ["1", "2"]
        assert all(v.tags.get("tierflow.gate") == "passed" for v in versions)
        local = Path(client.download_artifacts(versions[0].run_id, "model", str(env["tmp"] / name)))
        mlmodel = (local / "MLmodel").read_text()
        assert f"tierflow.task: {task}" in mlmodel and "code: code" in mlmodel  # code_paths carried the module
        assert (local / "code" / "tests" / "fixtures" / "byom_workflows.py").is_file()
        signature = json.loads(yaml.safe_load(mlmodel)["signature"]["inputs"])
        assert signature[0]["tensor-spec"]["shape"] == [-1, width]
        example = json.loads((local / "input_example.json").read_text())
        assert np.asarray(example).shape == (5, width)  # rows of the stage's own test data


def test_registered_versions_load_in_a_fresh_process(env):
    """`mlflow.pyfunc.load_model("models:/NAME/N")` in a new interpreter that has only tierflow importable,
    run outside the repository so the user's module can come only from the model's code_paths."""
    bc_rows = _served(env, "bc1")["example"]["instances"]
    script = textwrap.dedent(
        """
        import json, sys, numpy as np, mlflow
        assert "tests" not in sys.modules
        rows = np.asarray(json.loads(sys.argv[1]), np.float32)
        bc = mlflow.pyfunc.load_model("models:/byom-bc/1")
        db = mlflow.pyfunc.load_model("models:/byom-diabetes/2")
        print(json.dumps({
            "labels": bc.predict(rows).tolist(),
            "proba": bc.predict(rows, params={"output": "probabilities"}).tolist(),
            "regression": db.predict(np.zeros((2, 10), np.float32)).tolist(),
            "module": sys.modules["tests.fixtures.byom_workflows"].__file__,
        }))
        """
    )
    pythonpath = os.pathsep.join(p for p in [str(REPO)] if p)
    environment = {**os.environ, "MLFLOW_TRACKING_URI": env["uri"], "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(bc_rows)],
        cwd=env["tmp"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["labels"][0] in ("malignant", "benign")
    assert np.allclose(np.asarray(got["proba"]).sum(axis=1), 1.0, atol=1e-5)
    assert len(got["regression"]) == 2 and all(np.isfinite(got["regression"]))
    assert "/code/" in got["module"]  # imported from the model's own code folder, not the repository


def test_breast_cancer_served_by_the_library_stage_and_rolled_out(env):
    first, second = _served(env, "bc0"), _served(env, "bc1")
    assert first["app_name"] == "byom-bc" and first["url"].endswith("/byom-bc")  # the workflow's name
    assert (first["model_version"], second["model_version"]) == ("1", "2")
    r = _post(env, "byom-bc", second["example"]["instances"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "2" and body["predictions"][0] in ("malignant", "benign")
    assert len(body["probabilities"][0]) == 2
    info = httpx.get(f"{second['url']}/info", timeout=10).json()
    assert info["input"] == {"width": 30, "dtype": "float32", "min": 0.0, "max": None}
    assert info["builder"].endswith(":TabularNet") and info["classes"] == ["malignant", "benign"]


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([[1.0] * 64], "exactly 30 features"),  # the digits width is not this model's
        ([[-1.0] * 30], "below the model's input range"),  # below the declared range [0, inf]
        ([[1e39] * 30], "float32"),  # finite JSON, but not a float32
    ],
)
def test_request_schema_comes_from_the_model(env, rows, needle):
    r = _post(env, "byom-bc", rows)
    assert r.status_code == 422 and needle in r.text, r.text


def test_rollback_returns_to_the_first_version(env):
    rollout = Rollout(env["store"], ServeConfig(app_name="byom-bc", port=env["port"]))
    back = rollout.rollback()
    assert back["version"] == "1"
    body = _post(env, "byom-bc", _served(env, "bc0")["example"]["instances"]).json()
    assert body["model_version"] == "1"


def test_regressor_deploys_from_the_registry_rolls_out_and_back(env):
    rollout = Rollout(
        env["store"], ServeConfig(app_name="diabetes", port=env["port"], graceful_shutdown_wait_loop_s=0.1)
    )
    rows = np.zeros((3, 10)).tolist()
    rollout.deploy(registry_source("models:/byom-diabetes/1", env["uri"]))
    one = _post(env, "diabetes", rows).json()
    assert one["model_version"] == "1" and one["probabilities"] is None
    assert len(one["predictions"]) == 3 and all(25 < p < 350 for p in one["predictions"])  # target units
    rollout.deploy(registry_source("models:/byom-diabetes/2", env["uri"]))
    two = _post(env, "diabetes", rows).json()
    assert two["model_version"] == "2" and two["predictions"] != one["predictions"]
    assert rollout.rollback()["version"] == "1"
    assert _post(env, "diabetes", rows).json()["predictions"] == one["predictions"]
    rollout.shutdown()


def test_a_model_whose_code_cannot_be_imported_is_not_registered(env):
    with pytest.raises(StageFailedError, match=r"tierflow_missing_models:build_regressor.*not importable"):
        run_workflow(fx.unimportable, store_config=env["store"], hooks=[MLflowHook(env["uri"])])
    client = MlflowClient(env["uri"])
    assert client.search_registered_models("name = 'byom-broken'") == []
    assert client.search_model_versions("name = 'byom-broken'") == []
