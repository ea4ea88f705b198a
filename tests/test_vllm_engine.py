"""The vLLM rollout engine against the HF reference (DualHeadModel), on the tiny float32 model.

One engine for the whole module (start ~20-40 s, ~2 GB), configured as on CPU in production (no chunked prefill:
seeded requests cannot be chunk-prefilled by the CPU build), with a token budget of one full sequence, so several
requests share a forward step. A second, short-lived engine with chunked prefill on (as on GPUs; a 600-token
sequence is prefilled in 3 chunks) checks the hidden-state capture there, with unseeded requests only. Sequences
sharing a 300-token prefix (vLLM's CPU block size is 128) exercise prefix-cache hits. The weight-update test runs
last: it broadcasts perturbed weights, checks them, then broadcasts the originals back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

pytestmark = pytest.mark.vllm

TOL = 1e-4
MAX_LEN = 1024  # max_model_len, and the token budget of the main engine: several requests per step
CHUNK_BUDGET = 256  # the chunked engine's max_num_batched_tokens: a 600-token sequence takes 3 chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_ids(g: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()  # skip the 3 special tokens


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    pytest.importorskip("vllm")
    from r2ec.config import ModelConfig, RolloutConfig
    from rollout.vllm_engine import VllmEngine

    eng = VllmEngine(ModelConfig(name_or_path=str(tiny_model_dir)), RolloutConfig(), seed=0, device="cpu",
                     extra_llm_kwargs=dict(max_num_batched_tokens=MAX_LEN, max_num_seqs=16, max_model_len=MAX_LEN))
    yield eng
    eng.close()


@pytest.fixture()
def chunked_engine(tiny_model_dir):
    """Chunked prefill on, as vLLM runs on GPUs; only unseeded requests may go to it on CPU. Its KV blocks hold 32
    tokens (``rollout.vllm.block_size``, as the CPU configs set it) instead of the CPU build's 128."""
    pytest.importorskip("vllm")
    from r2ec.config import ModelConfig, RolloutConfig
    from rollout.vllm_engine import VllmEngine

    rollout_cfg = RolloutConfig(vllm={"block_size": 32})
    eng = VllmEngine(ModelConfig(name_or_path=str(tiny_model_dir)), rollout_cfg, seed=0, device="cpu",
                     extra_llm_kwargs=dict(enable_chunked_prefill=True, max_num_batched_tokens=CHUNK_BUDGET, max_num_seqs=16,
                                     max_model_len=MAX_LEN))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(tiny_model):
    """Three chat prompts of different lengths, as the rollout worker builds them."""
    tok = tiny_model.tokenizer
    texts = ["3d 4.5h ago: [GoldenEye (1995)] (3.0)", "Toy Story (1995) Animation, Comedy",
             "Below is my historical movies purchases and ratings (out of 5): 2h 15.0min ago 35.0min ago"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for t in texts]


@pytest.fixture(scope="module")
def seqs(tiny_model):
    g = torch.Generator().manual_seed(1)
    vocab = len(tiny_model.tokenizer)
    prefix = _random_ids(g, vocab, 300)
    shared = [prefix + _random_ids(g, vocab, k) for k in (1, 5, 40)]
    alone = [_random_ids(g, vocab, k) for k in (1, 7, 130, 600)]
    return shared + alone + [shared[1]]  # a duplicate too


def _hf_chain_logp(model, prompts, chains) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        logp, mask, h_T = model.chain_forward(prompts, chains)
    return h_T, [logp[i][mask[i] > 0] for i in range(len(chains))]


def _greedy(n_tokens: int, stop: tuple[str, ...] = ()):
    from rollout.engine import Sampling

    return Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=n_tokens, stop=stop)


# ------------------------------------------------------------------------------------------------- plumbing
def test_import_needs_no_vllm():
    code = "import sys, rollout.vllm_engine, rollout.vllm_ext; assert 'vllm' not in sys.modules; " \
           "assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_threads_bind_all_is_this_process_affinity(monkeypatch):
    from rollout.vllm_engine import cpu_threads_bind

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 0, 1}, raising=False)
    assert cpu_threads_bind("all") == "0,1,3"
    assert cpu_threads_bind("auto") == "auto" and cpu_threads_bind("0-1") == "0-1"


def test_version_check_names_the_supported_version(monkeypatch):
    vllm = pytest.importorskip("vllm")
    from rollout.vllm_engine import import_vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x only.*found vLLM 0\.31\.2"):
        import_vllm()


