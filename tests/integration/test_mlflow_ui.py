"""The MLflow UI of a finished run, in a real headless Chromium against a real `mlflow server`.

A new user follows the link tierflow prints: it must open the model-training view (not GenAI's traces
and token usage), the parent run must show the run's summary and its stage runs, and a stage run its
description, its upstream dataset and the model it registered.
"""

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from storage import StoreConfig
from tests.conftest import free_port, start_local_ray
from workflows import MLflowHook, Workflow
from workflows.engine import run_workflow
from workflows.loader import load_workflow
from workflows.summary import mlflow_ui_url

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def chromium() -> str:
    """Debian's chromium, installed here when absent (CI's .ci/run installs it too)."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600, check=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium and it could not be installed (needs root and apt-get: apt-get install -y chromium)")
    return found


def page_text(browser: str, url: str, tmp_path: Path) -> str:
    """The rendered page as text (the UI is a React app: only a browser running its JS shows anything)."""
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--user-data-dir={tmp_path / f'profile-{time.monotonic_ns()}'}", "--window-size=1500,1000",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):  # our loopback server
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers, nothing else
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def finished_run(mlflow_server, tmp_path_factory):
    """The README's breast-cancer workflow up to its registered, gated model (serving is tested elsewhere)."""
    work = tmp_path_factory.mktemp("project")
    code = re.search(r"```python run\n(# breast_cancer\.py.*?)```", (REPO / "README.md").read_text(), re.S)
    (work / "breast_cancer.py").write_text(code.group(1))
    full = load_workflow(f"{work / 'breast_cancer.py'}:workflow")
    wf = Workflow("breast_cancer", [full.stages[n] for n in ("preprocess", "train", "evaluate")])
    start_local_ray(num_cpus=2)
    try:
        hook = MLflowHook(mlflow_server)
        run = run_workflow(wf, store_config=StoreConfig.from_urls([str(work / "store")]), hooks=[hook], keep_warm_s=0)
    finally:
        ray.shutdown()
    assert run.status == "succeeded"
    return hook, {n: r.annotations["mlflow_run_id"] for n, r in run.records.items()}


def test_the_printed_link_opens_the_training_view_with_the_stage_runs(finished_run, tmp_path):
    browser = chromium()
    hook, stage_runs = finished_run
    text = page_text(browser, mlflow_ui_url(hook.tracking_uri, hook.experiment_id), tmp_path)
    assert "breast_cancer" in text
    assert "Model registry" in text and "Token Usage" not in text, text[:1500]  # training view, not GenAI's

    text = page_text(browser, mlflow_ui_url(hook.tracking_uri, hook.experiment_id, hook.parent_run_id), tmp_path)
    assert "Child runs" in text and all(name in text for name in stage_runs), text[:3000]
    # the description: the summary table tierflow prints
    header = r"stage resources placement node device duration energy \(method\) cache"
    assert re.search(header + r" preprocess cpus=1 fits as declared \w+ cpu", text), text[:3000]


def test_a_stage_run_shows_its_description_dataset_and_registered_model(finished_run, tmp_path):
    browser = chromium()
    hook, stage_runs = finished_run
    text = page_text(browser, mlflow_ui_url(hook.tracking_uri, hook.experiment_id, stage_runs["train"]), tmp_path)
    assert "Train on a GPU when the cluster has one, else on a CPU" in text, text[:3000]  # its docstring
    assert re.search(r"Datasets preprocess \([0-9a-f]+\) upstream", text), text[:3000]
    assert "Registered models breast-cancer v1" in text, text[:3000]
