"""A worker group's failure as the driver reports it: one line, the first failing rank's error.

That line reaching the console as the stage's one error line, with exit 1 and no model, is
tests/pipelines/test_failing_worker.py's subject (a real failing worker through `genpipe`).
"""

from __future__ import annotations

import ray.train

from components.training.ray_adapter import _failure_line


def test_the_first_failing_rank_and_the_first_line_of_its_error():
    err = ray.train.WorkerGroupError(
        "[Rank 1 Error Snippet]: ...", {3: OSError("disk full"), 1: ValueError("bad label 99\nmore detail")}
    )
    assert _failure_line(err) == "worker rank 1 (of 2 failing) failed: ValueError: bad label 99"
    one = ray.train.WorkerGroupError("...", {0: KeyError("image")})
    assert _failure_line(one) == "worker rank 0 failed: KeyError: 'image'"
    assert _failure_line(ray.train.WorkerGroupError("lost\nworker 2 died", {})) == "worker 2 died"
