"""The one-step-off pipeline's pure parts (driver/pipeline.py, driver/run_state.py): the staleness bound, and the
rollout a checkpoint keeps for its next step. The pipeline itself runs for real in tests/test_resume.py (kill -9 and
resume of an async run equals the uninterrupted one; the timeline shows the overlap)."""

from __future__ import annotations

import json

import pytest
import torch

from driver.pipeline import check_staleness
from driver.run_state import AHEAD_JSON, Ahead, load_ahead, save_ahead
from r2ec.protocol import Rollout


def _rollout(version: int) -> Rollout:
    g = torch.Generator().manual_seed(0)
    return Rollout([[1, 2, 3], [4, 5], [6], [7, 8]], torch.randn(4, 3, generator=g), torch.ones(4, 3),
                   torch.tensor([False, True, False, False]), torch.randn(4, 8, generator=g), version,
                   {"generate": 1.5})


def test_staleness_is_bounded_at_one_version():
    assert check_staleness(5, _rollout(4)) == 0  # sampled by the learner's own weights
    assert check_staleness(5, _rollout(3)) == 1
    for version in (2, 5):
        with pytest.raises(RuntimeError, match="bounds it at 1"):
            check_staleness(5, _rollout(version))


def test_ahead_round_trips_through_a_checkpoint_folder(tmp_path):
    ahead = Ahead(7, [[10, 11], [12]], torch.tensor([[3, -1], [4, 5]]), torch.tensor([9, 2]), _rollout(5))
    assert load_ahead(tmp_path) is None  # a synchronous run's checkpoint holds none
    save_ahead(tmp_path, ahead)
    got = load_ahead(tmp_path)
    assert (got.step, got.prompts, got.rollout.chain_ids, got.rollout.weight_version) == (
        7, ahead.prompts, ahead.rollout.chain_ids, 5)
    for name in ("logp", "logp_mask", "appended_marker", "h_T"):
        assert torch.equal(getattr(got.rollout, name), getattr(ahead.rollout, name)), name
    assert torch.equal(got.earlier, ahead.earlier) and torch.equal(got.target, ahead.target)
    meta = json.loads((tmp_path / AHEAD_JSON).read_text())
    meta["prompts"] = meta["prompts"][:1] * 3  # 3 prompts for 4 chains
    (tmp_path / AHEAD_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="3 prompts do not match the saved rollout's 4 chains"):
        load_ahead(tmp_path)
