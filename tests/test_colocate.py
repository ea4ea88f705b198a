"""The colocated mode (``cluster.colocate``): config validation, the same-host weight hand-off, and whole runs.

The runs are the real thing on CPU (embedded Ray, DeepSpeed ranks, HF or vLLM engines inside the learner ranks'
processes): colocated training with the HF engine must equal the separate-process run step for step, and a colocated
vLLM run must train with its engine holding the learner's weights after every hand-off.
"""

import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from r2ec.config import ConfigError, load_config
from r2ec.weight_share import ALIGN, checksum, file_buffer, layout, open_file_buffer, pack, views
from r2ec.weight_sync import TensorMeta, meta_of

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "x"}, "data": {"source": "movielens100k",
                                                     "prompt": {"category": "movies", "item_singular": "movie"}}}


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, message", [
    (["cluster.rollout.num_workers=2"], r"cluster.rollout.num_workers \(2\) must equal cluster.learner.num_workers"),
    (["cluster.rollout.tensor_parallel_size=2", "rollout.engine=vllm"], "tensor_parallel_size must be 1"),
    (["learner.zero_stage=3"], "use learner.zero_stage 0-2, or rollout.engine 'vllm'"),
])
def test_colocate_rejects_what_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data=MINIMAL, overrides=["cluster.colocate=true", *overrides])


def test_colocate_accepts_zero3_with_vllm_and_ignores_rollout_resources():
    cfg = load_config(data=MINIMAL, overrides=["cluster.colocate=true", "learner.zero_stage=3", "rollout.engine=vllm",
                                               "cluster.rollout.gpus_per_worker=0.5"])
    assert cfg.cluster.colocate and cfg.learner.zero_stage == 3


def test_fractional_gpus_point_at_colocate():
    with pytest.raises(ConfigError, match="set cluster.colocate=true"):
        load_config(data=MINIMAL, overrides=["cluster.rollout.gpus_per_worker=0.5"])


def test_one_gpu_workstation_overrides_validate_on_every_gpu_config():
    # docs/cluster.md's one-GPU command line, on every shipped GPU config.
    for path in sorted((ROOT / "configs" / "gpu").glob("*.yaml")):
        cfg = load_config(path, ["cluster.colocate=true", "cluster.learner.num_workers=1",
                                 "cluster.rollout.num_workers=1", "rollout.vllm.gpu_memory_utilization=0.35"])
        assert cfg.cluster.colocate, path


# ------------------------------------------------------------------------------------------------ weight hand-off
def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(5, 3, generator=g)), ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c.weight", torch.randn(3, generator=g).to(torch.float16)), ("d.weight", torch.randn(40, generator=g))]


def test_layout_aligns_every_tensor():
    metas = [meta_of(n, t) for n, t in _weights()]
    offsets, total = layout(metas)
    # hand-derived: 60 bytes -> next at 64; 14 -> 128; 6 -> 192; 160 -> ends at 352
    assert offsets == [0, 64, 128, 192] and total == 352
    assert all(o % ALIGN == 0 for o in offsets)


def test_pack_then_views_round_trip_in_the_metas_dtype():
    weights = _weights()
    metas = [meta_of(n, t) for n, t in weights]
    metas[0] = TensorMeta("a.weight", "bfloat16", (5, 3))  # packed in the engine's dtype, not the learner's
    buf = torch.full((layout(metas)[1],), 255, dtype=torch.uint8)
    total = pack(buf, metas, iter(weights))
    assert total == checksum(buf)
    got = dict(views(buf, metas))
    assert got["a.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["a.weight"], weights[0][1].to(torch.bfloat16), atol=0, rtol=0)
    for name, t in weights[1:]:
        assert torch.equal(got[name], t), name


def test_pack_names_the_tensor_that_does_not_match():
    weights = _weights()
    metas = [meta_of(n, t) for n, t in weights]
    buf = torch.zeros(layout(metas)[1], dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"expected b.bias \(7,\), got c.weight"):
        pack(buf, metas, iter([weights[0], weights[2]]))
    with pytest.raises(RuntimeError, match="the model ended before c.weight"):
        pack(buf, metas, iter(weights[:2]))
    with pytest.raises(RuntimeError, match="more tensors than metas"):
        pack(buf, metas[:3], iter(weights))


def _read_in_child(path, nbytes, metas, queue):
    buf = open_file_buffer(path, nbytes)
    # plain values back: the child compares against the same deterministic weights itself
    expected = dict(_weights())
    queue.put((checksum(buf), {name: bool(torch.equal(t, expected[name])) for name, t in views(buf, metas)}))


def test_file_buffer_is_read_by_another_process():
    weights = _weights()
    metas = [meta_of(n, t) for n, t in weights]
    nbytes = layout(metas)[1]
    buf, path = file_buffer(nbytes)
    try:
        sent = pack(buf, metas, iter(weights))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(path, nbytes, metas, queue))
        child.start()
        got, equal = queue.get(timeout=120)
        child.join(60)
        assert got == sent
        assert equal == {name: True for name, _ in weights}
        with pytest.raises(ValueError, match=f"holds {nbytes} bytes, expected {nbytes + 1}"):
            open_file_buffer(path, nbytes + 1)
    finally:
        os.remove(path)


