"""`tierflow plan ... --plot FILE`: the simulated configurations as a PNG, makespan against cost.

Matplotlib is optional (`pip install 'tierflow[plot]'`) and imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from workflows.errors import ValidationError
from workflows.plan_cli import Candidate


def plot_front(cands: list[Candidate], chosen: Candidate | None, path: Path, deadline_s: float | None) -> None:
    """Every feasible candidate (grey), the Pareto front (coloured by energy), the choice and the deadline."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")  # files only: no display on a server
        from matplotlib import pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ValidationError(f"--plot needs matplotlib ({exc}); install it: pip install 'tierflow[plot]'") from None
    feasible = [c for c in cands if c.prediction is not None]
    if not feasible:
        raise ValidationError("--plot: no configuration could be simulated, so there is nothing to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    rest = [c.prediction for c in feasible if not c.pareto]
    ax.scatter([p.makespan_s for p in rest], [p.cost_usd for p in rest], c="0.75", s=14, label="simulated")  # type: ignore[union-attr]
    front = sorted((c for c in feasible if c.pareto), key=lambda c: c.prediction.makespan_s)  # type: ignore[union-attr]
    xs = [c.prediction.makespan_s for c in front]  # type: ignore[union-attr]
    ys = [c.prediction.cost_usd for c in front]  # type: ignore[union-attr]
    dots = ax.scatter(xs, ys, c=[c.prediction.energy_j for c in front], cmap="viridis", s=36, label="Pareto front")  # type: ignore[union-attr]
    fig.colorbar(dots, ax=ax, label="energy (J)")
    for c, x, y in zip(front, xs, ys, strict=True):
        ax.annotate(c.label(), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if chosen is not None and chosen.prediction is not None:
        ax.scatter([chosen.prediction.makespan_s], [chosen.prediction.cost_usd], s=160, facecolors="none",
                   edgecolors="red", linewidths=1.5, label=f"choice: {chosen.label()}")  # fmt: skip
    if deadline_s is not None:
        ax.axvline(deadline_s, color="red", linestyle="--", linewidth=1, label=f"deadline {deadline_s:g} s")
    ax.set_xlabel("predicted makespan (s)")
    ax.set_ylabel("predicted cost (USD)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ValidationError(f"--plot {path}: cannot write it ({exc})") from None
    finally:
        plt.close(fig)
