"""User-bootstrap intervals (r2ec.algo.bootstrap) and user-stratified subsets (r2ec.data.sampler): hand-derived
values, sharded equals global, loop equals vectorised."""

from collections import Counter

import pytest
import torch

from r2ec.algo.bootstrap import (
    draw_users,
    percentile_interval,
    resample_means,
    user_bootstrap_ci,
    user_codes,
    user_sums,
)
from r2ec.data.sampler import stratified_subset


def test_resample_means_by_hand():
    # user A (code 0): samples 1, 0 (sum 1, count 2); user B (code 1): sample 0 (sum 0, count 1)
    values = torch.tensor([1.0, 0.0, 0.0])
    user = torch.tensor([0, 0, 1])
    sums, counts = user_sums(values, user, 2)
    assert sums.flatten().tolist() == [1.0, 0.0] and counts.tolist() == [2.0, 1.0]
    draws = torch.tensor([[0, 0], [0, 1], [1, 1]])  # AA, AB, BB
    means = resample_means(sums, counts, draws).flatten()
    assert means.tolist() == pytest.approx([2 / 4, 1 / 3, 0 / 2])
    # percentiles with linear interpolation on the sorted means [0, 1/3, 1/2]: positions 0.05 and 1.95
    lo, hi = percentile_interval(means.unsqueeze(1))[0].tolist()
    assert lo == pytest.approx(0.05 * (1 / 3)) and hi == pytest.approx(1 / 3 + 0.95 * (1 / 2 - 1 / 3))


def test_interval_matches_the_exact_resampling_distribution():
    # Two users: a resample is AA (mean 1/2, p 1/4), AB or BA (1/3, p 1/2) or BB (0, p 1/4); with 1,000 resamples
    # both tails hold ~250 draws, so the 2.5% and 97.5% percentiles are the extreme outcomes exactly.
    ci = user_bootstrap_ci(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 1]), 2, resamples=1000, seed=0)
    assert ci.tolist() == [[0.0, 0.5]]


def test_one_user_gives_a_point_interval_per_column():
    values = torch.tensor([[0.2, 1.0], [0.4, 0.0], [0.6, 1.0]])
    ci = user_bootstrap_ci(values, torch.zeros(3, dtype=torch.long), 1, resamples=200)
    assert torch.allclose(ci, torch.tensor([[0.4, 0.4], [2 / 3, 2 / 3]], dtype=torch.float64))


def test_loop_equals_vectorised():
    g = torch.Generator().manual_seed(1)
    user = torch.randint(0, 7, (60,), generator=g)
    user[:7] = torch.arange(7)  # every code occurs
    values = torch.rand(60, 3, generator=g, dtype=torch.float64)
    draws = draw_users(7, 300, seed=5)  # more than one chunk
    sums, counts = user_sums(values, user, 7)
    fast = resample_means(sums, counts, draws)
    slow = torch.stack([torch.cat([values[user == u] for u in row.tolist()]).mean(dim=0) for row in draws])
    assert torch.allclose(fast, slow, atol=1e-12, rtol=0)


def test_sharded_sums_equal_global():
    g = torch.Generator().manual_seed(2)
    user = torch.randint(0, 5, (40,), generator=g)
    values = torch.rand(40, 2, generator=g, dtype=torch.float64)
    s_all, c_all = user_sums(values, user, 5)
    s_a, c_a = user_sums(values[:17], user[:17], 5)
    s_b, c_b = user_sums(values[17:], user[17:], 5)
    assert torch.allclose(s_a + s_b, s_all) and torch.equal(c_a + c_b, c_all)


def test_user_intervals_are_wider_than_sample_intervals_for_clustered_samples():
    # 30 users whose 10 samples all agree (a hit-or-miss user): 30 independent units, not 300.
    per_user = torch.tensor([1.0] * 10 + [0.0] * 20)
    values = per_user.repeat_interleave(10)
    user = torch.arange(30).repeat_interleave(10)
    by_user = user_bootstrap_ci(values, user, 30, resamples=1000, seed=0)[0]
    by_sample = user_bootstrap_ci(values, torch.arange(300), 300, resamples=1000, seed=0)[0]
    assert (by_user[1] - by_user[0]) > 2.5 * (by_sample[1] - by_sample[0])
    assert by_user[0] < values.mean() < by_user[1]


def test_user_codes_number_sorted_ids_and_bad_codes_are_refused():
    codes, users = user_codes(["u9", "u1", "u9", "u5"])
    assert users == ["u1", "u5", "u9"] and codes.tolist() == [2, 0, 2, 1]
    with pytest.raises(ValueError, match="no sample"):
        user_bootstrap_ci(torch.ones(2), torch.tensor([0, 2]), 3)


# ------------------------------------------------------------------------------------------ stratified subsets
def _users(counts: dict[str, int]) -> list[str]:
    # samples in "time order": users interleaved unevenly, as in a real split
    out = []
    for u, n in counts.items():
        out += [u] * n
    return sorted(out, key=lambda u: (hash(u) % 7, u))


def test_stratified_subset_is_deterministic_nested_and_in_split_order():
    users = _users({"a": 50, "b": 3, "c": 20, "d": 1, "e": 8})
    s = stratified_subset(users, 20, seed=0)
    assert s == stratified_subset(users, 20, seed=0) and s == sorted(s) and len(set(s)) == 20
    assert stratified_subset(users, 20, seed=1) != s
    assert set(stratified_subset(users, 19, seed=0)) <= set(s) <= set(stratified_subset(users, 21, seed=0))
    assert stratified_subset(users, None, 0) == list(range(len(users)))
    assert stratified_subset(users, 10_000, 0) == list(range(len(users)))


def test_stratified_subset_covers_users_as_evenly_as_possible():
    counts = {"a": 50, "b": 3, "c": 20, "d": 1, "e": 8}
    users = _users(counts)
    for n in (3, 5, 12, 40):
        per_user = Counter(users[i] for i in stratified_subset(users, n, seed=3))
        assert len(per_user) == min(n, len(counts))
        # round-robin: a user has fewer picks than another only when it ran out of samples
        most = max(per_user.values())
        assert all(per_user.get(u, 0) >= min(most - 1, c) for u, c in counts.items())
