"""A stage never joins a Ray instance the user did not name (a `ray start --head` left running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN, project_env

pytestmark = pytest.mark.slow

PROBE = """
import ray
from components.config import RayConfig
from pipelines.ray_start import init_ray
init_ray(RayConfig(num_cpus=1))
print("JOINED", ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def test_a_stage_starts_its_own_instance_beside_a_users_ray_start(tmp_path, free_port):
    # The user's own head node (3 CPUs, so it is told apart), in its own process group: stopped by
    # signal at the end, never with `ray stop` (host-wide).
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port}",
            "--num-cpus=3",
            "--include-dashboard=false",
        ],
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        ready = False
        while time.time() < deadline and not ready:
            line = head.stdout.readline()
            ready = "Ray runtime started" in line or "--block" in line
            assert head.poll() is None, "ray start --head exited"
        assert ready, "ray start --head did not come up"
        probe = subprocess.run(
            [sys.executable, "-c", PROBE], env=project_env(), capture_output=True, text=True, timeout=300
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        address, cpus = probe.stdout.split("JOINED", 1)[1].split()
        assert not address.endswith(f":{free_port}") and float(cpus) == 1.0
        assert "Traceback" not in probe.stderr
        assert "Connecting to existing Ray cluster" not in probe.stderr + probe.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
