"""The warm-up phase's driver side without Ray: step numbering, shards, the phase rule on resume, the metrics
record's ``phase`` field, and evaluation without reasoning (``eval.max_new_tokens: 0``) on the HF rollout engine and
in ``r2ec eval``. The runs themselves (real Ray, real learner) are in tests/test_train_ray.py and
tests/test_resume.py."""

import json
from pathlib import Path

import pytest
import torch

from driver.run_state import check_phase, phase_of
from driver.steps import make_warmup_shards, recpo_steps, total_steps
from r2ec.checkpoint import CheckpointError
from r2ec.config import ModelConfig, RolloutConfig, load_config

MINIMAL = {
    "model": {"name_or_path": "some/model"},
    "data": {"source": "movielens100k", "prompt": {"category": "movies", "item_singular": "movie"}},
}


def test_steps_are_numbered_warmup_first_and_max_steps_0_means_no_recpo():
    cfg = load_config(data=MINIMAL, overrides=["warmup.steps=3", "learner.max_steps=0"])
    assert recpo_steps(cfg, 1000) == 0 and total_steps(cfg, 1000) == 3  # not `epochs` passes: 0 is not None
    cfg = load_config(data=MINIMAL, overrides=["warmup.steps=3", "learner.max_steps=2"])
    assert total_steps(cfg, 1000) == 5
    assert [phase_of(s, 3) for s in range(1, 6)] == ["warmup"] * 3 + ["recpo"] * 2
    cfg = load_config(data=MINIMAL, overrides=["learner.epochs=2", "learner.prompts_per_step=12"])
    assert total_steps(cfg, 100) == 2 * (100 // 12)


def test_warmup_shards_hold_whole_users_with_the_global_count():
    seqs = [[1, 2, 9], [3, 9], [4, 5, 6, 9], [7, 9]]
    earlier, target = torch.tensor([[0, -1], [1, 2], [3, -1], [4, -1]]), torch.tensor([10, 11, 12, 13])
    updates = (torch.tensor([5]), torch.ones(1, 8))
    shards = make_warmup_shards(seqs, earlier, target, 2, updates)
    assert [s.seqs for s in shards] == [seqs[:2], seqs[2:]]
    assert [s.target_idx.tolist() for s in shards] == [[10, 11], [12, 13]]
    assert torch.equal(shards[1].history_idx, earlier[2:])
    assert all(s.num_users == 4 and s.table_updates_idx.tolist() == [5] for s in shards)


@pytest.mark.parametrize("saved, new, step, ok", [
    (2, 2, 1, True), (2, 2, 3, True),  # unchanged: always
    (2, 5, 2, True), (5, 2, 2, True),  # inside the warm-up both share
    (2, 5, 3, False),  # step 3 was a RecPO step, would be a warm-up step
    (5, 2, 3, False),  # step 3 was a warm-up step, would be RecPO
    (None, 0, 4, True), (None, 2, 4, False),  # checkpoints from before the warm-up: warmup_steps 0
])
def test_resume_refuses_a_changed_warmup_that_moves_finished_steps(saved, new, step, ok, tmp_path):
    cfg = load_config(data=MINIMAL, overrides=[f"warmup.steps={new}"])
    state = {"step": step} if saved is None else {"step": step, "warmup_steps": saved}
    if ok:
        check_phase(cfg, state, tmp_path)
        return
    with pytest.raises(CheckpointError) as e:
        check_phase(cfg, state, tmp_path)
    message = str(e.value)
    assert "\n" not in message and f"warmup.steps is {new} here but {saved or 0} in the checkpoint" in message


def test_metrics_writer_keeps_the_phase_and_tensorboard_skips_it(tmp_path):
    from driver.tracking import MetricsWriter

    with MetricsWriter(tmp_path) as m:
        m.log(1, {"phase": "warmup", "loss_item": 2.5})
        m.log(2, {"phase": "recpo", "loss_item": 2.0, "reward_mean": 0.1})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "recpo"] and records[0]["loss_item"] == 2.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "loss_item" in acc.Tags()["scalars"] and "phase" not in acc.Tags()["scalars"]


