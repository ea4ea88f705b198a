"""Which samples are seen: the train samples of each optimiser step, and the subset of a split an evaluation sees.

Training: every epoch a fresh seeded permutation, taken in order. The state is two integers (epoch, position), so a
run can record exactly where it is.

Evaluation subsets (``stratified_subset``): the first N samples of a split in time order are a handful of users (the
first 500 MovieLens-100k test samples come from 5 of its 166 test users), so a subset instead spreads over the users:
round-robin over the split's users in a seeded order, each user's samples in a seeded order. Given the same split,
seed and N every method gets the same subset, N >= the number of users covers every user, and the subset of N is
contained in the subset of N + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stratified_subset(user_ids: Sequence[str], n: int | None, seed: int) -> list[int]:
    """Indices (ascending, i.e. in split order) of ``n`` samples spread over users as evenly as possible.

    ``user_ids`` holds each sample's user in split order; ``n`` None or >= len(user_ids) means every sample. Users are
    visited in a seeded permutation of their sorted ids; round r takes the r-th sample, in a seeded per-user order,
    of every user that still has one; the first ``n`` picks are the subset."""
    if n is None or n >= len(user_ids):
        return list(range(len(user_ids)))
    rows: dict[str, list[int]] = {}
    for i, u in enumerate(user_ids):
        rows.setdefault(u, []).append(i)
    g = torch.Generator().manual_seed(seed)
    users = sorted(rows)
    order = [users[i] for i in torch.randperm(len(users), generator=g).tolist()]
    queues = {u: [rows[u][i] for i in torch.randperm(len(rows[u]), generator=g).tolist()] for u in order}
    picked: list[int] = []
    for r in range(max(len(q) for q in queues.values())):
        for u in order:
            if r < len(queues[u]):
                picked.append(queues[u][r])
                if len(picked) == n:
                    return sorted(picked)
    raise AssertionError("unreachable: n < len(user_ids) picks always fill up")


class EpochSampler:
    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the train split is empty: nothing to train on")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        """The next ``n`` sample indices; a batch never spans two epochs' permutations partially twice."""
        out: list[int] = []
        while len(out) < n:
            if self.position == self.num_samples:
                self.epoch += 1
                self.position = 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(out), self.num_samples - self.position)
            out.extend(self._perm[self.position: self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; the train split and seed must be the same."""
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this run has {getattr(self, key)}: the "
                                 f"train split or the seed changed, so the data order cannot be continued")
        if not 0 <= state["position"] <= self.num_samples:
            raise ValueError(f"sampler position {state['position']} outside 0..{self.num_samples}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def history_tensor(rows: list[list[int]]) -> torch.Tensor:
    """Pad ragged lists of item indices with -1: (B, H) long (H >= 1)."""
    width = max(1, max((len(r) for r in rows), default=0))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out
