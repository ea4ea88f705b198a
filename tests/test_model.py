import pytest
import torch

from r2ec.algo.recpo import cosine_scores
from r2ec.model import last_token_index, pad_batch
from r2ec.prompts import PromptBuilder, render_item, render_user


def test_last_token_index_both_paddings():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


def test_pad_batch_positions():
    ids, mask, pos = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError):
        pad_batch([[1], []], pad_id=0)


def _prompts(model):
    b = PromptBuilder("movies", "movie")
    tok = model.tokenizer
    users = [render_user(tok, b.user_messages(["A", "B"][:n], [4.0, 3.0][:n], [0, 60][:n], 3600))
             for n in (1, 2)]
    items = [render_item(tok, b.item_messages({"title": t})) for t in ("Toy Story (1995)", "X", "A longer title")]
    return users, items


def test_hidden_state_independent_of_padding_and_batch(tiny_model):
    users, items = _prompts(tiny_model)
    seqs = users + items
    with torch.no_grad():
        alone = torch.cat([tiny_model.last_hidden([s]) for s in seqs])
        right = tiny_model.last_hidden(seqs, "right")
        left = tiny_model.last_hidden(seqs, "left")
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


def test_hidden_state_is_the_final_norm_output_at_the_last_token(tiny_model):
    _, items = _prompts(tiny_model)
    ids = torch.tensor([items[0]])
    with torch.no_grad():
        out = tiny_model.model(input_ids=ids, output_hidden_states=True)
        ref = out.hidden_states[-1][0, -1]  # HF applies the final norm to the last hidden state
        assert torch.allclose(tiny_model.last_hidden([items[0]])[0], ref, atol=1e-6)
        # and the LM head on it gives the model's own next-token logits
        assert torch.allclose(tiny_model.model.lm_head(ref), out.logits[0, -1], atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch_size, row_tokens", [(1, 512), (2, 512), (7, 512), (7, 40)])
def test_encode_items_keeps_the_given_order(tiny_model, monkeypatch, packed, batch_size, row_tokens):
    import r2ec.packing

    monkeypatch.setattr(r2ec.packing, "PACKED_ROW_TOKENS", row_tokens)  # 40: several packed rows per batch
    b = PromptBuilder("movies", "movie")
    titles = ("Toy Story (1995)", "X", "A longer title", "Heat (1995)", "B", "Twelve Monkeys (1995)", "Fargo")
    items = [render_item(tiny_model.tokenizer, b.item_messages({"title": t})) for t in titles]
    with torch.no_grad():
        alone = torch.cat([tiny_model.last_hidden([it]) for it in items]).float()
    tokens = []
    forward = tiny_model.hidden_states
    monkeypatch.setattr(tiny_model, "hidden_states", lambda ids, *a: tokens.append(ids.numel()) or forward(ids, *a))
    table = tiny_model.encode_items(items, batch_size=batch_size, packed=packed)
    assert table.dtype == torch.float32 and table.shape[0] == len(items)
    assert len(tokens) == -(-len(items) // batch_size)  # one forward per batch
    if packed and batch_size == 7 and row_tokens == 512:  # one row: the shared prefix once, not 7 times
        assert tokens[0] < sum(map(len, items))
    torch.testing.assert_close(table, alone, atol=1e-5, rtol=1e-5)


def test_encode_items_unpacked_where_a_sliding_window_binds(tiny_model, monkeypatch):
    _, items = _prompts(tiny_model)
    shapes = []
    forward = tiny_model.hidden_states
    monkeypatch.setattr(tiny_model, "hidden_states", lambda ids, *a: shapes.append(tuple(ids.shape)) or forward(ids, *a))
    monkeypatch.setattr(tiny_model, "_sliding_window", lambda: 4)  # shorter than any item prompt
    tiny_model.encode_items(items, batch_size=3)
    assert shapes == [(3, max(map(len, items)))]  # one padded row per item, not a packed row


def test_item_scores_mask_history_but_not_target(tiny_model):
    torch.manual_seed(0)
    h_user, h_items = torch.randn(2, 64), torch.randn(5, 64)
    hist = torch.tensor([[0, 3], [1, -1]])
    scores = tiny_model.item_scores(h_user, h_items, hist, target_idx=torch.tensor([3, 2]))
    ref = cosine_scores(h_user, h_items, 0.02)
    assert torch.isinf(scores[0, 0]) and torch.isinf(scores[1, 1])
    assert scores[0, 3] == ref[0, 3]  # repeat of the target: never masked
    assert torch.allclose(ref.abs().max(), torch.tensor(1 / 0.02), atol=50)  # cos in [-1, 1] / tau


def test_finish_chain_cuts_or_appends(tiny_model):
    tok = tiny_model.tokenizer
    body = tok.encode("The user likes action.", add_special_tokens=False)
    marker = tiny_model.marker_ids
    tail = tok.encode(" more text", add_special_tokens=False)
    cut = tiny_model.finish_chain(body + marker + tail)
    assert cut.token_ids == body + marker and not cut.appended_marker
    assert cut.text.endswith("<answer>")
    eos = tok.eos_token_id
    appended = tiny_model.finish_chain(body + [eos] + tail)
    assert appended.token_ids == body + marker and appended.appended_marker


def test_generate_and_recommend(tiny_model):
    users, items = _prompts(tiny_model)
    h_items = tiny_model.encode_items(items)
    chains, scores, top = tiny_model.recommend(users, h_items, k=2, history_idx=torch.tensor([[0], [-1]]),
                                               max_new_tokens=6)
    assert len(chains) == 2 and all(c.text.endswith("<answer>") for c in chains)
    assert all(len(c.token_ids) <= 6 + len(tiny_model.marker_ids) for c in chains)
    assert scores.shape == (2, 3) and torch.isinf(scores[0, 0]) and top.shape == (2, 2)
    assert 0 not in top[0].tolist()
    # greedy generation is deterministic and h_T recomputed from the chain equals the one used for ranking
    again = tiny_model.generate(users, max_new_tokens=6)
    assert [c.token_ids for c in again] == [c.token_ids for c in chains]


def test_lora_wraps_and_keeps_hidden_states_at_init(tiny_model_dir):
    from r2ec.config import LoraConfig, ModelConfig
    from r2ec.model import DualHeadModel

    base = DualHeadModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir)))
    lora = DualHeadModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=True)))
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("gate_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    _, items = _prompts(base)
    with torch.no_grad():  # LoRA B starts at zero: the wrapped model computes the same function
        torch.testing.assert_close(lora.last_hidden(items), base.last_hidden(items), atol=1e-5, rtol=1e-5)


def test_recommender_end_to_end(tiny_model):
    from r2ec.recommend import Recommender

    b = PromptBuilder("movies", "movie")
    titles = ["A", "B", "C", "D"]
    h_items = tiny_model.encode_items([render_item(tiny_model.tokenizer, b.item_messages({"title": t}))
                                       for t in titles])
    rec = Recommender(tiny_model, b, ["a", "b", "c", "d"], titles, h_items)
    out = rec.recommend([("b", 4.0, 0.0), ("d", None, 60.0)], k=3, max_new_tokens=5)
    assert out.reasoning.endswith("<answer>")
    assert sorted(out.item_ids[:2]) == ["a", "c"] and out.item_ids[2] in ("b", "d")  # history ranked last (-inf)
    assert out.scores[:2] == sorted(out.scores[:2], reverse=True) and out.scores[2] == float("-inf")
    with pytest.raises(ValueError, match="not in the catalogue"):
        rec.recommend([("zzz", None, 0.0)])


def test_chain_forward_matches_the_causal_lm(tiny_model):
    users, _ = _prompts(tiny_model)
    chains = [[40, 41, 42] + tiny_model.marker_ids, [50] + tiny_model.marker_ids]
    with torch.no_grad():
        logp, mask, h_T = tiny_model.chain_forward(users, chains)
        for i, (p, c) in enumerate(zip(users, chains, strict=True)):
            seq = torch.tensor([p + c])
            ref = torch.log_softmax(tiny_model.model(input_ids=seq).logits[0, :-1].float(), -1)
            ref = ref.gather(-1, seq[0, 1:, None]).squeeze(-1)
            assert mask[i].sum() == len(c) and mask[i, len(p) - 1] == 1 and mask[i, len(p) - 2] == 0
            at = mask[i, : len(ref)].bool()  # the LM head runs only where a chain token is predicted
            torch.testing.assert_close(logp[i, : len(ref)][at], ref[at], atol=1e-5, rtol=1e-5)
            assert not logp[i][~mask[i].bool()].any()
        torch.testing.assert_close(h_T, tiny_model.user_hidden(users, chains), atol=1e-5, rtol=1e-5)


def test_recpo_gradients_reach_lora_through_both_heads(tiny_model_dir):
    """Token term through lm_head and item term through h_T and the re-encoded target items both move LoRA."""
    from r2ec.algo.recpo import item_loss, token_loss
    from r2ec.config import LoraConfig, ModelConfig
    from r2ec.model import DualHeadModel

    model = DualHeadModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=True)))
    model.model.train()
    for name, p in model.model.named_parameters():  # start B != 0 so every LoRA factor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    users, items = _prompts(model)
    chains = [[40, 41] + model.marker_ids, [50] + model.marker_ids]
    adv = torch.tensor([1.0, -1.0])

    def lora_grads(loss):
        model.model.zero_grad()
        loss.backward()
        return {n: p.grad.abs().sum().item() for n, p in model.model.named_parameters()
                if p.requires_grad and p.grad is not None}

    logp, mask, h_T = model.chain_forward(users, chains)
    g_tok = lora_grads(token_loss(logp, logp.detach(), adv, mask).loss)
    logp, mask, h_T = model.chain_forward(users, chains)
    h_items = model.last_hidden(items[:2])  # the batch's targets, re-encoded with gradient
    g_item = lora_grads(item_loss(h_T, h_items, torch.tensor([0, 1]), adv, torch.tensor([True, True])))
    assert sum(g_tok.values()) > 0 and sum(g_item.values()) > 0
    assert any("lora_A" in n and v > 0 for n, v in g_item.items())


