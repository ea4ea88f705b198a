"""How the learner ranks' metrics combine into a step's record (r2ec.protocol.RankMetrics.reduce)."""

import dataclasses

import pytest

from r2ec.protocol import StepMetrics, WarmupMetrics


def _step(**values) -> StepMetrics:
    zeros = {f.name: 0.0 for f in dataclasses.fields(StepMetrics) if f.default is dataclasses.MISSING}
    return StepMetrics(**{**zeros, **values})


def test_losses_and_counts_add_up_alarms_and_times_take_the_worst_rank_the_rest_averages():
    ranks = [_step(loss_token=0.25, num_tokens=30.0, alarm_logp_abs_diff_mean=1e-6, time_train_s=2.0,
                   reward_mean=0.5),
             _step(loss_token=0.5, num_tokens=10.0, alarm_logp_abs_diff_mean=3e-6, time_train_s=1.0,
                   reward_mean=0.25)]
    got = StepMetrics.reduce(ranks)
    assert {k: got[k] for k in ("loss_token", "num_tokens", "alarm_logp_abs_diff_mean", "time_train_s",
                                "reward_mean")} == {"loss_token": 0.75, "num_tokens": 40.0,
                                                    "alarm_logp_abs_diff_mean": 3e-6, "time_train_s": 2.0,
                                                    "reward_mean": 0.375}


def test_every_field_declares_a_reduction_and_optional_fields_are_absent_until_set():
    for cls in (StepMetrics, WarmupMetrics):
        assert {f.metadata["reduce"] for f in dataclasses.fields(cls)} <= {"sum", "mean", "max"}
    m = _step()
    assert "loss_kl" not in m and "loss_kl" not in StepMetrics.reduce([m, m])
    with_kl = _step(loss_kl=0.125)
    assert with_kl["loss_kl"] == 0.125 and StepMetrics.reduce([with_kl, with_kl])["loss_kl"] == 0.25
    assert len(m) == len(dict(m)) == sum(f.default is dataclasses.MISSING for f in dataclasses.fields(StepMetrics))


def test_a_metric_key_that_is_not_an_identifier_reads_under_its_key():
    w = WarmupMetrics(loss_item=1.0, target_rank_mean=3.0, train_ndcg_at_10=0.5, grad_norm=1.0,
                      diag_table_cos_mean=0.1, diag_score_std=0.2, item_candidates=8.0, num_users=4.0,
                      time_item_s=1.0, time_optimizer_s=0.5, time_train_s=2.0)
    assert w["train_ndcg@10"] == 0.5 and "train_ndcg_at_10" not in w
    assert WarmupMetrics.reduce([w, w])["num_users"] == 8.0


def test_reduce_refuses_mixed_or_empty_ranks():
    with pytest.raises(TypeError, match="StepMetrics"):
        StepMetrics.reduce([])
    with pytest.raises(TypeError, match="WarmupMetrics"):
        StepMetrics.reduce([_step(), WarmupMetrics(*([0.0] * 11))])
