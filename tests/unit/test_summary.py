"""The parent run's MLflow description stays under MLflow's 8,000-character limit for large runs."""

from types import SimpleNamespace

from workflows.summary import MARKDOWN_ROWS, markdown


def test_a_large_run_is_described_by_counts_not_a_row_per_stage():
    records = {f"s{i}": SimpleNamespace(status="succeeded" if i else "failed") for i in range(10_000)}
    run = SimpleNamespace(
        run_id="r1", workflow=SimpleNamespace(name="wide"), status="failed", ended_at=2.0, duration_s=2.0,
        records=records,
    )  # fmt: skip
    text = markdown(run)
    assert len(records) > MARKDOWN_ROWS and len(text) < 8000
    assert "10000 stages: 1 failed, 9999 succeeded" in text and "`wide`" in text