def test_gemma2_loads_with_eager_attention_and_keeps_its_softcaps(tmp_path):
    """Gemma-2 soft-caps attention logits; transformers' SDPA path skips the cap (vLLM's sampler applies it), so the
    learner must load such models with eager attention or its log-probs and h_T differ from the rollout's."""
    from transformers import AutoModelForCausalLM

    from r2ec.config import ModelConfig
    from r2ec.model import DualHeadModel
    from r2ec.testing import build_tiny_model

    path = build_tiny_model(tmp_path / "gemma2", arch="gemma2")
    dual = DualHeadModel.from_config(ModelConfig(name_or_path=str(path)))
    assert dual.model.config._attn_implementation == "eager"
    prompt, chain = [5, 9, 13, 17, 21, 25, 29, 33], [40, 41, 42] + dual.marker_ids
    seq = torch.tensor([prompt + chain])

    def ref_logp(model):
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, :-1].float()  # the causal-LM forward applies both caps
        return torch.log_softmax(logits, -1).gather(-1, seq[0, 1:, None]).squeeze(-1)

    with torch.no_grad():
        logp, mask, _ = dual.chain_forward([prompt], [chain])
    at = mask[0].bool()
    torch.testing.assert_close(logp[0][at], ref_logp(dual.model)[at], atol=1e-5, rtol=1e-5)
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert not torch.allclose(ref_logp(sdpa)[at], logp[0][at], atol=1e-3)  # the cap binds: SDPA would differ


