"""The item term of a learner step (RecPO's relabelled chains, or the warm-up's users), across learner ranks.

Both ``LearnerWorker.train_step`` and ``LearnerWorker.warmup_step`` end with the same computation: encode some user
sequences (prompt + chain, or prompt + answer marker) and the step's target items WITH gradient, and take the
advantage-weighted softmax of each user's target among the candidates (``r2ec.algo.recpo``):

- ``in_batch``: the candidates are the step's distinct targets over ALL learner ranks, as the official code's
  ``gather_negs_across_processes``;
- ``catalogue``: the in-batch term above, plus the user side's softmax over the whole cached item table (every row
  detached, the targets' too), each user's history masked as in evaluation.

Why the catalogue term scores against the cached rows only. The first design put the step's freshly encoded targets
(with gradient) in place of their cached rows. Measured on SmolLM2-135M (docs/results.md, overfit checks), that
mix has a shortcut: the positives are always fresh and nearly every negative is stale, so moving all encodings
together separates them, and the loss on users never seen before fell from ln V to ln B in one step while
validation stayed at the random level. Shifting the stale rows by the step's mean drift removed the common part of
the drift but not the rest (the loss still fell on unseen users, validation stayed flat). Scoring against the
cached table alone leaves nothing to tell fresh from stale; the item side learns through the in-batch term, fresh
against fresh. The cached rows lag the weights by up to ``recpo.refresh_every`` steps, as RecPO's rewards do.

``model.item_table: frozen`` (not in the paper) takes the item side out altogether: the in-batch candidates are the
table's own rows too, so both terms train the user side only against a table that never changes. Measured on
SmolLM2-135M (docs/results.md), the in-batch term fresh against fresh is what collapses a small model's item
encodings onto one direction within a few steps; with the table frozen there is no item side to collapse.

Sharded equals global, exactly: every rank gathers the other ranks' user states, targets, histories, advantages and
item encodings (detached) and computes the loss over ALL users of the step, its own tensors carrying the gradient.
Rank r's backward then yields the global loss's gradient with respect to rank r's own encodings, and the sum over
ranks (DeepSpeed's average times the world size the caller multiplies in) is the global gradient. A target held by
several ranks is one candidate, taken from the lowest rank (its encodings are identical: same weights, same prompt).

Fused (``learner.fuse_item_term``, the RecPO default): ``gather_candidates`` encodes and gathers the targets before
the token term; each token micro-batch adds its relabelled chains' share (``user_item_loss``, h_T from its own
forward, the candidates as constants) and accumulates the gradient with respect to the candidates; after the last,
``candidates_loss`` sums that gradient over ranks and backpropagates it into this rank's own encodings. Each user's
term depends on its own state and the candidates only, so this is ``item_term``'s loss and gradient, without the
user side's second forward.

Deviation from the official code: it gathers the same tensors but keeps duplicated targets as separate candidates,
and averages the loss over each device's batch; here duplicates are one candidate and the normaliser is global.

Imports torch only (and torch.distributed when the world size is above 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from r2ec.algo.metrics import mask_history, target_rank
from r2ec.algo.recpo import catalogue_item_loss, cosine_scores, item_loss, unit_rows

Negatives = Literal["in_batch", "catalogue"]


@dataclass
class ItemTermOutput:
    loss: torch.Tensor  # scalar with grad: the step's item loss over every rank's users (backpropagate this)
    loss_local: float  # this rank's users' share (sums over ranks to the step's item loss)
    items: torch.Tensor  # (K,) long: this rank's distinct targets, sorted
    h_items: torch.Tensor  # (K, d) float32: their fresh encodings (detached), for the table write-back
    h_user: torch.Tensor  # (n, d) float32: this rank's user states (detached)
    rank: torch.Tensor  # (n,) long: each local target's rank over the catalogue candidates (history masked)
    candidates: int  # candidates in each softmax


def _gather(t: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``t`` (any leading size, same trailing dims up to padding), detached, in rank order."""
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)  # NCCL gathers device tensors only
    shapes = [torch.zeros_like(shape) for _ in range(world_size)]
    torch.distributed.all_gather(shapes, shape)
    shapes = [s.cpu() for s in shapes]
    top = torch.stack(shapes).max(dim=0).values.tolist()
    padded = t.detach().new_zeros(top)
    padded[tuple(slice(0, n) for n in t.shape)] = t.detach()
    out = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(out, padded.contiguous())
    return [o[tuple(slice(0, n) for n in s.tolist())] for o, s in zip(out, shapes, strict=True)]