# ------------------------------------------------------------------------------------------------ whole runs
def _cfg(tiny_model_dir, out_dir, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={out_dir}", "learner.max_steps=3",
                        "eval.valid_every=2", *overrides])


def _records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# What must agree between two runs of the same config: everything the algorithm computes (not timings, not layout).
_SAME = ("reward_mean", "reward_std", "r_d_mean", "r_c_mean", "loss_token", "loss_item", "chain_len_mean",
         "chains_distinct", "grad_norm", "valid/ndcg@10", "valid/hit@10", "test/ndcg@10", "test/hit@20")


@pytest.mark.ray
def test_colocated_hf_training_equals_separate_processes(tiny_model_dir, tmp_path):
    """Same config, same seed: 2 rollout workers + 2 learner ranks in 4 processes, or 2 processes each holding a
    learner rank and an engine on its module. Every step's rewards, losses and chains, and every evaluation, agree."""
    from driver.loop import train

    separate = train(_cfg(tiny_model_dir, tmp_path / "separate"))
    colocated = train(_cfg(tiny_model_dir, tmp_path / "colocated", "cluster.colocate=true"))
    a, b = _records(tmp_path / "separate"), _records(tmp_path / "colocated")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b, strict=True):
        for key in _SAME:
            if key in ra:
                assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-6), (ra["step"], key, ra[key], rb[key])
                compared += 1
    assert compared >= 3 * 8, compared
    assert separate["test"]["ndcg@10"] == pytest.approx(colocated["test"]["ndcg@10"], abs=1e-6)
    # the run really trained (a broken hand-off would also give equal runs if neither moved)
    steps = [r for r in b if "loss_token" in r]
    assert len(steps) == 3 and len({r["reward_mean"] for r in steps}) > 1


@pytest.mark.ray
@pytest.mark.vllm
def test_colocated_vllm_training_hands_weights_over_shared_memory(tiny_model_dir, tmp_path):
    """vLLM inside each of two learner ranks' processes (ZeRO-3: every rank gathers the full weights for its own
    engine), LoRA merged into a shared-memory hand-off after every step: each engine's log-probs and h_T stay those of
    the learner (the alarms), and the run trains end to end."""
    from driver.loop import train

    cfg = _cfg(tiny_model_dir, tmp_path, "cluster.colocate=true", "rollout.engine=vllm", "model.lora.enabled=true",
               "learner.zero_stage=3")
    before = _handoff_files()
    result = train(cfg)
    steps = [r for r in _records(tmp_path) if "loss_token" in r]
    assert [r["weight_version"] for r in steps] == [0, 1, 2]
    for r in steps:
        assert r["alarm_logp_abs_diff_mean"] < 1e-4 and r["alarm_h_T_max_diff"] < 1e-4, r
        assert math.isfinite(r["loss_item"]) and r["time_sync_s"] > 0
    assert 0 <= result["test"]["ndcg@10"] <= 1
    assert _handoff_files() == before  # every hand-off file was removed


def _handoff_files():
    from r2ec.weight_share import shm_dir

    return {p for p in os.listdir(shm_dir()) if p.startswith("r2ec-weights-")}
