"""Workflow model and validation: no Ray needed. One test per validation error."""

import pytest

from actors.streaming import StreamError
from workflows import Stage, Stream, Workflow, WorkflowDefinitionError, stage


@stage
def load() -> dict:
    return {"rows": 3}


@stage(cpus=2)
def clean(load: dict, factor: int = 2) -> dict:
    return {"rows": load["rows"] * factor}


@stage(gpus=1, fallback="cpu", inputs={"data": "clean"})
def fit(data: dict, ctx=None, lr: float = 0.1) -> dict:
    return data


def test_edges_come_from_parameter_names_and_explicit_inputs():
    wf = Workflow("ok", [fit, clean, load])
    assert wf.order == ["load", "clean", "fit"]
    assert {(e.upstream, e.downstream, e.param) for e in wf.edges} == {
        ("load", "clean", "load"),
        ("clean", "fit", "data"),
    }
    assert wf.param_names["clean"].keys() == {"factor"}
    assert fit.wants_context and "ctx" not in fit.parameters


def test_stage_is_still_a_plain_function():
    assert clean({"rows": 2}, factor=3) == {"rows": 6}


def test_resources_are_parsed_and_normalised():
    s = stage(cpus=0.5, gpus=0.25, memory="512MiB", accelerator_type="A100", resources={"tpu_slot": 1})(load.fn)
    r = s.resources
    assert (r.cpus, r.gpus, r.memory_bytes, r.accelerator_type, r.custom) == (
        0.5,
        0.25,
        512 * 2**20,
        "A100",
        {"tpu_slot": 1.0},
    )
    assert r.as_ray_resources() == {
        "CPU": 0.5,
        "GPU": 0.25,
        "memory": float(512 * 2**20),
        "accelerator_type:A100": 0.001,
        "tpu_slot": 1.0,
    }


def test_class_stages_are_called_through_an_instance():
    class Scale:
        def __init__(self):
            self.k = 10

        def __call__(self, load: dict) -> dict:
            return {"rows": load["rows"] * self.k}

    s = Stage("scale", Scale)
    wf = Workflow("cls", [load, s])
    assert [e.param for e in wf.upstream("scale")] == ["load"]
    assert s({"rows": 1}) == {"rows": 10}


def test_cycle_is_rejected_with_its_path():
    @stage
    def a(b: dict) -> dict:
        return b

    @stage
    def b(a: dict) -> dict:
        return a

    with pytest.raises(WorkflowDefinitionError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        Workflow("loop", [a, b])


def test_unknown_explicit_input_names_the_stages():
    @stage(inputs={"x": "nope"})
    def use(x: dict) -> dict:
        return x

    with pytest.raises(WorkflowDefinitionError, match=r"unknown stage 'nope'.*\['load', 'use'\]"):
        Workflow("w", [load, use])


def test_inputs_must_name_a_parameter():
    with pytest.raises(WorkflowDefinitionError, match="no such parameter"):
        stage(inputs={"missing": "load"})(clean.fn)


def test_missing_input_says_how_to_fix_it():
    @stage
    def needs(features: dict) -> dict:
        return features

    wf = Workflow("w", [load, needs])
    with pytest.raises(WorkflowDefinitionError, match=r"needs 'features'.*--param needs.features=VALUE"):
        wf.resolve_params({})
    assert wf.resolve_params({"needs.features": {"a": 1}})["needs"] == {"features": {"a": 1}}


def test_unknown_parameter_override_is_an_error():
    wf = Workflow("w", [load, clean])
    with pytest.raises(WorkflowDefinitionError, match=r"'clen.factor' matches no stage parameter.*clean.factor"):
        wf.resolve_params({"clen.factor": 3})


def test_bare_parameter_applies_to_every_stage_that_has_it():
    wf = Workflow("w", [load, clean])
    assert wf.resolve_params({"factor": 5})["clean"] == {"factor": 5}


def test_duplicate_stage_names():
    other = stage(name="load")(clean.fn)
    with pytest.raises(WorkflowDefinitionError, match="duplicate stage name 'load'"):
        Workflow("w", [load, other])


def test_empty_workflow_and_non_stage_members():
    with pytest.raises(WorkflowDefinitionError, match="has no stages"):
        Workflow("w", [])
    with pytest.raises(WorkflowDefinitionError, match="decorate it with @stage"):
        Workflow("w", [load, lambda: 1])


def test_bad_names():
    with pytest.raises(WorkflowDefinitionError, match="workflow name"):
        Workflow("../etc", [load])
    with pytest.raises(WorkflowDefinitionError, match="stage name"):
        stage(name="a b")(load.fn)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": 0}, "cpus=0 must be positive"),
        ({"cpus": -1}, "cpus=-1 must be positive"),
        ({"cpus": "two"}, "cpus='two' must be a finite number"),
        ({"cpus": float("nan")}, "must be a finite number"),
        ({"cpus": True}, "must be a finite number"),
        ({"gpus": -0.5}, "gpus=-0.5 must be zero or more"),
        ({"gpus": 1.5}, "fractions are allowed below 1 only"),
        ({"memory": "lots"}, "is not a size"),
        ({"memory": "2 parsecs"}, "unknown unit"),
        ({"memory": 0}, "must be positive"),
        ({"accelerator_type": "A100"}, "needs gpus > 0"),
        ({"gpus": 1, "accelerator_type": ""}, "must be a name"),
        ({"fallback": "cpu"}, "only makes sense for a stage that asks for gpus"),
        ({"gpus": 1, "fallback": "tpu"}, "the supported fallback is 'cpu'"),
        ({"resources": {"GPU": 1}}, "use cpus=, gpus= and memory="),
        ({"resources": {"slot": 0}}, r"resources\['slot'\]=0 must be positive"),
    ],
)
def test_malformed_resources_name_the_problem(kwargs, message):
    with pytest.raises(WorkflowDefinitionError, match=message) as info:
        stage(**kwargs)(load.fn)
    assert "stage 'load'" in str(info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: stage(name="s", stream=Stream(shards=4))(lambda n=1: n), "must take a 'shard' parameter"),
        (lambda: stage(name="s", stream=Stream(shards=4))(lambda shard, ctx: shard), "gets no ctx"),
        (lambda: stage(name="s", stream=Stream(shards="count"))(lambda shard, n=2: shard), "names no parameter"),
        (lambda: stage(name="s", stream=Stream(shards=0))(lambda shard: shard), "at least 1"),
        (
            lambda: stage(name="s", stream=Stream(shards=2, min_workers=3, max_workers=2))(lambda shard: shard),
            "min_workers",
        ),
        (lambda: stage(name="s", stream=Stream(shards=2, buffer="lots"))(lambda shard: shard), "lots"),
        (
            lambda: stage(name="s", stream=Stream(shards=2), gate=True)(lambda shard: shard),
            "cannot register a model or be a gate",
        ),
    ],
)
def test_streaming_stage_declarations_are_checked(make, message):
    with pytest.raises((WorkflowDefinitionError, StreamError), match=message):
        make()


def test_a_streaming_stage_takes_shard_from_the_pool_not_from_params():
    @stage(stream=Stream(shards="n"))
    def rows(shard: int, n: int = 3) -> dict:
        return {"x": [shard]}

    @stage
    def total(rows) -> int:
        return 0

    wf = Workflow("s", [rows, total])
    assert wf.resolve_params() == {"rows": {"n": 3}, "total": {}}
