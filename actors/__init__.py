"""Ray actors that execute stages, and the one translation of resource requests into Ray options."""

from actors.context import StageContext
from actors.errors import ActorsError, ResourceSpecError, StageExecutionError
from actors.placement import NodeInfo, PlacementDecision, decide, nodes_from_cluster_yaml, ray_options
from actors.resources import Resources, parse_memory

__all__ = [
    "ActorsError",
    "NodeInfo",
    "PlacementDecision",
    "ResourceSpecError",
    "Resources",
    "StageContext",
    "StageExecutionError",
    "decide",
    "nodes_from_cluster_yaml",
    "parse_memory",
    "ray_options",
]