# ---------------------------------------------------------------------------------------------- packed chains
PACK_PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28]]
PACK_CHAINS = [[[31, 32, 33], [41], [51, 52, 53, 54, 55]], [[61, 62], [71, 72, 73, 74], [81, 82, 83]]]


def _packed_vs_unpacked(dual, side: str, prompts=PACK_PROMPTS, groups=PACK_CHAINS):
    """(logp, mask, h_T, loss, grads) of a token loss, unpacked then packed with ``side`` padding."""
    flat_p = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
    flat_c = [c for g in groups for c in g]
    adv = torch.linspace(-1.0, 1.5, len(flat_c))
    out = []
    for packed in (False, True):
        dual.model.zero_grad()
        logp, mask, h_T = (dual.chain_forward_packed(prompts, groups, side) if packed
                           else dual.chain_forward(flat_p, flat_c))
        # a token loss plus a term on h_T, so both outputs' gradients reach the shared prompt
        loss = -(adv[:, None] * logp * mask).sum() / mask.sum() + (h_T * torch.arange(h_T.shape[1])).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in dual.model.named_parameters() if p.grad is not None}
        out.append((logp.detach(), mask, h_T.detach(), loss.detach(), grads))
    dual.model.zero_grad()
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_chain_forward_equals_unpacked(tiny_model_dir, side, attn):
    """One packed row per group (groups of unequal length, so one row is padded) gives the unpacked log-probs,
    mask, h_T, loss and parameter gradients: the prompt's gradient is the sum over its chains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2ec.model import DualHeadModel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    dual = DualHeadModel(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    (logp, mask, h_T, loss, grads), (logp_p, mask_p, h_T_p, loss_p, grads_p) = _packed_vs_unpacked(dual, side)
    assert torch.equal(mask, mask_p) and mask.sum() == sum(len(c) for g in PACK_CHAINS for c in g)
    torch.testing.assert_close(logp_p, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_T_p, h_T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_p, loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_p.keys() and len(grads) > 5
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_packed_chain_forward_detects_a_leak_between_chains(tiny_model):
    """Chains of one row do not see each other: changing the middle chain moves its own outputs only (a mask that
    let a chain attend to an earlier one would move the last chain's)."""
    groups = [[[31, 32, 33], [41, 42], [51, 52, 53]]]
    changed = [[[31, 32, 33], [99, 98], [51, 52, 53]]]
    with torch.no_grad():
        a = tiny_model.chain_forward_packed(PACK_PROMPTS[:1], groups)
        b = tiny_model.chain_forward_packed(PACK_PROMPTS[:1], changed)
    torch.testing.assert_close(a[0][[0, 2]], b[0][[0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[2][[0, 2]], b[2][[0, 2]], atol=1e-6, rtol=0)
    assert (a[2][1] - b[2][1]).abs().max() > 1e-4


def test_packed_chain_forward_gemma2_softcaps_and_sliding_window(tmp_path):
    """Gemma-2 (eager attention, soft-capped logits) packs exactly while prompt + chain fits its sliding window
    (16 tokens in the tiny model), and refuses rows where the window would bind."""
    from r2ec.config import ModelConfig
    from r2ec.model import DualHeadModel
    from r2ec.testing import build_tiny_model

    dual = DualHeadModel.from_config(ModelConfig(name_or_path=str(build_tiny_model(tmp_path / "g2", arch="gemma2"))))
    (logp, _, h_T, loss, grads), (logp_p, _, h_T_p, loss_p, grads_p) = _packed_vs_unpacked(dual, "right")
    torch.testing.assert_close(logp_p, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_T_p, h_T, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="sliding window"):
        dual.chain_forward_packed([list(range(10, 22))], [[list(range(30, 36))]])


def test_pack_groups_refuses_malformed_groups():
    from r2ec.packing import pack_groups

    with pytest.raises(ValueError, match="one group of chains per prompt"):
        pack_groups([[1, 2]], [[[3]], [[4]]], pad_id=0)
    with pytest.raises(ValueError, match="non-empty"):
        pack_groups([[1, 2]], [[[3], []]], pad_id=0)


# ---------------------------------------------------------------------------------------------- packed item prefix
def test_shared_prefix_and_tail_rows_hand_values():
    from r2ec.packing import shared_prefix, tail_rows

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 9, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter one keeps its last token as its tail
    assert shared_prefix([[1, 2], [3, 4]]) == 0
    assert shared_prefix([[1, 2, 3]]) == 0  # one sequence: nothing is shared
    assert tail_rows(4, [3, 3, 3, 9, 1], max_row_tokens=10) == [[0, 1], [2], [3], [4]]
    assert tail_rows(0, [1, 1, 1], max_row_tokens=100) == [[0, 1, 2]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_item_prefix_equals_unpacked_encodings_and_gradients(tiny_model_dir, side):
    """The learner's item re-encoding packed behind the prompts' shared prefix (two rows of unequal length, so one
    is padded) gives the unpacked encodings and parameter gradients: the prefix's gradient is the sum over items."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2ec.model import DualHeadModel
    from r2ec.packing import shared_prefix, tail_rows

    dual = DualHeadModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         AutoTokenizer.from_pretrained(tiny_model_dir))
    items = [[5, 6, 7, 8, 30 + v] + [40 + v] * (v % 3) for v in range(7)]
    P = shared_prefix(items)
    assert P == 4
    tails = [s[P:] for s in items]
    rows = tail_rows(P, [len(t) for t in tails], max_row_tokens=14)
    assert len(rows) == 2
    out = []
    for packed in (False, True):
        dual.model.zero_grad()
        h = (dual.last_hidden_packed([items[0][:P]] * len(rows), [[tails[i] for i in r] for r in rows], side)
             if packed else dual.last_hidden(items))
        (h * torch.arange(h.shape[1])).mean().backward()
        out.append((h.detach(), {n: p.grad.clone() for n, p in dual.model.named_parameters() if p.grad is not None}))
    (h, grads), (h_p, grads_p) = out
    torch.testing.assert_close(h_p, h, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_p.keys() and len(grads) > 5
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
