"""The Ray Serve application for a classifier artifact: FastAPI ingress, pydantic validation.

Client mistakes (wrong JSON, types, shapes) answer 422 with a message; they never reach the model.
"""

from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serving.model import from_tensors, predict_proba
from storage import ArtifactRef, ArtifactStore, StoreConfig

MAX_ROWS = 1024
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]

api = FastAPI(title="tierflow model endpoint", description="Predictions from a tierflow-trained model.")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[FiniteFloat]] = Field(
        min_length=1, max_length=MAX_ROWS, description="Rows of features, one list per example."
    )


class PredictResponse(BaseModel):
    predictions: list[int]
    probabilities: list[list[float]]
    model_digest: str


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class ClassifierDeployment:
    """Loads verified weights from the artifact store; the digest ties each answer to its lineage."""

    def __init__(self, store_config: StoreConfig, artifact: ArtifactRef, lineage: dict[str, str]) -> None:
        bundle = ArtifactStore(store_config).get(artifact)
        self.model, self.config = from_tensors(bundle)
        self.n_features = int(self.config["layers"][0])
        self.digest = artifact.digest
        self.lineage = {"model_digest": artifact.digest, "artifact_uri": artifact.uri, **lineage}

    @api.post("/predict", response_model=PredictResponse)
    def predict(self, request: PredictRequest) -> PredictResponse:
        widths = {len(row) for row in request.instances}
        if widths != {self.n_features}:
            raise HTTPException(
                status_code=422,
                detail=f"each instance must have exactly {self.n_features} features; got lengths {sorted(widths)}",
            )
        proba = predict_proba(self.model, np.asarray(request.instances, dtype=np.float32))
        return PredictResponse(
            predictions=proba.argmax(axis=1).tolist(),
            probabilities=np.round(proba, 6).tolist(),
            model_digest=self.digest,
        )

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/info")
    def info(self) -> dict[str, Any]:
        return {"n_features": self.n_features, **self.lineage}


def deploy_classifier(
    artifact: ArtifactRef,
    store_config: StoreConfig,
    *,
    app_name: str,
    route_prefix: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: float = 0.25,
    lineage: dict[str, str] | None = None,
) -> str:
    """Deploy (or update) the app and return its base URL once it is healthy."""
    serve.start(http_options={"host": host, "port": port})
    deployment = ClassifierDeployment.options(ray_actor_options={"num_cpus": num_cpus})
    serve.run(deployment.bind(store_config, artifact, lineage or {}), name=app_name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix}"


def shutdown_app(app_name: str) -> None:
    serve.delete(app_name)
