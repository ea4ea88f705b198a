"""learner/item_term.py on one rank with a toy encoder (pure code: no model, no DeepSpeed): what each item-table mode
encodes, what carries gradient, and the loss it returns against the algo functions it is built from."""

from __future__ import annotations

import pytest
import torch

from learner.item_term import candidates_loss, gather_candidates, item_term, user_item_loss
from r2ec.algo.recpo import catalogue_item_loss, item_loss

V, D, TAU = 12, 6, 0.1


class ToyEncoder:
    """Sequences -> (n, d): an embedding bag of the token ids, counting its calls."""

    def __init__(self):
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(64, D)
        self.calls: list[int] = []

    def __call__(self, seqs: list[list[int]]) -> torch.Tensor:
        self.calls.append(len(seqs))
        return torch.stack([self.emb(torch.tensor(s)).mean(0) for s in seqs]) if seqs else torch.zeros(0, D)


def _inputs():
    item_prompts = [[v, v + 20, 40] for v in range(V)]
    table = torch.randn(V, D, generator=torch.Generator().manual_seed(1))
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    target = torch.tensor([3, 7, 3])
    history = torch.tensor([[0, 1], [2, -1], [5, 6]])
    return item_prompts, table, seqs, target, history, torch.ones(3)


@pytest.mark.parametrize("negatives", ["in_batch", "catalogue"])
def test_frozen_items_score_users_against_the_table_rows_as_constants(negatives):
    enc = ToyEncoder()
    item_prompts, table, seqs, target, history, adv = _inputs()
    out = item_term(enc, lambda ids: enc([item_prompts[v] for v in ids]), table, seqs, target, history, adv, 3, TAU, negatives, items_frozen=True)

    assert enc.calls == [3]  # the users only: no item prompt is encoded
    assert len(out.items) == 0 and out.h_items.shape == (0, D)  # nothing to write back into the table
    h_user = enc(seqs)
    uniq = torch.tensor([3, 7])
    expected = item_loss(h_user, table[uniq], torch.tensor([0, 1, 0]), adv, torch.ones(3, dtype=torch.bool), TAU, 3)
    if negatives == "catalogue":
        expected = expected + catalogue_item_loss(h_user, table, target, history, adv,
                                                  torch.ones(3, dtype=torch.bool), TAU, 3)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    # only the users' tokens get gradient; the item-prompt-only tokens (20..31, 40) get none
    grad = enc.emb.weight.grad
    assert grad[[1, 5, 9]].abs().sum() > 0
    assert grad[20:32].abs().sum() == 0 and grad[40].abs().sum() == 0


def test_trained_items_encode_the_targets_with_gradient_and_write_them_back():
    enc = ToyEncoder()
    item_prompts, table, seqs, target, history, adv = _inputs()
    out = item_term(enc, lambda ids: enc([item_prompts[v] for v in ids]), table, seqs, target, history, adv, 3, TAU, "in_batch")

    assert enc.calls == [3, 2]  # users, then the two distinct targets
    assert out.items.tolist() == [3, 7]
    torch.testing.assert_close(out.h_items, enc([item_prompts[3], item_prompts[7]]).detach())
    out.loss.backward()
    assert enc.emb.weight.grad[[23, 27]].abs().sum() > 0  # the targets' own tokens are trained


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("negatives", ["in_batch", "catalogue"])
def test_fused_item_term_in_slices_equals_item_term(frozen, negatives):
    """``learner.fuse_item_term``: the users' shares, added slice by slice (the token term's micro-batches) and then
    the candidates' summed gradient backpropagated once, give item_term's loss and gradients."""
    item_prompts, table, seqs, target, history, adv = _inputs()
    adv = torch.tensor([0.5, -1.0, 2.0])
    ref_enc = ToyEncoder()
    ref = item_term(ref_enc, lambda ids: ref_enc([item_prompts[v] for v in ids]), table, seqs, target, history, adv,
                    5, TAU, negatives, items_frozen=frozen)
    ref.loss.backward()

    enc = ToyEncoder()
    cand = gather_candidates(lambda ids: enc([item_prompts[v] for v in ids]), table, target, items_frozen=frozen)
    for part in ([0, 1], [2]):  # two micro-batches; each user's h from "its own forward"
        h_user = enc([seqs[i] for i in part])
        user_item_loss(cand, h_user, target[part], history[part], adv[part], table, 5, TAU, negatives).backward()
    rest = candidates_loss(cand)
    assert (rest is None) == frozen
    if rest is not None:
        rest.backward()
    assert cand.loss_local == pytest.approx(ref.loss_local, rel=1e-6)
    assert cand.uniq.tolist() == [3, 7] and cand.items.tolist() == [3, 7]
    torch.testing.assert_close(enc.emb.weight.grad, ref_enc.emb.weight.grad, rtol=1e-5, atol=1e-7)
    if not frozen:
        assert enc.emb.weight.grad[[23, 27]].abs().sum() > 0  # the target side is trained through the surrogate
