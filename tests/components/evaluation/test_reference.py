"""The real-data reference: saved and loaded whole, the floor defined once, a missing file named."""

from __future__ import annotations

import pytest
import torch

from components.evaluation.evaluator import Evaluator, EvaluatorConfig
from components.evaluation.frechet import frechet_distance
from components.evaluation.reference import TRAIN_STATS, compute_reference, load_reference, save_reference


def test_reference_round_trips_and_its_floor_is_fd_train_test(tmp_path):
    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=10).eval()
    train, test = torch.rand(64, 1, 8, 8) * 2 - 1, torch.rand(48, 1, 8, 8) * 2 - 1
    reference = compute_reference(net, train=train, test=test)
    save_reference(reference, tmp_path)
    loaded = load_reference(tmp_path)
    torch.testing.assert_close(loaded.test.mu, reference.test.mu)
    torch.testing.assert_close(loaded.train.sigma, reference.train.sigma)
    assert loaded.floor == pytest.approx(frechet_distance(reference.train, reference.test))
    assert loaded.floor > 0  # two different random sets


def test_a_missing_statistics_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_reference(tmp_path)
    message = str(err.value)
    assert "\n" not in message and TRAIN_STATS in message and "train_evaluator" in message
