"""Ray Serve applications for tierflow-trained models.

`serving.app` (Ray Serve + FastAPI) is imported on first use so that loading a registered MLflow
model needs only torch and safetensors.
"""

from __future__ import annotations

from typing import Any

from serving.model import build_mlp, from_tensors, predict_proba, to_tensors

__all__ = [
    "ClassifierDeployment",
    "build_mlp",
    "deploy_classifier",
    "from_tensors",
    "predict_proba",
    "shutdown_app",
    "to_tensors",
]


def __getattr__(name: str) -> Any:
    if name in ("ClassifierDeployment", "deploy_classifier", "shutdown_app"):
        from serving import app  # noqa: PLC0415

        return getattr(app, name)
    raise AttributeError(name)
