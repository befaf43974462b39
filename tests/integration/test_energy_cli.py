"""A real run (CLI, local Ray, sqlite MLflow) logs energy with its method and the stage profile to MLflow and
the stage record; `tierflow profile` shows it and `tierflow plan` prints candidates and a choice from it."""

import json

import pytest
from mlflow import MlflowClient

from storage import ArtifactStore, StoreConfig
from tests.integration.test_cli import tierflow

FIXTURE = "tests/fixtures/energy_workflows.py:small"

pytestmark = pytest.mark.integration


def test_run_logs_energy_and_profiles_then_plan_chooses(tmp_path):
    store, db = str(tmp_path / "store"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = tierflow("run", FIXTURE, "--num-cpus", "2", "--store", store, "--tracking-uri", db, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads(p.stdout[p.stdout.index("{\n") :])
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["burn"]["energy_method"] == "estimate"  # no RAPL or NVML on this machine
    assert stages["burn"]["energy_j"] >= 0.3 * 10 * 0.9  # >= 0.3 CPU-s x 10 W/core (the default), minus timer slack

    client = MlflowClient(db)
    parent = client.get_run(summary["mlflow"]["run_id"])
    children = client.search_runs(
        [summary["mlflow"]["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_stage = {c.data.tags["tierflow.stage"]: c for c in children}
    burn = by_stage["burn"].data
    assert burn.tags["tierflow.energy.method"] == "estimate"
    assert "no RAPL packages" in burn.tags["tierflow.energy.note"]
    assert burn.metrics["profile.cpu_s"] >= 0.27
    assert burn.metrics["energy_j"] == pytest.approx(burn.metrics["profile.cpu_s"] * 10.0)
    assert burn.metrics["profile.rows_in"] == 1000 and burn.metrics["profile.rows_out"] == 1000
    assert burn.metrics["profile.bytes_read"] > 0 and burn.metrics["profile.bytes_written"] > 0
    assert burn.metrics["profile.peak_rss_bytes"] > 10 * 2**20
    assert burn.metrics["co2_g"] == pytest.approx(burn.metrics["energy_j"] / 3.6e6 * 450)
    assert burn.metrics["cost_usd"] > 0
    total = sum(c.data.metrics["energy_j"] for c in children)
    assert parent.data.metrics["energy_j"] == pytest.approx(total)
    assert parent.data.tags["tierflow.energy.method"] == "estimate"

    record = ArtifactStore(StoreConfig.from_urls([store])).record(summary["run_id"], "burn")
    assert record["profile"]["energy_method"] == "estimate" and record["profile"]["cpu_s"] >= 0.27

    prof = tierflow("profile", FIXTURE, "--store", store)
    assert prof.returncode == 0 and "burn" in prof.stdout and "estimate" in prof.stdout, prof.stdout + prof.stderr

    plan = tierflow("plan", FIXTURE, "--store", store, "--node", "local:CPU=2,usd_per_h=0.1,max=3", "--deadline", "10m")
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0, out
    assert "Pareto front" in out and "choice (cost): localx1" in out  # one node is cheapest and meets 10 min
    tight = tierflow("plan", FIXTURE, "--store", store, "--node", "local:CPU=2,max=2", "--deadline", "0.01s")
    assert tight.returncode == 1 and "no configuration meets the deadline" in tight.stdout

    # Machine constants from a calibration file: a 5 s actor start-up shows in the first stage's start.
    calib = tmp_path / "calibration.json"
    calib.write_text('{"actor_start_s": 5.0, "first_call_s": 0.0}')
    one = ("plan", FIXTURE, "--store", store, "--node", "local:CPU=2,max=1", "--json")
    slow = tierflow(*one, "--calibration", str(calib), "--plot", str(tmp_path / "front.png"))
    assert slow.returncode == 0, slow.stdout + slow.stderr
    first = min(s["start_s"] for s in json.loads(slow.stdout)["choice"]["stages"].values())
    assert first == pytest.approx(5.0)
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"  # --plot drew the candidates
    calib.write_text('{"actor_start": 5.0}')
    bad = tierflow(*one, "--calibration", str(calib))
    assert bad.returncode != 0 and "unknown keys ['actor_start']" in bad.stdout
