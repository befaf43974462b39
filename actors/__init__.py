"""Ray actors that execute stages, and the one translation of resource requests into Ray options."""

from actors.context import StageContext
from actors.errors import ActorsError, ResourceSpecError, StageExecutionError
from actors.placement import (
    NodeInfo,
    NodeType,
    PlacementDecision,
    cluster_from_yaml,
    decide,
    nodes_from_cluster_yaml,
    ray_options,
)
from actors.resources import Resources, parse_memory

_DDP = ("DDPConfig", "GangFailedError", "TrainResult", "TrainSpec", "train_data_parallel")


def __getattr__(name: str) -> object:
    """Data-parallel training (actors.ddp) is imported on first use: it pulls in Ray's scheduling API."""
    if name in _DDP:
        from actors import ddp  # noqa: PLC0415

        return getattr(ddp, name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")


__all__ = [
    "ActorsError",
    "DDPConfig",
    "GangFailedError",
    "NodeInfo",
    "NodeType",
    "PlacementDecision",
    "ResourceSpecError",
    "Resources",
    "StageContext",
    "StageExecutionError",
    "TrainResult",
    "TrainSpec",
    "cluster_from_yaml",
    "decide",
    "nodes_from_cluster_yaml",
    "parse_memory",
    "ray_options",
    "train_data_parallel",
]
