"""The benchmark scripts run end to end (their ``--quick`` smoke sizes) and write the JSON record they promise.

Only the scripts that need no bench-only dependency and finish in well under a minute run here; every script's
default run is ``make bench`` (docs/performance.md). Their numbers are never asserted on: timings belong in the
benchmark output, not in tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--out-dir", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = script.removesuffix(".py")
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["rows"] and record["machine"]["cores"] and record["command"].startswith("python bench/")
    return record


@pytest.mark.slow
def test_rec_head_scoring_quick(tmp_path):
    rows = _run("rec_head_scoring.py", tmp_path)["rows"]
    assert {"items", "users", "total_s", "frac_of_matmul"} <= set(rows[0])
    assert all(r["total_s"] > 0 and r["plain_matmul_gflops"] > 0 for r in rows)


@pytest.mark.slow
def test_chain_logits_quick(tmp_path):
    record = _run("chain_logits.py", tmp_path)
    assert [r["variant"] for r in record["rows"]] == ["all_positions", "chain_only"]
    assert record["settings"]["max_abs_logp_diff"] < 1e-4  # chain-only logits give the same log-probs
    assert all(r["fwd_bwd_s"] > 0 for r in record["rows"])


@pytest.mark.slow
def test_packing_quick(tmp_path):
    record = _run("packing.py", tmp_path, "--sides", "unpacked,packed,unfused")
    assert {"unpacked_train_s", "unfused_train_s", "packed_train_s", "ratio", "fusion_ratio", "ratio_vs_unfused",
            "measured_steps"} <= set(record)
    measured = [r for r in record["rows"] if not r["warmup"]]
    assert sorted(r["side"] for r in measured) == ["packed", "unfused", "unpacked"]
    assert all(r["train_s"] > 0 for r in measured)
    assert [(r["packed"], r["fused"]) for r in sorted(measured, key=lambda r: r["side"])] == [
        (True, True), (False, False), (False, True)]
    # the packed step's forwards hold each prompt once, the unpacked one's G times
    assert all(r["forward_tokens"] == r["prompt_tokens"] + r["chain_tokens"] for r in measured if r["packed"])
    assert all(r["forward_tokens"] == 4 * r["prompt_tokens"] + r["chain_tokens"] for r in measured if not r["packed"])


@pytest.mark.slow
def test_item_encoding_quick(tmp_path):
    record = _run("item_encoding.py", tmp_path)
    rows = record["rows"]
    assert [(r["part"], r["packed"]) for r in rows] == [("table", False), ("table", True), ("learner", False),
                                                        ("learner", True)]
    assert record["shared_prefix_tokens"] == 20 and record["peak_gflops"]["1"] > 0
    # the in-process table: the same rows packed as unpacked
    assert rows[1]["max_abs_diff"] < 1e-4 and rows[0]["items"] == rows[1]["items"] > 0
    unpacked, packed = rows[2:]
    # the packed step computes the shared prefix once per row; both give the same encodings and gradients
    assert packed["forward_tokens"] < unpacked["forward_tokens"]
    assert packed["max_abs_diff"] < 1e-4 and packed["grad_max_rel_diff"] < 1e-3
    assert 0 < packed["of_bound"] and packed["bound_items_per_s"] > 0


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    """bench/gpu_check.py --device cpu --quick: every phase passes (the learner resumes exactly, the alarms stay at
    float32 levels, the perf phase measures something)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert list(record["phases"]) == ["env", "checksum", "learner", "rl_step", "perf"]
    assert all(p["status"] == "PASS" for p in record["phases"].values())
    names = {r["name"] for p in record["phases"].values() for r in p["rows"]}
    assert {"checksum.bfloat16", "learner.zero2.resume_weight_diff", "rl_step.alarm_h_T_max_diff",
            "perf.learner_fwd_bwd.chain_only", "perf.rec_head.items10000", "rl_step.colocated.alarm_h_T_max_diff",
            "rl_step.colocated.weight_version", "perf.weight_handoff.shm_file.checksum_equal"} <= names


@pytest.mark.slow
def test_weight_sync_quick(tmp_path):
    record = _run("weight_sync.py", tmp_path, "--no-vllm")
    rows = record["rows"]
    assert {r["receivers"] for r in rows} == {1, 2}
    assert {r["case"] for r in rows} == {"full", "lora-merged", "lora-delta"}
    assert all(r["gb"] > 0 and r["seconds"] > 0 for r in rows)
    assert record["pair"] == "hf, 1 receiver" and 0 < record["lora_delta_bytes"] < record["full_bytes"]
    assert record["full_s"] > 0 and record["lora_delta_s"] > 0
    floor = record["lora_delta_floor"]  # the receiver's merge (and vLLM's repack) alone, every LoRA target merged
    assert floor["merge_s"] > 0 and floor["merged_tensors"] > 0 and floor["floor_s"] >= floor["merge_s"]


@pytest.mark.slow
@pytest.mark.vllm
def test_engine_start_quick(tmp_path):
    pytest.importorskip("vllm")
    record = _run("engine_start.py", tmp_path)
    assert [r["mode"] for r in record["rows"]] == ["separate", "in_process"]
    assert all(r["start_s"] > 0 and r["chains"] == 8 for r in record["rows"])
