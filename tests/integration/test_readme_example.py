"""The README's complete user-model example, run as a user would: `tierflow run breast_cancer.py:workflow`,
then the registered version loaded with `mlflow.pyfunc.load_model` in a fresh process. Docs cannot rot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from storage import ArtifactStore, StoreConfig
from tests.conftest import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MARKER = "# breast_cancer.py"


def readme_example() -> str:
    blocks = re.findall(r"```python(?: run)?\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(MARKER)]
    assert len(found) == 1, f"README.md must hold exactly one python block starting with {MARKER!r}"
    return found[0]


def test_readme_example_runs_serves_and_loads_from_the_registry(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "breast_cancer.py").write_text(readme_example())
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "RAY_AUTH_MODE": "token",
    }
    cmd = [sys.executable, "-m", "workflows", "run", "breast_cancer.py:workflow", "--json", "--num-cpus", "2"]
    cmd += ["--store", str(tmp_path / "store"), "-p", f"serve.port={free_port()}"]
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout[p.stdout.index("{") :])
    assert summary["status"] == "succeeded"
    (answer,) = summary["endpoints"]
    assert answer["url"].endswith("/breast-cancer/predict")  # app and route from the workflow's name
    response = answer["response"]
    assert response["predictions"][0] in ("malignant", "benign"), response
    assert response["model_version"] == "1" and len(response["probabilities"][0]) == 2

    # a fresh interpreter elsewhere: the workflow file is importable only from the model's code_paths
    script = (
        "import json, sys, mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/breast-cancer/1'); "
        "rows = np.asarray(json.loads(sys.argv[1]), np.float32); "
        "print(json.dumps({'labels': m.predict(rows).tolist(), 'file': sys.modules['breast_cancer'].__file__}))"
    )
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "store")]))
    served = store.get(next(m for m in store.manifests() if m.stage == "serve"))
    rows = json.dumps(served["example"]["instances"])  # the very request the endpoint answered
    loaded = subprocess.run(
        [sys.executable, "-c", script, rows],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    out = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert out["labels"] == response["predictions"]  # the registry's model answers as the endpoint did
    assert "/code/breast_cancer.py" in out["file"]
