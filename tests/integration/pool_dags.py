"""Random workflows of random resource shapes, and what a sequential run of them computes.

Shared by the pool's property tests on one and two nodes. Stage functions are generated with real
parameter names (the edges), so the engine sees ordinary user stages; they are pickled by value.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from workflows import Workflow, stage

_MOD = 1_000_003


@dataclass(frozen=True)
class Shape:
    cpus: float
    gpus: float = 0.0
    memory: str | None = None

    def kwargs(self) -> dict:
        out: dict = {"cpus": self.cpus, "gpus": self.gpus}
        if self.memory:
            out["memory"] = self.memory
        return out


@dataclass(frozen=True)
class Dag:
    shapes: tuple[Shape, ...]
    parents: tuple[tuple[int, ...], ...]  # stage i's upstream stages, all < i

    def workflow(self, name: str) -> Workflow:
        stages = []
        for i, (shape, ups) in enumerate(zip(self.shapes, self.parents, strict=True)):
            args = ", ".join(f"s{j}" for j in ups)
            body = " + ".join(f"s{j}['v']" for j in ups) or "0"
            src = f"def s{i}({args}):\n    return {{'v': (({body}) * 31 + {i + 1}) % {_MOD}}}\n"
            scope: dict = {"__name__": "tierflow_random_dag"}  # not importable: cloudpickle ships it by value
            exec(src, scope)
            stages.append(stage(**shape.kwargs(), retries=0)(scope[f"s{i}"]))
        return Workflow(name, stages)

    def expected(self) -> dict[str, int]:
        """Each stage's output when the stages are called one after another in this process."""
        values: list[int] = []
        for i, ups in enumerate(self.parents):
            values.append((sum(values[j] for j in ups) * 31 + i + 1) % _MOD)
        return {f"s{i}": v for i, v in enumerate(values)}


def dags(shapes: st.SearchStrategy[Shape], max_stages: int = 7) -> st.SearchStrategy[Dag]:
    @st.composite
    def build(draw: st.DrawFn) -> Dag:
        n = draw(st.integers(min_value=1, max_value=max_stages))
        parents = tuple(
            tuple(sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(i, 3))))) if i else () for i in range(n)
        )
        return Dag(tuple(draw(shapes) for _ in range(n)), parents)

    return build()


def shapes(*, gpus: tuple[float, ...] = (0.0,), memory: tuple[str | None, ...] = (None,)) -> st.SearchStrategy[Shape]:
    return st.builds(
        Shape,
        cpus=st.sampled_from((0.25, 0.5, 1.0, 1.5, 2.0)),
        gpus=st.sampled_from(gpus),
        memory=st.sampled_from(memory),
    )