# ------------------------------------------------------------------------------------------------- hidden states
def test_last_hidden_matches_hf_with_prefix_hits(engine, tiny_model, seqs):
    with torch.no_grad():
        ref = tiny_model.last_hidden(seqs).float()
    first = engine.last_hidden(seqs)
    assert first.shape == ref.shape and first.dtype == torch.float32
    assert (first - ref).abs().max().item() < TOL
    # Second call: the shared prefix and every whole block of a repeated sequence come from the prefix cache,
    # so only the uncached tail is in the forward batch.
    again = engine.last_hidden(seqs)
    cached = engine.last_num_cached_tokens
    assert all(c >= 256 for c in cached[:3]) and cached[6] >= 512, cached
    assert (again - ref).abs().max().item() < TOL
    # Order inside the call must not matter.
    perm = list(reversed(range(len(seqs))))
    rev = engine.last_hidden([seqs[i] for i in perm])
    assert (rev - ref[perm]).abs().max().item() < TOL


def test_last_hidden_with_chunked_prefill(chunked_engine, tiny_model, seqs):
    # Only the chunk that reaches a sequence's last token may fill its row; earlier chunks must be ignored.
    with torch.no_grad():
        ref = tiny_model.last_hidden(seqs).float()
    assert max(len(s) for s in seqs) > 2 * CHUNK_BUDGET
    for _ in range(2):  # the second call is served mostly from the prefix cache
        h = chunked_engine.last_hidden(seqs)
        assert (h - ref).abs().max().item() < TOL
    # rollout.vllm.block_size reached vLLM: the cache serves the 300-token shared prefix in 32-token blocks (9 of
    # them), where 128-token blocks would serve 256 tokens.
    assert chunked_engine.llm.llm_engine.vllm_config.cache_config.block_size == 32
    cached = chunked_engine.last_num_cached_tokens
    assert all(c % 32 == 0 for c in cached) and min(cached[:3]) >= 288, cached


def test_cpu_engine_prefills_whole_sequences(engine):
    # Seeded requests on the CPU build must never be chunk-prefilled (vLLM would rewind their CPU generator).
    sched = engine.llm.llm_engine.vllm_config.scheduler_config
    assert not sched.enable_chunked_prefill and sched.max_num_batched_tokens >= MAX_LEN
    assert sched.async_scheduling is False  # the hook reads the runner's per-step state: no step prepared ahead


def test_rows_the_hook_missed_are_prefilled_again_without_the_cache(engine, tiny_model, seqs, monkeypatch):
    """Under decode CUDA graphs (GPU, enforce_eager: false) a fully cached sequence's 1-token prefill can replay a
    graph, where the hook does not run. Simulated here by dropping rows 1 and 4 from the first capture's result."""
    with torch.no_grad():
        ref = tiny_model.last_hidden(seqs).float()
    engine.last_hidden(seqs)  # everything cached from here on
    real_rpc, calls = engine._rpc, []

    def rpc(method, *args, **kwargs):
        out = real_rpc(method, *args, **kwargs)
        if method == "r2ec_begin_capture":
            calls.append(len(args[0]))  # how many sequences this armed prefill covers
        if method == "r2ec_end_capture" and len(calls) == 1:
            raw, filled = out[0]
            out = [(raw, [ok and i not in (1, 4) for i, ok in enumerate(filled)])]
        return out

    monkeypatch.setattr(engine, "_rpc", rpc)
    h = engine.last_hidden(seqs)
    assert calls == [len(seqs), 2]  # one armed prefill of every sequence, one of the two missed ones
    assert (h - ref).abs().max().item() < TOL
    cached = engine.last_num_cached_tokens
    assert cached[1] == cached[4] == 0 and cached[0] > 0, cached  # the second prefill read no cache


