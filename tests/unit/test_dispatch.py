"""The driver's call bookkeeping: which stages count as short, who may queue behind whom, who was orphaned."""

from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.dispatch import PIPELINE_MAX_S, SHORT_MAX_BYTES, ActorCalls


def train(): ...


def score(): ...


FNS = {"train": train, "score": score}


def fn_of(name: str):
    return FNS[name.split("-", maxsplit=1)[0]]


def test_a_function_is_short_only_once_a_small_fast_stage_of_it_finished():
    calls = ActorCalls()
    assert calls.short(train) is None  # unknown: never queued behind, never batched
    calls.finished("a1", train, 0.002, 100)
    assert calls.short(train) == 0.002 and calls.short(score) is None
    calls.finished("a1", train, PIPELINE_MAX_S, 100)
    assert calls.short(train) is None  # the last stage decides: this one was long
    calls.finished("a1", train, 0.001, SHORT_MAX_BYTES + 1)
    assert calls.short(train) is None  # fast, but its output takes time to write


def test_a_stage_queues_only_behind_short_stages():
    calls = ActorCalls()
    calls.finished("a1", score, 0.001, 10)
    calls.submitted("a1", "score-1")
    assert calls.may_queue_behind("a1", fn_of)
    calls.submitted("a1", "train-1")  # train's time is unknown
    assert not calls.may_queue_behind("a1", fn_of)
    assert calls.may_queue_behind("a2", fn_of)  # nothing runs there


def test_only_the_stages_behind_a_failed_one_are_orphaned_and_once():
    calls = ActorCalls()
    for name in ("score-1", "score-2", "score-3"):
        calls.submitted("a1", name)
    calls.submitted("a2", "score-9")
    assert calls.returned("a1", ["score-1"]) == set()
    calls.ended("a1", "score-2")  # its worker died running score-2
    assert calls.returned("a1", ["score-2"]) == set()
    assert calls.returned("a1", ["score-3"]) == {"score-3"}  # it only waited behind score-2
    assert calls.returned("a1", ["score-3"]) == set()
    assert calls.running == {"a2": ["score-9"]}


@settings(max_examples=50, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a1", "a2"]), st.integers(0, 20)), max_size=40))
def test_running_lists_what_was_submitted_and_not_returned(ops):
    calls, expect = ActorCalls(), {}
    for actor, i in ops:
        name = f"score-{i}"
        if name in expect.get(actor, []):
            calls.returned(actor, [name])
            expect[actor].remove(name)
        else:
            calls.submitted(actor, name)
            expect.setdefault(actor, []).append(name)
    assert calls.running == {a: names for a, names in expect.items() if names}
