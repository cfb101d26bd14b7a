"""MLflow tracking: the metric sink rank 0 writes through, and run helpers for stage drivers.

The sink logs into the driver's run by id. It records each global step once: `last_step()` reads
back the highest step already logged, so steps replayed after a resume are not logged twice.
"""

from __future__ import annotations

import math
import time

from mlflow import MlflowClient
from mlflow.entities import Metric

STEP_KEY = "train/step"  # logged with every batch of metrics; its history is the set of logged steps


class MlflowSink:
    """Metric sink over one MLflow run (picklable: the client is made lazily on the worker)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: MlflowClient | None = None
        self._last: int | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def last_step(self) -> int:
        """Highest step already logged into this run, -1 when none."""
        if self._last is None:
            history = self.client.get_metric_history(self.run_id, STEP_KEY)
            self._last = max((int(m.step) for m in history), default=-1)
        return self._last

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log finite metrics at `step`, unless that step was logged already."""
        if step <= self.last_step():
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        batch.append(Metric(STEP_KEY, float(step), now, step))
        for i in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        self._last = step

    def log_image(self, image, artifact_file: str) -> None:
        """Log an image (uint8 HxWxC numpy or PIL) as a run artifact."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def close(self) -> None:
        self._client = None


class MlflowSampleSink:
    """Progress sample grids from rank 0 into the run as `samples/<stage>-step-NNNNNN.png`."""

    def __init__(self, tracking_uri: str, run_id: str, stage: str) -> None:
        self.sink = MlflowSink(tracking_uri, run_id)
        self.stage = stage

    def __call__(self, images, *, step: int) -> None:
        from components.evaluation.grid import make_grid

        grid = make_grid(images.detach().float().cpu(), nrow=8)
        self.sink.log_image(grid, f"samples/{self.stage}-step-{step:06d}.png")
