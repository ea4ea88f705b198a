"""study/warmup_sweep.py: the grid is every combination of the --vary values, and one point runs real warm-up steps
on the tiny model and reports a paired before/after difference that matches its own before and after values."""

import json
import subprocess
import sys

import pytest

from r2ec.testing import write_tiny_dataset
from study.warmup_sweep import points


def test_points_are_the_cartesian_product_of_the_varied_values():
    assert points([]) == [[]]
    assert points(["warmup.lr=1e-3,2e-3", "model.tau=0.1"]) == [["warmup.lr=1e-3", "model.tau=0.1"],
                                                                 ["warmup.lr=2e-3", "model.tau=0.1"]]
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        points(["warmup.lr"])


def test_a_sweep_runs_its_points_and_pairs_before_with_after(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("R2EC_CACHE", str(tmp_path / "cache"))
    write_tiny_dataset(tmp_path)
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir), "center_items": True, "item_table": "frozen"},
        "data": {"source": "files", "files": {"interactions": str(tmp_path / "inter.csv"),
                                               "items": str(tmp_path / "items.csv")},
                 "prompt": {"category": "movies", "item_singular": "movie"}},
        "warmup": {"prompts_per_step": 4, "item_negatives": "catalogue"},
        "learner": {"prompts_per_step": 4, "micro_batch_size": 4},
        "eval": {"batch_size": 4, "valid_max_samples": 5},
        "run": {"output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "sweep.json"
    subprocess.run([sys.executable, "-m", "study.warmup_sweep", "--config", str(tmp_path / "cfg.json"), "--steps",
                    "3", "--valid-every", "2", "--vary", "warmup.lr=1e-2,1e-1", "--out", str(out)], check=True, timeout=600)
    result = json.loads(out.read_text())
    assert [p["lr"] for p in result["points"]] == [1e-2, 1e-1]
    for p in result["points"]:
        assert p["valid_samples"] == 5 and len(p["log"]) == 3 and p["center_items"]
        assert [r["step"] for r in p["log"] if "valid_ndcg@10" in r] == [2]  # the last step's is ndcg@10_after
        assert 1 <= p["distinct_chains_before"] <= 5 and 1 <= p["distinct_chains_after"] <= 5
        d = p["differences"]["ndcg@10"]
        assert d["mean"] == pytest.approx(p["ndcg@10_after"] - p["ndcg@10_before"])
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # both points start from the same weights and table: the same ranks before the first step
    assert result["points"][0]["ndcg@10_before"] == result["points"][1]["ndcg@10_before"]
    assert result["points"][0]["log"][0]["loss_item"] == result["points"][1]["log"][0]["loss_item"]
    assert result["points"][0]["distinct_chains_before"] == result["points"][1]["distinct_chains_before"]
