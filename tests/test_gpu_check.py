"""The GPU check script a session lent a GPU machine runs, smoke-run on the CPU so it cannot rot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.gpu_check import main

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_resume_is_exact(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = main(["--device", "cpu", "--quick", "--params", str(ROOT / "params.yaml"), "--out", str(out)])
    assert json.loads(out.read_text()) == report
    for part in ("evaluator", "evaluator_batch_1024", "tokenizer", "evaluator_cpu", "tokenizer_cpu"):
        assert report[part]["images_per_s"] > 0 and math.isfinite(report[part]["wall_s"]), part
    assert 0 < report["tokenizer"]["codebook_usage"] <= 1 and report["tokenizer"]["psnr"] > 0
    assert 0 <= report["evaluator"]["test_accuracy"] <= 1
    # A run killed after its first checkpoint and resumed ends on the weights of the straight run.
    assert report["resume"]["resumed_at"] == report["resume"]["steps"] // 2
    assert report["resume"]["max_abs_diff"] == 0.0