def test_llm_kwargs_decode_graphs_on_gpu_only():
    from r2ec.config import ModelConfig, VllmConfig
    from rollout.vllm_engine import llm_kwargs

    model = ModelConfig(name_or_path="m")
    eager = llm_kwargs("m", model, VllmConfig(), 0, "cpu", 1)
    assert eager["enforce_eager"] and "compilation_config" not in eager and eager["async_scheduling"] is False
    graphs = llm_kwargs("m", model, VllmConfig(enforce_eager=False), 0, "cuda", 1)
    assert graphs["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert not graphs["enforce_eager"] and graphs["async_scheduling"] is False
    with pytest.raises(ValueError, match="enforce_eager: false needs a GPU"):
        llm_kwargs("m", model, VllmConfig(enforce_eager=False), 0, "cpu", 1)


def test_llm_kwargs_in_process_worker_at_one_rank_only():
    from r2ec.config import ModelConfig, RolloutConfig, VllmConfig
    from rollout.vllm_engine import VllmEngine, llm_kwargs

    model = ModelConfig(name_or_path="m")
    assert "distributed_executor_backend" not in llm_kwargs("m", model, VllmConfig(), 0, "cpu", 1)
    assert llm_kwargs("m", model, VllmConfig(), 0, "cpu", 1, in_process=True)["distributed_executor_backend"] == "uni"
    assert llm_kwargs("m", model, VllmConfig(), 0, "cuda", 2, in_process=True)["distributed_executor_backend"] == "ray"
    for kwargs in ({"tensor_parallel_size": 2}, {"colocated": True}):  # refused before vLLM is imported
        with pytest.raises(ValueError, match="in-process vLLM engine needs tensor_parallel_size 1"):
            VllmEngine(model, RolloutConfig(engine="vllm"), 0, "cuda", in_process=True, **kwargs)


# ------------------------------------------------------------------------------------------------- sampling
def test_sample_groups_n_per_prompt_with_raw_logp(engine, tiny_model, prompts):
    from rollout.engine import Sampling

    n = 3
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=24, stop=("<answer>",), seed=7)
    comps = engine.sample(prompts, n, sampling)
    assert len(comps) == len(prompts) * n
    chains = [c.token_ids for c in comps]
    for i in range(len(prompts)):
        group = chains[i * n:(i + 1) * n]
        assert len({tuple(c) for c in group}) == n  # different chains per prompt
    # Grouped i*n + j: each logp must be that of its own prompt's context, under raw logits (temperature 1,
    # before top-k/top-p), as the learner's forward pass computes it.
    _, ref = _hf_chain_logp(tiny_model, [prompts[i // n] for i in range(len(comps))], chains)
    for c, r in zip(comps, ref, strict=True):
        assert c.logp is not None and len(c.logp) == len(c.token_ids)
        assert (torch.tensor(c.logp) - r).abs().max().item() < TOL
    # A seed makes the call reproducible.
    assert [c.token_ids for c in engine.sample(prompts, n, sampling)] == chains


def test_greedy_matches_hf_generate(engine, tiny_model, prompts):
    # The random tiny model mostly repeats its last token under greedy decoding; the weight-update test below
    # repeats this check on weights whose greedy chains vary.
    got = engine.sample(prompts, 1, _greedy(32, ("<answer>",)))
    ref = tiny_model.generate(prompts, max_new_tokens=32)
    for c, r in zip(got, ref, strict=True):
        assert tiny_model.finish_chain(c.token_ids).token_ids == r.token_ids


def test_stop_string_is_kept_and_ends_the_completion(engine, tiny_model, prompts):
    from rollout.engine import Sampling

    tok = tiny_model.tokenizer
    free_run = Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32, stop=(), seed=11)
    free = engine.sample(prompts[:1], 1, free_run)[0].token_ids
    # A stop string this seeded completion will produce: the text of one of its later tokens. The same seed
    # replays the same random draws, so the stopped run is a prefix of the free one.
    stop = next(t for k in range(4, len(free)) if (t := tok.decode([free[k]]).strip()).isascii() and t.isprintable()
                and t)
    got = engine.sample(prompts[:1], 1, Sampling(**{**free_run.__dict__, "stop": (stop,)}))[0].token_ids
    assert got == free[:len(got)] and len(got) < len(free)
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])


