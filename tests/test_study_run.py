"""study/run.py: a finished method's result is kept without dataset text, a kept method is skipped, and the
warm-up + RecPO method starts from the warm-up run's checkpoints until it has its own."""

from __future__ import annotations

import json

from study.run import KEPT_SAMPLE_KEYS, Method, done, keep, methods


def _fake_eval(folder, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"eval_{split}.json").write_text(json.dumps({"split": split, "num_samples": 2, "ndcg@10": 0.5}))
    rows = [{"sample_id": i, "user_id": f"u{i}", "target_item_id": f"i{i}", "target_title": "A Movie (1995)",
             "target_rank": i + 1, "top10_item_ids": ["i1"], "top10_titles": ["A Movie (1995)"],
             "reasoning": "the user likes ...", "appended_marker": False} for i in range(2)]
    (folder / f"eval_{split}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "phase": "warmup", "loss_item": 1.0}) + "\n")


def test_keep_strips_dataset_text_and_marks_the_method_done(tmp_path):
    outputs, results = tmp_path / "outputs", tmp_path / "results"
    _fake_eval(outputs / "run")
    m = Method("run", "A run", ["true"], {"eval_test.json": "run/eval_test.json"}, training=True)
    assert not done(m, results)
    dest = keep(m, outputs, results)
    assert done(m, results) and json.loads((dest / "eval_test.json").read_text())["ndcg@10"] == 0.5
    kept = [json.loads(line) for line in (dest / "eval_test_samples.jsonl").read_text().splitlines()]
    assert len(kept) == 2 and all(set(r) <= set(KEPT_SAMPLE_KEYS) for r in kept)
    assert "title" not in (dest / "eval_test_samples.jsonl").read_text()
    assert "reasoning" not in (dest / "eval_test_samples.jsonl").read_text()
    assert (dest / "metrics.jsonl").is_file()  # the curves of a training method
    assert not list(results.glob(".*"))  # no staging folder left behind


def test_warmup_recpo_resumes_the_warmup_run_then_its_own(tmp_path):
    def command():
        return next(m for m in methods(tmp_path) if m.name == "warmup-recpo").command

    cmd = command()
    assert cmd[cmd.index("--resume") + 1] == str(tmp_path / "warmup" / "checkpoints")
    assert "warmup.steps=100" in cmd  # the warm-up run's phase boundary
    own = tmp_path / "warmup-recpo" / "checkpoints"
    own.mkdir(parents=True)
    (own / "latest").write_text("step-00000105\n")
    cmd = command()
    assert cmd[cmd.index("--resume") + 1] == "auto"


def test_report_diagnostics_count_steps_without_advantage_and_distinct_chains(tmp_path):
    from study.report import diagnostics

    run = tmp_path / "warmup-recpo"
    run.mkdir()
    records = [{"step": 0, "valid/ndcg@10": 0.01, "valid/reasoning_distinct_frac": 0.5},
               {"step": 1, "phase": "warmup", "loss_item": 9.0},  # a warm-up step has no advantages: not counted
               {"step": 2, "phase": "recpo", "adv_abs_mean": 0.0, "chains_distinct": 0.25},
               {"step": 3, "phase": "recpo", "adv_abs_mean": 0.004, "chains_distinct": 0.75},
               {"step": 4, "phase": "recpo", "adv_abs_mean": 0.7, "chains_distinct": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "eval_test.json").write_text(json.dumps({"reasoning_distinct_frac": 0.125}))
    d = diagnostics(tmp_path)["warmup-recpo"]
    assert (d["recpo_steps"], d["adv_zero_steps"], d["adv_below_0.005_steps"]) == (3, 1, 2)
    assert abs(d["chains_distinct_mean"] - 2 / 3) < 1e-12 and d["chains_distinct_min"] == 0.25
    assert d["valid"] == [{"step": 0, "ndcg@10": 0.01, "reasoning_distinct_frac": 0.5}]
    assert d["test_reasoning_distinct_frac"] == 0.125
    assert set(diagnostics(tmp_path)) == {"warmup-recpo"}  # runs without metrics are left out
