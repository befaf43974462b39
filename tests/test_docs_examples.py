"""Every complete example in README.md and docs/ runs, so the docs cannot rot.

A complete example is a fenced block whose info string is `python run`. Each runs as a script
(`__name__ == "__main__"`) in its own empty directory, on one Ray instance shared by the module, with
`MLFLOW_TRACKING_URI` and `TIERFLOW_STORE` pointing into that directory. The README's breast-cancer
workflow is run as a user runs it, through the CLI, by tests/integration/test_readme_example.py.
"""

import os
import re
import runpy
from pathlib import Path

import pytest
import ray

from actors.pool import shared_pools
from tests.conftest import start_local_ray

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python run\n(.*?)^```", re.S | re.M)
RUN_ELSEWHERE = "# breast_cancer.py"  # tests/integration/test_readme_example.py


def examples(*, here_only: bool = False) -> list:
    """Every `python run` block; `here_only` leaves out the one run through the CLI elsewhere."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            if here_only and m.group(1).startswith(RUN_ELSEWHERE):
                continue
            line = text.count("\n", 0, m.start()) + 1
            found.append(pytest.param(m.group(1), id=f"{doc.relative_to(REPO)}:{line}"))
    return found


def test_the_docs_hold_examples_and_every_page_is_linked_from_the_readme():
    assert len(examples()) >= 6
    assert sum(p.values[0].startswith(RUN_ELSEWHERE) for p in examples()) == 1  # the README's, run by the CLI test
    readme = (REPO / "README.md").read_text()
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"{page.name} is not linked from README.md"
    assert len(readme.encode()) < 12_000, "README.md is the front page: move reference material to docs/"


@pytest.fixture(scope="module")
def shared_ray():
    start_local_ray(num_cpus=2, num_gpus=0)
    yield
    shared_pools.release_all()
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize("code", examples(here_only=True))
def test_example_runs(code, shared_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TIERFLOW_STORE", f"memory://docs-{os.getpid()},{tmp_path / 'store'}")
    script = tmp_path / "docs_example.py"  # not `example.py`: nvidia-ml-py installs a module of that name
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
