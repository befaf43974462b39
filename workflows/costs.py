"""Carbon and money: grams of CO2 from joules, dollars from node-type prices.

Prices are per node type (an instance type's hourly price) or per Ray resource (CPU, GPU, a custom
resource) per hour. A stage's cost is what it reserved times how long it held it; a planned cluster's
cost is every node's price for the whole makespan (nodes are billed whether busy or not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# AWS on-demand Linux list prices (us-west-2, USD/hour) for cluster.yaml's instance types and neighbours.
DEFAULT_INSTANCE_USD_PER_H: dict[str, float] = {
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "m5.8xlarge": 1.536,
    "c5.4xlarge": 0.68,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g4dn.xlarge": 0.526,
    "p3.2xlarge": 3.06,
}
# Derived from the table: an m5.4xlarge's price over its 16 vCPUs; a g5.xlarge minus its 4 vCPUs at that rate.
DEFAULT_RESOURCE_USD_PER_H: dict[str, float] = {"CPU": 0.048, "GPU": 0.814}
# Roughly the world average of grid electricity in recent years (Ember / IEA: ~440-480 g/kWh); set your region's.
DEFAULT_GRID_GCO2_PER_KWH = 450.0
J_PER_KWH = 3.6e6


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


@dataclass(frozen=True)
class CostConfig:
    """Grid carbon intensity and prices. Unknown instance types fall back to the per-resource prices."""

    grid_gco2_per_kwh: float = DEFAULT_GRID_GCO2_PER_KWH
    resource_usd_per_h: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCE_USD_PER_H))
    instance_usd_per_h: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INSTANCE_USD_PER_H))
    node_type_usd_per_h: dict[str, float] = field(default_factory=dict)  # cluster.yaml node type name -> price

    def __post_init__(self) -> None:
        _non_negative("grid_gco2_per_kwh", self.grid_gco2_per_kwh)
        for table in ("resource_usd_per_h", "instance_usd_per_h", "node_type_usd_per_h"):
            for key, value in getattr(self, table).items():
                _non_negative(f"{table}[{key!r}]", value)

    def node_price_usd_per_h(self, node_type: str, spec: Mapping[str, Any]) -> float:
        """A cluster.yaml node type's hourly price: configured for the type, else its InstanceType's list
        price, else its resources at the per-resource prices."""
        if node_type in self.node_type_usd_per_h:
            return self.node_type_usd_per_h[node_type]
        instance = str((spec.get("node_config") or {}).get("InstanceType", ""))
        if instance in self.instance_usd_per_h:
            return self.instance_usd_per_h[instance]
        return resources_usd_per_h(spec.get("resources") or {}, self)


def resources_usd_per_h(resources: Mapping[str, float], config: CostConfig) -> float:
    """What holding `resources` costs per hour at the per-resource prices (unpriced resources are free)."""
    return sum(float(v) * config.resource_usd_per_h.get(k, 0.0) for k, v in resources.items())


def stage_cost_usd(resources: Mapping[str, float], duration_s: float, config: CostConfig) -> float:
    return resources_usd_per_h(resources, config) * max(duration_s, 0.0) / 3600.0


def co2_g(energy_j: float, config: CostConfig) -> float:
    return energy_j / J_PER_KWH * config.grid_gco2_per_kwh


__all__ = [
    "DEFAULT_GRID_GCO2_PER_KWH",
    "DEFAULT_INSTANCE_USD_PER_H",
    "DEFAULT_RESOURCE_USD_PER_H",
    "CostConfig",
    "co2_g",
    "resources_usd_per_h",
    "stage_cost_usd",
]
