"""Retry and timeout decisions are pure: tested without Ray."""

import pytest

from workflows import WorkflowDefinitionError, stage
from workflows.retry import INFRA, TIMEOUT, USER, RetryPolicy, exception_types


class Flaky(OSError):
    pass


def test_infrastructure_failures_are_retried_with_exponential_backoff():
    p = RetryPolicy.build(retries=3, backoff_s=0.5)
    decisions = [p.decide(n, INFRA) for n in (1, 2, 3, 4)]
    assert [d.retry for d in decisions] == [True, True, True, False]
    assert [d.delay_s for d in decisions[:3]] == [0.5, 1.0, 2.0]
    assert decisions[3].reason == "failed after 4 attempts"


def test_backoff_is_capped():
    assert RetryPolicy.build(retries=20, backoff_s=10).delay(10) == 60.0


def test_user_exceptions_retry_only_when_opted_in_by_type_including_subclasses():
    p = RetryPolicy.build(retries=2, retry_on=(OSError,))
    assert p.decide(1, USER, exception_types(Flaky("x"))).retry
    no = p.decide(1, USER, exception_types(KeyError("x")))
    assert not no.retry and "retry_on" in no.reason


def test_timeouts_are_user_level_failures():
    assert not RetryPolicy.build(retries=2).decide(1, TIMEOUT, ("builtins.TimeoutError",)).retry
    assert RetryPolicy.build(retries=2, retry_on=TimeoutError).decide(1, TIMEOUT, ("builtins.TimeoutError",)).retry


def test_zero_retries_means_one_attempt():
    assert not RetryPolicy.build(retries=0).decide(1, INFRA).retry


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries=-1 must be a whole number"),
        ({"retries": 1.5}, "retries=1.5 must be a whole number"),
        ({"retry_on": ("OSError",)}, "retry_on must hold exception classes"),
        ({"timeout_s": 0}, "timeout_s=0 must be a positive number"),
        ({"retry_backoff_s": -1}, "retry_backoff_s=-1 must be >= 0"),
    ],
)
def test_bad_retry_settings_are_definition_errors(kwargs, message):
    with pytest.raises(WorkflowDefinitionError, match=message):

        @stage(**kwargs)
        def s() -> dict:
            return {}
