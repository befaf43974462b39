"""tierflow workflows: declare stages with resources, wire them by parameter name, run on Ray."""

from actors.context import StageContext
from actors.resources import Resources
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

__all__ = [
    "GateFailed",
    "Resources",
    "Stage",
    "StageContext",
    "StageFailedError",
    "Tensors",
    "TierflowError",
    "UnsatisfiableResourcesError",
    "ValidationError",
    "Workflow",
    "WorkflowDefinitionError",
    "WorkflowLoadError",
    "stage",
]