def _all_ranks(local: torch.Tensor, rank: int, world_size: int, pad: int | None = None) -> torch.Tensor:
    """Concatenate every rank's rows with this rank's own (grad-carrying) tensor in its slot. ``pad`` right-pads
    a second dimension that differs between ranks (history widths)."""
    if world_size == 1:
        return local
    parts = _gather(local, world_size)
    parts[rank] = local
    if pad is not None:
        width = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in parts]
    return torch.cat(parts)


def _distinct_candidates(ids: torch.Tensor, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct item ids of every rank's targets (sorted) and one encoding per id: its first occurrence in rank
    order, the lowest rank's copy (every copy is the same: same weights, same prompt)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return uniq, encoded[first]


def _catalogue_ranks(h_user: torch.Tensor, table: torch.Tensor, tau: float, history: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    """Each user's target rank over the cached catalogue, history masked: the fit on this step's users (not with
    their fresh targets in place, which would look better than they are: see the module docstring)."""
    scores = mask_history(cosine_scores(h_user, table, tau), history, target)
    return target_rank(scores, target) if len(target) else torch.zeros(0, dtype=torch.long)


def item_term(encode: Callable[[list[list[int]]], torch.Tensor], encode_items: Callable[[list[int]], torch.Tensor],
              table: torch.Tensor, seqs: list[list[int]], target_idx: torch.Tensor, history_idx: torch.Tensor,
              adv: torch.Tensor, num_norm: int, tau: float, negatives: Negatives, rank: int = 0,
              world_size: int = 1, items_frozen: bool = False) -> ItemTermOutput:
    """The item term of one optimiser update on this rank (collective when ``world_size`` > 1).

    Args:
        encode: the learner's forward, sequences -> (n, d) final hidden states with gradient (one call per side,
            made even when a side is empty, so ZeRO-3 ranks run the same number of forwards).
        encode_items: the same for catalogue items given by index: item ids (sorted) -> (K, d) encodings of their
            prompts with gradient (the learner packs them behind the prefix all item prompts share).
        table: (V, d) float32, the cached item table (constants).
        seqs: n user sequences whose state scores the catalogue.
        target_idx: (n,) long, each sequence's target; history_idx: (n, H) long, -1 padded.
        adv: (n,) float, the weight of each sequence's term (advantages; 1 in the warm-up).
        num_norm: the global normaliser (chains or users of the whole step, all ranks).
        tau: the rec_head temperature; negatives: see the module docstring.
        items_frozen: ``model.item_table: frozen``: the targets are the table's own rows (constants), nothing is
            re-encoded and nothing is written back, so the term trains the user side only.
    """
    device = table.device
    h_user = encode(seqs).float()
    cand = gather_candidates(encode_items, table, target_idx, rank, world_size, items_frozen)
    items, h_items, uniq, fresh = cand.items, cand.h_items, cand.uniq, cand.fresh
    target, history, adv = target_idx.to(device), history_idx.to(device), adv.to(device, torch.float32)

    all_user = _all_ranks(h_user, rank, world_size)
    all_target = _all_ranks(target, rank, world_size)
    all_history = _all_ranks(history, rank, world_size, pad=-1)
    all_adv = _all_ranks(adv, rank, world_size)
    relabel = torch.ones(len(all_adv), dtype=torch.bool, device=device)

    def loss_of(h: torch.Tensor, tgt: torch.Tensor, hist: torch.Tensor, a: torch.Tensor,
                rel: torch.Tensor) -> torch.Tensor:
        labels = torch.searchsorted(uniq, tgt)
        loss = item_loss(h, fresh, labels, a, rel, tau, num_chains=max(num_norm, 1))  # both sides, fresh vs fresh
        if negatives == "catalogue":  # the user side against every cached row, all equally stale
            loss = loss + catalogue_item_loss(h, table, tgt, hist, a, rel, tau, num_chains=max(num_norm, 1))
        return loss

    loss = loss_of(all_user, all_target, all_history, all_adv, relabel)
    with torch.no_grad():
        local = float(loss.detach()) if world_size == 1 else float(loss_of(h_user, target, history, adv,
                                                                           relabel[:len(adv)]))
        target_ranks = _catalogue_ranks(h_user, table, tau, history, target)
    if items_frozen:  # nothing to write back
        items, h_items = items[:0], h_items[:0]
    return ItemTermOutput(loss=loss, loss_local=local, items=items.cpu(), h_items=h_items.detach(),
                          h_user=h_user.detach(), rank=target_ranks.cpu(),
                          candidates=len(table) if negatives == "catalogue" else len(uniq))


@dataclass
class Candidates:
    """The in-batch candidates of one optimiser update, encoded before its token micro-batches, for the fused item
    term (``learner.fuse_item_term``): each micro-batch adds its relabelled chains' share of the item loss, from the
    h_T of its own forward, and accumulates the gradient with respect to the candidates in ``grad``;
    ``candidates_loss`` then sends the sum over ranks into this rank's own encodings."""

    items: torch.Tensor  # (K,) long: this rank's distinct targets, sorted
    h_items: torch.Tensor  # (K, d) float32: their encodings with graph (the table's rows, constants, when frozen)
    uniq: torch.Tensor  # (C,) long: the distinct targets over every rank, sorted
    fresh: torch.Tensor  # (C, d) float32: one encoding per candidate, this rank's first occurrences with graph
    grad: torch.Tensor  # (C, d) float32: d(this rank's item loss so far) / d fresh
    frozen: bool  # model.item_table: frozen (no item side: nothing to backpropagate, nothing to write back)
    loss_local: float = 0.0  # this rank's users' share of the update's item loss so far


def gather_candidates(encode_items: Callable[[list[int]], torch.Tensor], table: torch.Tensor,
                      target_idx: torch.Tensor, rank: int = 0, world_size: int = 1,
                      items_frozen: bool = False) -> Candidates:
    """The candidates of ``item_term`` for the relabelled chains' targets ``target_idx`` (n,) on this rank (one
    ``encode_items`` forward on every rank; collective when ``world_size`` > 1)."""
    device = table.device
    items = torch.unique(target_idx)
    h_items = table[items.to(device)] if items_frozen else encode_items(items.tolist()).float()
    ids = _all_ranks(items.to(device), rank, world_size)
    uniq, fresh = _distinct_candidates(ids, _all_ranks(h_items, rank, world_size))
    return Candidates(items.cpu(), h_items, uniq, fresh, torch.zeros_like(fresh.detach()), items_frozen)


def user_item_loss(cand: Candidates, h_user: torch.Tensor, target_idx: torch.Tensor, history_idx: torch.Tensor,
                   adv: torch.Tensor, table: torch.Tensor, num_norm: int, tau: float,
                   negatives: Negatives) -> torch.Tensor:
    """These users' share of ``item_term``'s loss, h_user (n, d) carrying the graph of the forward it came from and
    the candidates taken as constants; their gradient is added to ``cand.grad`` (a small autograd call through the
    scores alone, so it is the loss's own gradient whatever scaling the caller's backward applies)."""
    device = table.device
    leaf = cand.fresh.detach().requires_grad_(not cand.frozen)
    target, history = target_idx.to(device), history_idx.to(device)
    labels = torch.searchsorted(cand.uniq, target)
    a, rel = adv.to(device, torch.float32), torch.ones(len(target), dtype=torch.bool, device=device)
    norm = max(num_norm, 1)
    loss = item_loss(h_user.float(), leaf, labels, a, rel, tau, num_chains=norm)
    if not cand.frozen:
        cand.grad += torch.autograd.grad(loss, leaf, retain_graph=True)[0]
    if negatives == "catalogue":
        loss = loss + catalogue_item_loss(h_user.float(), table, target, history, a, rel, tau, num_chains=norm)
    cand.loss_local += float(loss.detach())
    return loss


def candidates_loss(cand: Candidates, world_size: int = 1) -> torch.Tensor | None:
    """A scalar whose backward sends d(the update's item loss over every rank) / d(candidates) into this rank's own
    encodings: sum over ranks of ``cand.grad`` (collective when ``world_size`` > 1), dotted with ``fresh``. None when
    the table is frozen. Sharded equals global: each rank's grad is its users' share, exactly as ``item_term``."""
    if cand.frozen:
        return None
    if world_size > 1:
        torch.distributed.all_reduce(cand.grad)
    return (cand.fresh * cand.grad).sum()


@torch.no_grad()
def table_cosine_mean(table: torch.Tensor, sample: int = 256) -> float:
    """Mean pairwise cosine of ``sample`` evenly spaced table rows (off-diagonal). Near 1: the item encodings have
    collapsed onto one direction and the rec_head cannot tell items apart (a zero-shot table starts high)."""
    n = min(sample, table.shape[0])
    if n < 2:
        return float("nan")
    rows = unit_rows(table[torch.linspace(0, table.shape[0] - 1, n).round().long()])
    sims = rows @ rows.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def score_std_mean(item_scores: torch.Tensor) -> float:
    """Mean over users of the std of their finite rec_head scores (cos / tau; masked -inf entries left out)."""
    finite = torch.isfinite(item_scores)
    x = torch.where(finite, item_scores, torch.zeros((), dtype=item_scores.dtype, device=item_scores.device))
    count = finite.sum(dim=-1).clamp(min=2)
    mean = x.sum(dim=-1) / count
    var = (torch.where(finite, x - mean.unsqueeze(-1), torch.zeros_like(x)) ** 2).sum(dim=-1) / (count - 1)
    return float(var.sqrt().mean())
