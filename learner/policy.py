"""The module DeepSpeed wraps on a learner rank, and where a chain's tokens sit on its log-prob grid (and the rollout's).

Imports torch only (the model is handed in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from r2ec.model import DualHeadModel


class PolicyNet(torch.nn.Module):
    """Routes every computation through one root ``forward`` so DeepSpeed sees ordinary forward passes.

    ZeRO-3 gathers parameters in module hooks and resets its prefetch trace in the root module's hooks; calling
    sub-modules directly would skip the latter. ``kind`` picks the computation.
    """

    def __init__(self, dual: DualHeadModel):
        super().__init__()
        self.model = dual.model  # the HF (or peft) model: the only registered sub-module
        self.dual = dual  # not an nn.Module: a plain attribute

    def forward(self, kind: str, *args: Any) -> Any:
        if kind == "chain":  # (prompt_ids, chains) -> logp (B, L-1), mask (B, L-1), h_T (B, d)
            return self.dual.chain_forward(*args)
        if kind == "chain_packed":  # (prompt_ids (U,), chains (U, G)) -> as "chain" for the U x G chains
            return self.dual.chain_forward_packed(*args)
        if kind == "last":  # (seqs,) -> (B, d) final hidden state at each sequence's last token
            return self.dual.last_hidden(*args)
        if kind == "last_packed":  # (prefixes (R,), tails (R, k_r)) -> (N, d) at each prefix + tail's last token
            return self.dual.last_hidden_packed(*args)
        if kind == "greedy":  # (prompt_ids, max_new_tokens, synced) -> token ids of each finished chain
            return self._greedy(*args)
        raise ValueError(f"unknown forward kind {kind!r}")

    def _greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, synced: bool) -> list[list[int]]:
        # DualHeadModel.generate with `synced_gpus`: under ZeRO-3 every rank must run the same number of forward
        # passes, so a rank whose chains finished keeps stepping until all ranks are done.
        return [c.token_ids for c in self.dual.generate(prompt_ids, max_new_tokens, synced_gpus=synced)]


def chain_positions(prompt_len: int, chain_len: int) -> slice:
    """Where a chain's tokens sit on chain_forward's (N, L) log-prob grid: position t predicts token t + 1, so chain
    token j of a prompt of length P is at t = P - 1 + j."""
    return slice(prompt_len - 1, prompt_len - 1 + chain_len)


def align_chain_tokens(rows: Sequence[int], prompts: Sequence[Sequence[int]], chains: Sequence[Sequence[int]],
                       shape: tuple[int, ...], logp_mask: torch.Tensor, logp: torch.Tensor,
                       device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's rows ``rows`` moved onto chain_forward's grid ``shape`` (``chain_positions``): the loss mask
    (only tokens the rollout sampled are trained) and ``logp``, both (B, L-1) float32 on ``device``; ``logp_mask`` and
    ``logp`` are (N, L) on the rollout's grid."""
    mask = torch.zeros(shape, dtype=torch.float32)
    out = torch.zeros(shape, dtype=torch.float32)
    for i, (r, p, c) in enumerate(zip(rows, prompts, chains, strict=True)):
        n, at = len(c), chain_positions(len(p), len(c))
        mask[i, at] = logp_mask[r, :n].float()
        out[i, at] = logp[r, :n].float()
    return mask.to(device), out.to(device)