def test_chain_states_match_hf_chain_forward(engine, tiny_model, prompts):
    from rollout.engine import Sampling

    comps = engine.sample(prompts, 2, Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, stop=(),
                                               seed=3))
    chains = [c.token_ids for c in comps]
    pp = [prompts[i // 2] for i in range(len(chains))]
    h_T, logp = engine.chain_states(pp, chains)
    ref_h, ref_logp = _hf_chain_logp(tiny_model, pp, chains)
    assert (h_T - ref_h.float()).abs().max().item() < TOL
    for got, r, c in zip(logp, ref_logp, comps, strict=True):
        assert len(got) == len(r)
        assert (torch.tensor(got) - r).abs().max().item() < TOL
        assert (torch.tensor(got) - torch.tensor(c.logp)).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------------- weight sync
class _Learner:
    """Learner rank 0 of the broadcast group, driven from threads (the engine's worker is rank 1)."""

    def __init__(self, engine):
        from r2ec.weight_sync import SyncGroup, open_group

        self.info = SyncGroup("127.0.0.1", _free_port(), world_size=1 + engine.num_sync_ranks, backend="gloo",
                              timeout_s=60)
        self.group = None

        def join() -> None:
            self.group = open_group(self.info, 0)

        thread = threading.Thread(target=join, daemon=True)
        thread.start()
        engine.join_sync_group(self.info, first_rank=1)  # blocks until rank 0 has joined as well
        thread.join(timeout=60)
        assert self.group is not None

    def sync(self, engine, state: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[float, float]:
        """Broadcast ``state`` while the engine receives it; returns (sent, received) checksums."""
        from r2ec.weight_sync import meta_of, send

        metas = [meta_of(name, t) for name, t in state.items()]
        sent: list[float] = []
        thread = threading.Thread(
            target=lambda: sent.append(send(self.group, metas, iter(state.items()), bucket_bytes)), daemon=True)
        thread.start()
        received = engine.receive_weights(metas, bucket_bytes)
        thread.join(timeout=60)
        assert not thread.is_alive() and sent
        return sent[0], received


def _checkpoint_state(model) -> dict[str, torch.Tensor]:
    """HF checkpoint names, with the tied lm_head.weight listed explicitly (as the learner sends it)."""
    state = dict(model.model.state_dict())
    state.setdefault("lm_head.weight", model.model.get_output_embeddings().weight)
    return {k: v.detach().clone() for k, v in state.items()}


def test_weight_update_in_place(engine, tiny_model, tiny_model_dir, seqs, prompts):
    from r2ec.config import ModelConfig
    from r2ec.model import DualHeadModel

    assert engine.num_sync_ranks == 1
    new = DualHeadModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert new.model.config.tie_word_embeddings
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # Every parameter changes, embed_tokens (= lm_head, tied) included; the stronger noise on the projection
        # matrices also makes greedy chains vary instead of repeating the last token.
        for name, p in new.model.named_parameters():
            scale = 0.2 if p.ndim == 2 and "embed" not in name else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g))
    state = _checkpoint_state(new)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" in state
    assert "model.layers.0.self_attn.q_proj.weight" in state

    before = engine.last_hidden(seqs)  # fills the prefix cache with KV of the old weights
    learner = _Learner(engine)
    sent, received = learner.sync(engine, state, bucket_bytes=64 * 1024)  # several buckets
    assert received == sent

    with torch.no_grad():
        ref = new.last_hidden(seqs).float()
    after = engine.last_hidden(seqs)
    assert (after - ref).abs().max().item() < TOL
    assert (after - before).abs().max().item() > 1e-2  # really changed
    chains = [c.token_ids for c in engine.sample(prompts, 1, _greedy(24))]
    ref_chains = new.generate(prompts, max_new_tokens=24)
    assert [new.finish_chain(c).token_ids for c in chains] == [r.token_ids for r in ref_chains]
    assert all(len(set(c)) > 5 for c in chains)  # not a repeated token
    h_T, logp = engine.chain_states(prompts, chains)
    ref_h, ref_logp = _hf_chain_logp(new, prompts, chains)
    assert (h_T - ref_h.float()).abs().max().item() < TOL
    assert max((torch.tensor(a) - b).abs().max().item() for a, b in zip(logp, ref_logp, strict=True)) < TOL

    # A second sync through the same group restores the original weights.
    sent, received = learner.sync(engine, _checkpoint_state(tiny_model), bucket_bytes=64 * 1024)
    assert received == sent
    with torch.no_grad():
        ref = tiny_model.last_hidden(seqs).float()
    assert (engine.last_hidden(seqs) - ref).abs().max().item() < TOL


def test_lora_delta_update_equals_the_full_sync_of_the_merged_model(engine, tiny_model, tiny_model_dir, seqs):
    """LoRA on q, v and gate only: vLLM fuses q/k/v and gate/up, so the receiver reloads k and up from its base
    weights with them (a partly loaded fused layer would be processed with shards never written)."""
    from tests.test_lora_delta import _lora_export, sync_delta

    model, export = _lora_export(tiny_model_dir, targets=("q_proj", "v_proj", "gate_proj"))
    before = engine.last_hidden(seqs)
    sent, received = sync_delta(engine, export)
    assert sent == received
    after_delta = engine.last_hidden(seqs)
    merged = DualHeadModel_from(model.merge_and_unload(), tiny_model)
    with torch.no_grad():
        ref = merged.last_hidden(seqs).float()
    assert (after_delta - ref).abs().max().item() < TOL
    assert (after_delta - before).abs().max().item() > 1e-3  # really changed
    # The same merged weights through a full sync: the engine computes exactly the same states.
    learner = _Learner(engine)
    full = _checkpoint_state(merged)
    sent, received = learner.sync(engine, full, bucket_bytes=64 * 1024)
    assert sent == received
    assert torch.equal(engine.last_hidden(seqs), after_delta)
    # Leave the module's engine as the other tests expect it: the base weights.
    sent, received = learner.sync(engine, _checkpoint_state(tiny_model), bucket_bytes=64 * 1024)
    assert (engine.last_hidden(seqs) - before).abs().max().item() < TOL


def DualHeadModel_from(hf_model, like):  # noqa: N802 - reads as the constructor it wraps
    """A DualHeadModel around ``hf_model`` with ``like``'s tokenizer and settings."""
    from r2ec.model import DualHeadModel

    return DualHeadModel(hf_model.eval(), like.tokenizer, tau=like.tau, marker=like.marker)
