"""What a stage prints: no rate where nothing was timed.

A machine's first run printing nothing of Ray's or MLflow's set-up is checked on a real stage in
tests/pipelines/test_failing_worker.py; a failed attempt's training booked as training, with real
sinks over a real store, in tests/pipelines/test_runtime.py.
"""

from __future__ import annotations

from components.training.reporting import progress_line


def test_a_validation_only_progress_line_has_no_rate_and_no_eta():
    assert progress_line({"val/loss": 0.25}, done=50, steps=200) == "step 50/200 | val/loss 0.25"
    timed = {"perf/steps_per_s": 2.0, "perf/samples_per_s": 64.0, "train/loss": 0.5}
    assert progress_line(timed, done=50, steps=200) == (
        "step 50/200 | 2.00 it/s | 64 samples/s | ETA 75s | train/loss 0.5"
    )
    assert progress_line({}, done=1, steps=2) == "step 1/2"
