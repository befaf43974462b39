"""`tierflow init NAME`: a starter workflow that runs as written, its test, and a tierflow.toml."""

from __future__ import annotations

import keyword
from pathlib import Path

from workflows.errors import ValidationError

WORKFLOW = '''"""{name}: a starter tierflow workflow. Run it with `tierflow run {name}.py:workflow`."""

import numpy as np
import torch
from torch import nn

from workflows import GateFailed, InputSpec, Tensors, Workflow, stage, torch_model


def net(n_features: int, hidden: int) -> nn.Module:
    """The architecture; `torch_model` records this builder so the model can be rebuilt anywhere."""
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 2))


@stage(cpus=1)
def preprocess(rows: int = 1000, seed: int = 0) -> Tensors:
    """Make a synthetic two-class data set; replace this with your own data."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=rows, n_features=8, random_state=seed)
    split = int(rows * 0.8)
    x = x.astype(np.float32)
    return Tensors({{"x_train": x[:split], "y_train": y[:split], "x_test": x[split:], "y_test": y[split:]}})


@stage(cpus=1, gpus=1, fallback="cpu", register_model="{model}")
def train(ctx, preprocess: Tensors, hidden: int = 32, epochs: int = 10) -> Tensors:
    """Train on a GPU when the cluster has one, else on a CPU."""
    data = preprocess.tensors
    x, y = (torch.as_tensor(data[k], device=ctx.device) for k in ("x_train", "y_train"))
    model = net(8, hidden).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        for batch in torch.randperm(len(x), device=ctx.device).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
        ctx.log_metric("loss", loss.item(), epoch)
    return torch_model(
        model.cpu().eval(),
        builder=net,
        args={{"n_features": 8, "hidden": hidden}},
        task="classifier",
        input=InputSpec(8),
        example=data["x_test"][:5],
    )


@stage(cpus=1, gate=True)
def evaluate(ctx, preprocess: Tensors, train: Tensors, threshold: float = 0.7) -> dict:
    """Fail the run (and serve nothing) below `threshold` accuracy."""
    from serving.contract import forward, load_any

    model, spec = load_any(train)
    data = preprocess.tensors
    accuracy = float((forward(model, spec, data["x_test"]).argmax(1) == data["y_test"]).mean())
    ctx.log_metric("accuracy", accuracy)
    if accuracy < threshold:
        raise GateFailed(f"accuracy {{accuracy:.3f}} is below {{threshold}}")
    return {{"accuracy": accuracy}}


# To serve the model too: from workflows import serve_model, and add serve_model("train", after=["evaluate"]).
workflow = Workflow("{name}", [preprocess, train, evaluate])
'''

TEST = '''"""Runs {name}.py on a local Ray: `python -m pytest test_{name}.py`."""

from pathlib import Path

import ray

from storage import ArtifactStore, StoreConfig
from workflows.engine import run_workflow
from workflows.loader import load_workflow

HERE = Path(__file__).resolve().parent


def test_{name}_runs(tmp_path):
    workflow = load_workflow(f"{{HERE / '{name}.py'}}:workflow")
    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        run = run_workflow(workflow, store_config=StoreConfig.from_urls([str(tmp_path / "store")]), keep_warm_s=0)
    finally:
        ray.shutdown()
    assert run.status == "succeeded"
    assert ArtifactStore(run.store_config).get(run.records["evaluate"].artifact)["accuracy"] >= 0.7
'''

TOML = """# tierflow settings for this directory (read by `tierflow run` when --store and $TIERFLOW_STORE are unset).
[store]
allow_pickle = false

[[store.tiers]]
url = "memory://tierflow"
role = "hot"
capacity = "1GiB"

[[store.tiers]]
url = ".tierflow/store"  # durable: use s3://bucket/prefix on a cluster
role = "durable"
"""


def init(name: str, directory: Path) -> list[Path]:
    """Write NAME.py, test_NAME.py and tierflow.toml into `directory`; refuses to overwrite anything."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValidationError(f"{name!r} is not a Python module name; use letters, digits and _, e.g. churn_model")
    files = {
        directory / f"{name}.py": WORKFLOW.format(name=name, model=name.replace("_", "-")),
        directory / f"test_{name}.py": TEST.format(name=name),
        directory / "tierflow.toml": TOML,
    }
    if taken := [str(p) for p in files if p.exists()]:
        raise ValidationError(f"{', '.join(taken)} already exist(s); pick another name or directory")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return list(files)
