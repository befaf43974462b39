"""tierflow workflows: declare stages with resources, wire them by parameter name, run on Ray."""

from actors.context import StageContext
from actors.resources import Resources
from actors.streaming import BatchStream, Stream
from serving.contract import InputSpec, ModelContractError, torch_model
from serving.generation import generator_model
from storage import Tensors
from workflows.errors import (
    GateFailed,
    StageFailedError,
    TierflowError,
    UnsatisfiableResourcesError,
    ValidationError,
    WorkflowDefinitionError,
    WorkflowLoadError,
)
from workflows.model import Stage, Workflow, stage
from workflows.serve_stage import serve_model

__all__ = [
    "BatchStream",
    "GateFailed",
    "InputSpec",
    "MLflowHook",
    "ModelContractError",
    "Resources",
    "Stage",
    "StageContext",
    "StageFailedError",
    "Stream",
    "Tensors",
    "TierflowError",
    "UnsatisfiableResourcesError",
    "ValidationError",
    "Workflow",
    "WorkflowDefinitionError",
    "WorkflowLoadError",
    "generator_model",
    "release_warm_actors",
    "run_workflow",
    "serve_model",
    "stage",
    "torch_model",
]


def __getattr__(name: str) -> object:
    # The engine and the MLflow hook import Ray and MLflow: load them only when used.
    if name == "run_workflow":
        from workflows.engine import run_workflow  # noqa: PLC0415

        return run_workflow
    if name == "release_warm_actors":
        from actors.pool import shared_pools  # noqa: PLC0415

        return shared_pools.release_all
    if name == "MLflowHook":
        from workflows.lineage import MLflowHook  # noqa: PLC0415

        return MLflowHook
    raise AttributeError(name)
