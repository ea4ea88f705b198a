"""`ray job submit` (through deploy/submit.sh) against a `ray start --head` cluster on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_port(port, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start --head exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError(f"the Ray dashboard did not open port {port} within {timeout}s")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_a_short_training_job(tiny_model_dir, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           # keeps every Ray listener on 127.0.0.1
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = _free_ports(2)
    ray = str(bin_dir / "ray")
    # --block keeps the head in the foreground: stopping that one process group stops exactly this cluster
    # (`ray stop` would stop every Ray cluster of the user on the machine).
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=4",
                             "--object-store-memory=300000000", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out_dir = tmp_path / "job-out"
    try:
        _wait_for_port(dash_port, head)
        job = subprocess.run(
            ["bash", str(ROOT / "deploy" / "submit.sh"), "--address", f"http://127.0.0.1:{dash_port}",
             "configs/tiny.yaml", "--set", f"model.name_or_path={tiny_model_dir}",  # several pairs after one flag
             f"run.output_dir={out_dir}", "--set", "learner.max_steps=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "reward_mean" in r] == [1]
        assert json.loads((out_dir / "eval_test.json").read_text())["num_samples"] == 8
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
