"""Load a model's weights for serving, verified against the digest its lineage recorded."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from serving.config import ModelSource, RolloutRefused, ServingError
from storage import ArtifactStore, Tensors
from storage.formats import SAFETENSORS, decode
from storage.hashing import content_digest

GATE_TAG = "tierflow.gate"
DIGEST_TAG = "tierflow.digest"


def load_bundle(source: ModelSource) -> Tensors:
    """Weights from the artifact store (re-hashed on read) or from the MLflow registry (hashed here)."""
    if source.artifact is not None:
        return ArtifactStore(source.store_config).get(source.artifact)
    import mlflow  # noqa: PLC0415

    version = mlflow.MlflowClient(source.tracking_uri).get_model_version(source.model_name, source.version)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{version.source}/artifacts/model.safetensors",
            dst_path=tmp,
            tracking_uri=source.tracking_uri,
        )
        data = Path(local).read_bytes()
    if content_digest(data) != source.digest:
        raise ServingError(f"{source.label}: downloaded weights do not match digest {source.digest}; refusing them")
    return decode(SAFETENSORS, data)


def load_model(source: ModelSource) -> tuple[Any, Any]:
    """(module in eval mode, `serving.contract.ModelSpec`) for any model bundle, plain or int8-compressed."""
    from serving.contract import load_any  # noqa: PLC0415

    return load_any(load_bundle(source))


def registry_source(model_uri: str, tracking_uri: str, *, require_gate: bool = True) -> ModelSource:
    """A `models:/name/version` (or `models:/name@alias`) source, refused unless its evaluation gate passed."""
    import mlflow  # noqa: PLC0415

    if not model_uri.startswith("models:/"):
        raise ServingError(f"{model_uri!r} is not a registry URI; use models:/NAME/VERSION or models:/NAME@ALIAS")
    ref = model_uri.removeprefix("models:/")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        raise ServingError(f"cannot find {model_uri} in {tracking_uri}: {exc.message}") from None
    tags = mv.tags or {}
    if DIGEST_TAG not in tags:
        raise ServingError(f"{model_uri} was not registered by tierflow (no {DIGEST_TAG} tag); cannot verify it")
    gate = tags.get(GATE_TAG, "unknown")
    if require_gate and gate != "passed":
        raise RolloutRefused(f"{model_uri} has {GATE_TAG}={gate}: only versions that passed evaluation are served")
    return ModelSource(
        digest=tags[DIGEST_TAG],
        version=str(mv.version),
        model_name=mv.name,
        tracking_uri=tracking_uri,
        lineage={"model_run_id": mv.run_id or "", "gate": gate, "source": json.dumps(model_uri)},
    )
