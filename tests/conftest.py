"""Shared fixtures. Ray instances are module-scoped: `ray.init` costs ~4 s here."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Token auth on everywhere, as `ray start` does on 2.60. Ray reads this when it is imported, and a
# client whose mode differs from its cluster's sees actors die "before they ran": set it first.
os.environ["RAY_AUTH_MODE"] = "token"

import pytest
import ray
from ray import cloudpickle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]


def tierflow(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """The `tierflow` CLI as a user runs it: a fresh process that finds no cluster, store or MLflow of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "TIERFLOW_STORE")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "workflows", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def ship_by_value(module_name: str) -> None:
    """Stages defined in test modules are sent to Ray workers by value (workers cannot import tests)."""
    cloudpickle.register_pickle_by_value(sys.modules[module_name])


def start_local_ray(**kwargs) -> None:
    # "local" never attaches to a cluster someone else started on this host.
    ray.init("local", include_dashboard=False, log_to_driver=False, **kwargs)


def wait_for_resources_released(timeout_s: float = 10.0) -> tuple[dict, dict]:
    """Actor kills are asynchronous: poll until available == total (or time out).

    Runs park their idle actors for the next run (keep_warm_s); those are ended first, so what is
    left held is what a run leaked.
    """
    from actors.pool import shared_pools

    shared_pools.release_all()
    deadline = time.monotonic() + timeout_s
    while True:
        total, avail = ray.cluster_resources(), ray.available_resources()
        keys = [k for k in total if k in ("CPU", "GPU") or k.startswith("accelerator_type")]
        if all(abs(avail.get(k, 0) - total[k]) < 1e-6 for k in keys) or time.monotonic() > deadline:
            return {k: total[k] for k in keys}, {k: avail.get(k, 0) for k in keys}
        time.sleep(0.1)


@pytest.fixture(scope="module", autouse=True)
def _no_parked_actors_between_modules() -> Iterator[None]:
    """Runs park idle actors for the next run of the process; none may outlive a module's Ray."""
    yield
    from actors.pool import shared_pools

    shared_pools.release_all()  # after the module's ray.shutdown() this only forgets them


@pytest.fixture(scope="module")
def ray_with_declared_gpu() -> Iterator[None]:
    """One node with 4 CPUs and one declared T4 GPU (no real GPU on this machine)."""
    start_local_ray(num_cpus=4, num_gpus=1, resources={"accelerator_type:T4": 1, "licence": 2})
    yield
    from actors.pool import shared_pools

    shared_pools.release_all()
    ray.shutdown()


# -- ending the test process ----------------------------------------------------------------------
# One clean-clone CI run passed every test and then died with SIGSEGV during interpreter shutdown (no
# Python frame), as Ray's C++ threads called back into a finalizing interpreter (cf. ray#47864). Ray is
# shut down while the interpreter is whole, and once pytest has reported (trylast: after every other
# plugin's unconfigure) the process ends with pytest's own exit status, skipping native teardown.
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT] = int(exitstatus)
    if ray.is_initialized():
        ray.shutdown()


_EXIT = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT in config.stash and not os.environ.get("TIERFLOW_TEST_NORMAL_EXIT"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT])
