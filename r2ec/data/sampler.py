"""Which train samples each optimiser step sees: every epoch a fresh seeded permutation, taken in order.

The state is two integers (epoch, position), so a run can record exactly where it is.
"""

from __future__ import annotations

import torch


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