def _write_validation(folder: Path, ranks: list[int], step: int, ndcg10: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_valid.json").write_text(json.dumps({"split": "valid", "num_items": 50, "num_samples": len(ranks),
                                                        "step": step, "ndcg@10": ndcg10}))
    (folder / "eval_valid_samples.jsonl").write_text("".join(
        json.dumps({"sample_id": i, "user_id": f"u{i % 4}", "target_item_id": f"i{i}", "target_rank": r}) + "\n"
        for i, r in enumerate(ranks)))


def test_validation_gain_pairs_step_0_with_the_last_validation(tmp_path):
    from driver.loop import FIRST_VALID, validation_gain

    assert validation_gain(tmp_path, "ndcg@10") is None  # nothing validated
    _write_validation(tmp_path / FIRST_VALID, [20] * 8, 0, 0.0)  # nothing in the top 10 at step 0
    _write_validation(tmp_path, [20] * 8, 0, 0.0)
    assert validation_gain(tmp_path, "ndcg@10") is None  # no validation after step 0's
    _write_validation(tmp_path, [1] * 8, 7, 1.0)  # every target first at the end: +1 on every user
    line = validation_gain(tmp_path, "ndcg@10")
    assert line.startswith("valid ndcg@10: 0.0000 at step 0 -> 1.0000 at step 7; difference +1.0000, paired")
    assert "[+1.0000, +1.0000]" in line and f"r2ec compare {tmp_path / FIRST_VALID} {tmp_path}" in line
    _write_validation(tmp_path, [1] * 6, 7, 1.0)  # the last validation ranked other samples: said, not compared
    assert "no paired interval: not computed on the same samples" in validation_gain(tmp_path, "ndcg@10")


def test_greedy_without_reasoning_is_the_marker_alone(tiny_model_dir, tiny_model, monkeypatch):
    from r2ec.prompts import PromptBuilder, render_user
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(ModelConfig(name_or_path=str(tiny_model_dir)), RolloutConfig(engine="hf", batch_size=2),
                           seed=0)
    monkeypatch.setattr(worker.engine, "sample", lambda *a, **k: pytest.fail("max_new_tokens 0 generated"))
    b = PromptBuilder("movies", "movie")
    titles = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"]
    prompts = [render_user(tiny_model.tokenizer, b.user_messages(titles[:i + 1], [4.0] * (i + 1), [0] * (i + 1),
                                                                 3600)) for i in range(3)]
    chains, h_T = worker.greedy(prompts, max_new_tokens=0)
    marker = tiny_model.marker_ids
    assert [c.token_ids for c in chains] == [marker] * 3
    assert all(c.appended_marker and c.text == "<answer>" for c in chains)
    with torch.no_grad():
        ref = tiny_model.last_hidden([p + marker for p in prompts]).float()
    assert h_T.dtype == torch.float32
    torch.testing.assert_close(h_T, ref, atol=1e-5, rtol=1e-5)


def test_eval_without_reasoning_scores_prompt_plus_marker(tmp_path, tiny_model_dir, monkeypatch):
    from r2ec.evaluate import evaluate
    from r2ec.model import DualHeadModel
    from r2ec.testing import write_tiny_dataset

    monkeypatch.setenv("R2EC_CACHE", str(tmp_path / "cache"))
    write_tiny_dataset(tmp_path)
    monkeypatch.setattr(DualHeadModel, "generate_raw", lambda *a, **k: pytest.fail("max_new_tokens 0 generated"))
    cfg = load_config(data={
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": "files", "files": {"interactions": str(tmp_path / "inter.csv"),
                                               "items": str(tmp_path / "items.csv")},
                 "prompt": {"category": "movies", "item_singular": "movie"}},
        "eval": {"max_new_tokens": 0, "batch_size": 4, "max_samples": 3},
        "run": {"output_dir": str(tmp_path / "out")},
    })
    result = evaluate(cfg, split="valid", log=lambda *_: None)
    assert result["num_samples"] == 3
    lines = [json.loads(x) for x in Path(tmp_path / "out" / "eval_valid_samples.jsonl").read_text().splitlines()]
    assert [(r["reasoning"], r["appended_marker"]) for r in lines] == [("<answer>", True)] * 3
    assert all(1 <= r["target_rank"] <= 30 for r in lines)
