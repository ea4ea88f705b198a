"""How the learner ranks' metrics combine into a step's record (driver.tracking.reduce_rank_metrics)."""

from driver.tracking import reduce_rank_metrics


def test_losses_and_counts_add_up_alarms_and_times_take_the_worst_rank_the_rest_averages():
    ranks = [{"loss_token": 0.25, "num_tokens": 30.0, "alarm_logp_abs_diff_mean": 1e-6, "time_train_s": 2.0,
              "reward_mean": 0.5},
             {"loss_token": 0.5, "num_tokens": 10.0, "alarm_logp_abs_diff_mean": 3e-6, "time_train_s": 1.0,
              "reward_mean": 0.25}]
    assert reduce_rank_metrics(ranks) == {"loss_token": 0.75, "num_tokens": 40.0, "alarm_logp_abs_diff_mean": 3e-6,
                                          "time_train_s": 2.0, "reward_mean": 0.375}
