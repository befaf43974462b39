"""Ray Serve applications for tierflow-trained models.

Submodules that pull in torch, FastAPI or Ray Serve are imported on first use, so the CLI starts fast
and loading a registered MLflow model needs only torch and safetensors.
"""

from __future__ import annotations

from typing import Any

from serving.config import ModelSource, RolloutRefused, ServeConfig, ServingError
from serving.contract import GenerationSpec, InputSpec, ModelContractError, ModelSpec, torch_model
from serving.generation import Detokenizer, Generator, StopMatcher, generator_model, load_generator
from serving.ux_metrics import Deadlines, RequestMetrics, RequestTimeline, fluidity_index, goodput

__all__ = [
    "Chunk",
    "Deadlines",
    "DecodeEngine",
    "Detokenizer",
    "EngineBusy",
    "EngineError",
    "GenerationParams",
    "GenerationServer",
    "GenerationSpec",
    "Generator",
    "InputSpec",
    "ModelContractError",
    "ModelServer",
    "ModelSource",
    "ModelSpec",
    "RequestMetrics",
    "RequestTimeline",
    "Rollout",
    "RolloutRefused",
    "ServeConfig",
    "ServingError",
    "StopMatcher",
    "build_app",
    "build_mlp",
    "fluidity_index",
    "from_tensors",
    "generator_model",
    "goodput",
    "load_generator",
    "predict_proba",
    "to_tensors",
    "torch_model",
]


def __getattr__(name: str) -> Any:
    if name == "ModelServer":
        from serving import app  # noqa: PLC0415

        return app.ModelServer
    if name == "build_app":
        from serving import rollout  # noqa: PLC0415

        return rollout.build_app
    if name in ("build_mlp", "from_tensors", "predict_proba", "to_tensors"):
        from serving import model  # noqa: PLC0415  # torch is imported only when a model is touched

        return getattr(model, name)
    if name in ("Chunk", "DecodeEngine", "EngineBusy", "EngineError", "GenerationParams"):
        from serving import batcher  # noqa: PLC0415

        return getattr(batcher, name)
    if name == "GenerationServer":
        from serving.generate_app import GenerationServer  # noqa: PLC0415  # FastAPI and Serve

        return GenerationServer
    if name == "Rollout":
        from serving.rollout import Rollout  # noqa: PLC0415

        return Rollout
    raise AttributeError(name)
