"""Shared-prompt packing: a group's G chains in one row behind one copy of their prompt.

A RecPO group is one prompt and G chains sampled from it. Unpacked, the learner runs G rows of prompt + chain, so a
step costs G x (P + C) tokens; packed, it runs one row [prompt, chain_1, ..., chain_G] per group, P + G x C tokens.
Two things make the packed row compute exactly what the G unpacked rows compute:

- a block attention mask (R, 1, L, L): every chain token attends to the whole prompt and causally to its own chain,
  never to another chain of the row; padding attends to itself only (no empty softmax) and nothing attends to it;
- position ids that restart at P for each chain, so rotary (or learned) positions are those of prompt + chain.

The prompt's activations are computed once; in the backward pass they receive the sum of the G chains'
gradients, which is what the G unpacked copies of the prompt receive in total. Per-chain outputs are read back at
the chains' own positions (``PackedRows.pred`` / ``PackedRows.last``), so callers get the unpacked results.

The same rows pack the learner's item re-encoding: a step's target items share the prefix every item prompt starts
with (``shared_prefix``: chat template + instruction), so one row [prefix, tail_1, ..., tail_K] gives their
encodings at each tail's last token (``tail_rows`` bounds a row's length).

Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Token bound of a packed row of item tails (``tail_rows``): at 512 the dense block mask's attention over a row costs
# about a sixth of the row's linear layers on SmolLM2-135M, and 17 MovieLens item tails share one prefix.
PACKED_ROW_TOKENS = 512


@dataclass
class PackedRows:
    """Packed rows of groups and where each chain's outputs sit in them (chains in group order)."""

    input_ids: torch.Tensor  # (R, L) long, padded with the pad id
    position_ids: torch.Tensor  # (R, L) long: the prompt from 0, each chain restarting at its prompt's length
    allowed: torch.Tensor  # (R, 1, L, L) bool: query t may attend to key s
    pred: tuple[torch.Tensor, torch.Tensor]  # (row, column) of the hidden state predicting each chain token
    targets: torch.Tensor  # (T,) the chain tokens those hidden states predict, chain by chain
    last: tuple[torch.Tensor, torch.Tensor]  # (row, column) of each chain's last token (its h_T)

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias (0 where allowed, the dtype's minimum elsewhere): the form both eager and
        SDPA attention add to the scores (transformers passes a 4D mask through as given)."""
        return torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device).masked_fill(
            ~self.allowed, torch.finfo(dtype).min)


def _segments(prompt: Sequence[int], chains: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """One group's row: token ids, position ids and segment ids (0 = prompt, j + 1 = chain j)."""
    P = len(prompt)
    ids, pos, seg = list(prompt), list(range(P)), [0] * P
    for j, c in enumerate(chains):
        ids += list(c)
        pos += range(P, P + len(c))
        seg += [j + 1] * len(c)
    return ids, pos, seg


def pack_groups(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]], pad_id: int,
                side: str = "right", device: torch.device | str = "cpu") -> PackedRows:
    """One packed row per group (``groups[g]`` are the chains of ``prompts[g]``), padded on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if len(prompts) != len(groups) or not prompts:
        raise ValueError(f"pack_groups needs one group of chains per prompt, got {len(prompts)} prompts and "
                         f"{len(groups)} groups")
    if any(not p for p in prompts) or any(not g or any(not c for c in g) for g in groups):
        raise ValueError("pack_groups needs non-empty prompts, groups and chains")
    rows = [_segments(p, g) for p, g in zip(prompts, groups, strict=True)]
    R, L = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), -1, dtype=torch.long)  # -1 = padding
    pred_row, pred_col, last_row, last_col, targets = [], [], [], [], []
    for r, ((row_ids, row_pos, row_seg), prompt, chains) in enumerate(zip(rows, prompts, groups, strict=True)):
        off = 0 if side == "right" else L - len(row_ids)
        ids[r, off:off + len(row_ids)] = torch.as_tensor(row_ids)
        pos[r, off:off + len(row_ids)] = torch.as_tensor(row_pos)
        seg[r, off:off + len(row_ids)] = torch.as_tensor(row_seg)
        start = off + len(prompt)  # column of the current chain's first token
        for c in chains:
            # chain token 0 is predicted by the prompt's last token, token t > 0 by the chain's token t - 1
            pred_col += [off + len(prompt) - 1] + list(range(start, start + len(c) - 1))
            pred_row += [r] * len(c)
            targets += list(c)
            last_row.append(r)
            last_col.append(start + len(c) - 1)
            start += len(c)
    col = torch.arange(L)
    causal = col[None, :, None] >= col[None, None, :]  # (1, L, L): key s <= query t
    q, k = seg[:, :, None], seg[:, None, :]
    same_block = (k == 0) | (k == q)  # the prompt, or the query's own chain
    allowed = causal & same_block & (q >= 0) & (k >= 0)
    allowed |= torch.eye(L, dtype=torch.bool)[None] & (q < 0)  # padding attends to itself only: no empty softmax

    def t(x: list[int]) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.long, device=device)

    return PackedRows(ids.to(device), pos.to(device), allowed[:, None].to(device), (t(pred_row), t(pred_col)),
                      t(targets), (t(last_row), t(last_col)))


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every sequence shares, leaving each at least its last token (so every packed
    tail is non-empty: its last token is where the sequence's hidden state is read). 0 for fewer than 2 sequences.

    The item prompts share the chat template and the instruction (~45 tokens of the ~71 of a MovieLens item)."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return max(n, 0)


def tail_rows(prefix_len: int, tail_lens: Sequence[int], max_row_tokens: int) -> list[list[int]]:
    """Indices of the tails that go into each packed row behind a prefix of ``prefix_len`` tokens, in order: a row
    takes tails while prefix + tails stays within ``max_row_tokens`` (a tail that alone exceeds it goes alone).
    The bound keeps the dense (L, L) block mask's wasted attention small: a row of L tokens scores L^2 pairs, of
    which the tails' own blocks are a fraction."""
    rows: list[list[int]] = []
    used = prefix_len
    for i, n in enumerate(tail_lens):
        if rows and rows[-1] and used + n <= max_row_tokens:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = prefix_len + n
    return rows


def tail_groups(seqs: Sequence[Sequence[int]], prefix_len: int, max_row_tokens: int | None = None
                ) -> tuple[list[list[int]], list[list[list[int]]]]:
    """``seqs`` that share their first ``prefix_len`` tokens as the (prefixes, tails) arguments of
    ``DualHeadModel.last_hidden_packed``: one copy of the prefix per packed row (``tail_rows``) and each row's tails,
    in the order given. ``max_row_tokens`` defaults to ``PACKED_ROW_TOKENS`` (read at call time)."""
    tails = [list(s[prefix_len:]) for s in seqs]
    rows = tail_rows(prefix_len, [len(t) for t in tails], max_row_tokens or PACKED_ROW_TOKENS)
    prefix = list(seqs[0][:prefix_len])
    return [prefix] * len(rows), [[tails[i] for i in row] for row in rows]
