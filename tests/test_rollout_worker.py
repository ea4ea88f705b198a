"""The rollout worker with the HF engine, as a plain object (no Ray): groups, h_T, log-probs, weight updates."""

import socket
import threading

import pytest
import torch

from r2ec.config import ModelConfig, RolloutConfig, SamplingConfig
from r2ec.prompts import PromptBuilder, render_user
from r2ec.weight_sync import SyncGroup, meta_of, open_group, send
from rollout.worker import RolloutWorker


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    rollout_cfg = RolloutConfig(engine="hf", batch_size=2,
                                sampling=SamplingConfig(temperature=1.5, top_k=50, max_new_tokens=12))
    return RolloutWorker(ModelConfig(name_or_path=str(tiny_model_dir)), rollout_cfg, seed=0)


def _prompts(tokenizer, n=3):
    b = PromptBuilder("movies", "movie")
    titles = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Alien (1979)"]
    return [render_user(tokenizer, b.user_messages(titles[: i + 1], [4.0] * (i + 1), [0] * (i + 1), 3600))
            for i in range(n)]


def test_generate_returns_grouped_chains_with_their_states(worker, tiny_model):
    prompts = _prompts(tiny_model.tokenizer)
    ro = worker.generate(prompts, group_size=2, seed=0)
    assert len(ro) == 6 and ro.h_T.shape == (6, 64) and ro.h_T.dtype == torch.float32
    assert ro.weight_version == 0 and ro.timings["generate"] > 0
    marker = tiny_model.marker_ids
    flat_prompts = [p for p in prompts for _ in range(2)]
    with torch.no_grad():
        logp, mask, h_T = tiny_model.chain_forward(flat_prompts, ro.chain_ids)
    torch.testing.assert_close(ro.h_T, h_T.float(), atol=1e-5, rtol=1e-5)
    for i, chain in enumerate(ro.chain_ids):
        assert chain[-len(marker):] == marker
        n_sampled = len(chain) - (len(marker) if ro.appended_marker[i] else 0)
        assert int(ro.logp_mask[i].sum()) == n_sampled
        ref = logp[i][mask[i].bool()][:n_sampled]
        torch.testing.assert_close(ro.logp[i, :n_sampled], ref, atol=1e-5, rtol=1e-5)


def test_sampling_depends_on_the_call_seed_only(tiny_model_dir, worker, tiny_model):
    prompts = _prompts(tiny_model.tokenizer, 2)
    a = worker.generate(prompts, 2, seed=5).chain_ids
    b = worker.generate(prompts, 2, seed=6).chain_ids
    # Another worker (other index, other history of calls) gives the same chains for the same seed.
    other = RolloutWorker(ModelConfig(name_or_path=str(tiny_model_dir)), RolloutConfig(
        engine="hf", batch_size=2, sampling=SamplingConfig(temperature=1.5, top_k=50, max_new_tokens=12)), seed=1,
        worker_index=1)
    other.generate(_prompts(tiny_model.tokenizer), 2, seed=9)
    assert other.generate(prompts, 2, seed=5).chain_ids == a
    assert a != b


def test_greedy_equals_the_dual_head_model(worker, tiny_model):
    prompts = _prompts(tiny_model.tokenizer)
    chains, h_T = worker.greedy(prompts, max_new_tokens=10)
    ref = tiny_model.generate(prompts, max_new_tokens=10)
    assert [c.token_ids for c in chains] == [c.token_ids for c in ref]
    torch.testing.assert_close(h_T, tiny_model.user_hidden(prompts, [c.token_ids for c in ref]).float())


def test_encode_items_equals_the_dual_head_model(worker, tiny_model):
    prompts = _prompts(tiny_model.tokenizer)
    torch.testing.assert_close(worker.encode_items(prompts), tiny_model.encode_items(prompts), atol=1e-5, rtol=1e-5)


def test_receive_weights_loads_every_tensor_and_bumps_the_version(tiny_model_dir, tiny_model):
    w = RolloutWorker(ModelConfig(name_or_path=str(tiny_model_dir)), RolloutConfig(engine="hf"), seed=0)
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in tiny_model.model.state_dict().items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied: sent explicitly, same values
    metas = [meta_of(k, v) for k, v in new.items()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = SyncGroup("127.0.0.1", port, 2, "gloo", 60)
    sent = []
    sender = threading.Thread(target=lambda: sent.append(send(open_group(info, 0), metas, iter(new.items()), 4096)))
    sender.start()
    w.join_sync_group(info, 1)
    got = w.receive_weights(metas, 4096, version=7)
    sender.join(timeout=60)
    assert got == sent[0] and w.weight_version == 7
    for k, v in w.engine.model.model.state_dict().items():
        torch.testing.assert_close(v, new[k], atol=0, rtol=0)
