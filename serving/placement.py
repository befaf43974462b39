"""Where Serve replicas go: placed like stages (as declared if a node fits, else the CPU fallback, else refused).

Its own module: the rollout and the Serve config builder (`serving.rollout.build_app`, for `serve run`)
place replicas by the same rule without importing the app modules.
"""

from __future__ import annotations

from typing import Any

from actors.placement import NodeInfo, decide, ray_options
from actors.ray_api import cluster_nodes
from serving.config import RolloutRefused, ServeConfig


def replica_options(config: ServeConfig, nodes: list[NodeInfo] | None = None) -> dict[str, Any]:
    """Ray actor options for the app's replicas, decided against `nodes` (default: the connected cluster)."""
    decision = decide(f"{config.app_name} replica", config.resources(), cluster_nodes() if nodes is None else nodes)
    if not decision.feasible:
        raise RolloutRefused(decision.reason)
    opts = ray_options(decision.effective)  # type: ignore[arg-type]
    return {k: v for k, v in opts.items() if v or k == "num_cpus"}
