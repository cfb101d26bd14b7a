"""The shared training-stage driver: argument checks that fail before Ray or MLflow start."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.training import train_on_ray


def test_unknown_reader_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown reader 'pixels'; valid: images, tokens"):
        train_on_ray(
            stage="train_prior",
            sections={},
            run=None,
            task_factory=None,
            loop=None,
            data_dir=Path("data/tokens"),
            run_name="unused",
            reader="pixels",
        )
