"""The distributed system for real: Ray actors, HF and vLLM (CPU build) rollout engines, DeepSpeed learner ranks.

2 rollout workers + 2 learner ranks on an embedded local Ray (127.0.0.1), a tiny model built in code, MovieLens-100k.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from driver.remote import ClusterError
from driver.system import System
from r2ec.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tiny_model_dir, out_dir, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={out_dir}", *overrides])


def _inputs(cfg, n):
    from transformers import AutoTokenizer

    from driver.steps import batch_inputs
    from r2ec.data.prepare import prepare_from_config
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    prepared = prepare_from_config(cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    titles = list(prepared.items["title"])
    items = item_prompt_ids(builder, tokenizer, prepared.items)
    batches = [batch_inputs([prepared.splits["train"][i] for i in range(lo, lo + cfg.learner.prompts_per_step)],
                            prepared, builder, tokenizer, titles) for lo in range(0, n * 4, 4)]
    return items, batches


def _assert_workers_equal_learner(system, prompts):
    """After a sync every rollout engine holds the learner's weights: same greedy chains, h_T and log-probs."""
    import ray

    from driver.remote import get

    # Under ZeRO-3 a forward pass is collective: every learner rank takes part.
    chains = get([a.greedy.remote(prompts[:2], 8) for a in system.learners], 300, "learner greedy")[0]
    learner = get([a.chain_states.remote(prompts[:2], chains) for a in system.learners], 300, "learner states")[0]
    for w in system.rollouts:
        got_chains, _ = ray.get(w.greedy.remote(prompts[:2], 8))
        assert [c.token_ids for c in got_chains] == chains
        h_T, logp = ray.get(w.chain_states.remote(prompts[:2], chains))
        torch.testing.assert_close(h_T, learner[0], atol=1e-4, rtol=1e-4)
        for a, b in zip(logp, learner[1], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)


def _assert_listeners_on_loopback():
    """Every socket that this process and its children (Ray's daemons and workers) listen on is 127.0.0.1."""
    import ipaddress
    import os

    import psutil

    procs = [psutil.Process(os.getpid()), *psutil.Process(os.getpid()).children(recursive=True)]
    pids = {p.pid for p in procs}
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "found no listening sockets at all: the check itself is broken"
    outside = [(pid, addr) for pid, addr in listening if not ipaddress.ip_address(addr.ip).is_loopback
               and addr.ip != "::ffff:127.0.0.1"]
    assert not outside, f"listening beyond 127.0.0.1: {outside}"


def _assert_pinned(actors, cores: list[int]):
    """Actor i's process, each of its threads and every process it started (vLLM's engine core and worker) run on
    cores[i] only."""
    import psutil

    from driver.remote import get

    def threads_affinity(_self):
        return os.getpid(), {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}

    for actor, core in zip(actors, cores, strict=True):
        pid, per_thread = get([actor.__ray_call__.remote(threads_affinity)], 60, "affinity")[0]
        assert per_thread == {(core,)}, (pid, per_thread, core)
        for child in psutil.Process(pid).children(recursive=True):
            assert child.cpu_affinity() == [core], (child.name(), child.cpu_affinity(), core)


def _children(actors) -> list[str]:
    import psutil

    from driver.remote import get

    pids = get([a.__ray_call__.remote(lambda _self: os.getpid()) for a in actors], 60, "pids")
    return [c.name() for pid in pids for c in psutil.Process(pid).children(recursive=True)]


# The HF engine at ZeRO-2 only: its ZeRO-3 twin took 2 minutes of CI and tested nothing new (the learner gathers and
# broadcasts the same way whatever engine receives; vllm-3 covers ZeRO-3 with two ranks and two workers).
ENGINES_AND_STAGES = [
    pytest.param("hf", 2, marks=pytest.mark.ray),
    pytest.param("vllm", 2, marks=[pytest.mark.ray, pytest.mark.vllm]),
    pytest.param("vllm", 3, marks=[pytest.mark.ray, pytest.mark.vllm]),
]


@pytest.mark.parametrize("engine, stage", ENGINES_AND_STAGES)
def test_two_rollout_workers_two_learner_ranks(engine, stage, tiny_model_dir, tmp_path):
    from driver.remote import get
    from driver.steps import rl_step

    # Each worker pinned to a core of its own side's group (cluster.*.cpu_affinity), crossed so per-worker groups
    # are told apart from a shared one.
    cores = sorted(os.sched_getaffinity(0))[:2] * 2
    cfg = tiny_cfg(tiny_model_dir, tmp_path, f"rollout.engine={engine}", f"learner.zero_stage={stage}",
                   f"rollout.vllm.in_process={stage == 2}",
                   f"cluster.rollout.cpu_affinity='{cores[0]}|{cores[1]}'",
                   f"cluster.learner.cpu_affinity='{cores[1]}|{cores[0]}'")
    items, batches = _inputs(cfg, n=2)
    with System(cfg, "cpu", log=print) as system:
        _assert_pinned(system.rollouts, cores[:2])
        _assert_pinned(system.learners, cores[1:3])
        if engine == "vllm":
            # configs/tiny.yaml runs vLLM inside each rollout worker's process (rollout.vllm.in_process); the ZeRO-3
            # case runs vLLM's own engine core and model worker processes, the default, pinned with their worker.
            children = _children(system.rollouts)
            assert (not children) if stage == 2 else len(children) >= 4, children
        table = system.encode_items(items)
        system.set_items(items, table)
        before = get([a.fingerprint.remote() for a in system.learners], 300, "fingerprint")[0]
        updates = (torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1]))
        for version, (prompts, earlier, target) in enumerate(batches, start=1):
            rollout, results, timings = rl_step(system, cfg, prompts, earlier, target, updates, version)
            assert rollout.weight_version == version - 1 and len(rollout) == 4 * cfg.recpo.group_size
            for r in results:
                # The rewards the learner trains on come from the rollout's h_T; recomputed they agree.
                torch.testing.assert_close(r.rewards, r.rewards_learner, atol=1e-4, rtol=0)
                assert all(math.isfinite(v) for v in r.metrics.values()), r.metrics
                assert r.metrics["alarm_h_T_max_diff"] < 1e-4
                assert r.metrics["alarm_logp_abs_diff_mean"] < 1e-4
            updates = (torch.cat([r.table_updates_idx for r in results]),
                       torch.cat([r.table_updates for r in results]))
            assert updates[0].numel() > 0
        after = get([a.fingerprint.remote() for a in system.learners], 300, "fingerprint")[0]
        assert after != before
        _assert_workers_equal_learner(system, batches[0][0])
        _assert_listeners_on_loopback()  # Ray, DeepSpeed's store and gloo, the weight-sync group, vLLM


@pytest.mark.ray
@pytest.mark.vllm
def test_train_end_to_end_with_lora(tiny_model_dir, tmp_path, capfd):
    """The `r2ec train` path in miniature: vLLM workers, LoRA-delta weight sync (the worker merges the adapters:
    the learner/rollout alarms below prove it serves the learner's merged weights; the full sync of a LoRA model is
    tests/test_resume.py's), metrics and eval files; the console shows the run while the workers' output goes to the
    run folder's logs/."""
    from driver.loop import train

    cfg = tiny_cfg(tiny_model_dir, tmp_path, "rollout.engine=vllm", "model.lora.enabled=true",
                   "learner.weight_sync=lora_delta",
                   "cluster.rollout.num_workers=1", "cluster.learner.num_workers=1", "cluster.local_num_cpus=2",
                   "eval.valid_every=1")
    result = train(cfg)
    console = "".join(capfd.readouterr())
    assert "learner rank(s) (ZeRO-2) up in" in console and "step 2: valid" in console
    assert "(RolloutWorker" not in console and "(LearnerWorker" not in console, console[-3000:]
    rollout_log, learner_log = ((tmp_path / "logs" / f"{name}.log").read_text() for name in ("rollout-0", "learner-0"))
    assert "===== RolloutWorker: pid" in rollout_log and "vllm" in rollout_log.lower()  # the engine's own lines
    assert "===== LearnerWorker: pid" in learner_log and "deepspeed" in learner_log.lower()
    assert (tmp_path / "logs" / "driver.log").is_file()
    # the step timeline: every actor's phases per step; in the synchronous loop the sides take turns
    from driver.timeline import load_spans, timeline_command

    spans = load_spans(tmp_path)
    for step in (1, 2):
        phases = {(s["actor"], s["phase"]) for s in spans if s["step"] == step}
        assert {("rollout-0", "generate"), ("rollout-0", "hidden"), ("learner-0", "reward"), ("learner-0", "token"),
                ("learner-0", "item"), ("learner-0", "optimizer"), ("driver", "sync"),
                ("driver", "validate")} <= phases, phases
        rollout_end = max(s["end"] for s in spans if s["step"] == step and s["actor"] == "rollout-0")
        learner = [s for s in spans if s["step"] == step and s["actor"] == "learner-0"]
        sync = next(s for s in spans if s["step"] == step and s["phase"] == "sync")
        assert rollout_end <= min(s["start"] for s in learner) + 0.05  # one host: the clocks agree
        assert max(s["end"] for s in learner) <= sync["start"] + 0.05
    assert timeline_command(str(tmp_path), 2, None) == 0 and (tmp_path / "timeline.png").stat().st_size > 5000
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and [r["weight_version"] for r in steps] == [0, 1]
    for r in steps:
        for key in ("loss_token", "loss_item", "reward_std", "r_d_mean", "r_c_mean", "chain_len_mean",
                    "time_generate_s", "time_hidden_s", "time_sync_s", "tokens_per_s_rollout"):
            assert math.isfinite(r[key]), key
        assert r["reward_max_abs_diff_rollout_vs_learner"] < 1e-4
        assert r["alarm_logp_abs_diff_mean"] < 1e-4  # LoRA merged on the learner == the engine's weights
        assert 1 / 16 <= r["chains_distinct"] <= 1  # 4 users x G = 4 chains: 1/16 would mean one chain for all
    # every validation scores against a table encoded with the weights it validates (not a stale one)
    valid = [r for r in records if "valid/ndcg@10" in r]
    assert [(r["step"], r["valid/item_table_version"]) for r in valid] == [(1, 1), (2, 2)]
    assert all(0 < r["valid/reasoning_distinct_frac"] <= 1 for r in valid)
    assert any("test/hit@20" in r for r in records)
    for split in ("valid", "test"):
        saved = json.loads((tmp_path / f"eval_{split}.json").read_text())
        assert saved["num_samples"] == 8 and 0 <= saved["ndcg@10"] <= 1 and saved["item_table_version"] == 2
        assert saved["num_users"] == 8 and saved["ndcg@10_ci95"][0] <= saved["ndcg@10"]  # stratified: 8 users
    assert result["test"]["hit@20"] == saved["hit@20"]
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.ray
def test_more_workers_than_the_cluster_has_fails_fast(tiny_model_dir, tmp_path):
    import time

    cfg = tiny_cfg(tiny_model_dir, tmp_path, "cluster.rollout.num_workers=8")
    start = time.perf_counter()
    with pytest.raises(ClusterError, match=r"asks for 10 CPUs but the Ray cluster has 4"):
        with System(cfg, "cpu"):
            pass
    assert time.perf_counter() - start < 60


@pytest.mark.ray
def test_warmup_steps_then_recpo(tiny_model_dir, tmp_path):
    """2 warm-up steps, then 1 RecPO step, on 2 learner ranks: one record per step with its phase; no weight
    broadcast after warm-up step 1 (nothing uses the rollout engines then); the item-table refresh at step 2
    (recpo.refresh_every 2) and the RecPO step's rollout use the weights after step 2."""
    from driver.loop import train

    cfg = tiny_cfg(tiny_model_dir, tmp_path, "warmup.steps=2", "warmup.prompts_per_step=4", "learner.max_steps=1",
                   "cluster.rollout.num_workers=1", "cluster.local_num_cpus=3", "eval.max_samples=4",
                   "eval.valid_max_samples=4")
    result = train(cfg)
    assert result["steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "phase" in r]
    assert [(r["step"], r["phase"]) for r in steps] == [(1, "warmup"), (2, "warmup"), (3, "recpo")]
    for r in steps:
        assert math.isfinite(r["loss_item"]) and math.isfinite(r["grad_norm"]), r
    warm = steps[:2]
    assert all("reward_mean" not in r and "loss_token" not in r and "weight_version" not in r for r in warm)
    assert all(math.isfinite(r["target_rank_mean"]) for r in warm)
    assert warm[0]["time_sync_s"] == 0.0 and warm[1]["time_sync_s"] > 0  # synced for the refresh at step 2 only
    assert steps[2]["weight_version"] == 2 and math.isfinite(steps[2]["reward_mean"])
    assert steps[2]["reward_max_abs_diff_rollout_vs_learner"] < 1e-4  # the rollout engines hold step 2's weights
    valid = [r for r in records if "valid/ndcg@10" in r]
    assert [(r["step"], r["valid/item_table_version"]) for r in valid] == [(3, 3)]
    assert json.loads((tmp_path / "eval_test.json").read_text())["item_table_version"] == 3


@pytest.mark.ray
def test_frozen_item_table_is_the_initial_one_throughout(tiny_model_dir, tiny_model, tmp_path):
    """model.item_table frozen (and centred): the table encoded at start, minus its mean row, is the one every step,
    validation, test, checkpoint and export uses (no refresh; nothing written back), while the weights do train."""
    from safetensors.torch import load_file

    from driver.loop import train
    from r2ec.bundle import ExportError, load_item_table
    from r2ec.data.prepare import prepare_from_config
    from r2ec.export import export_checkpoint
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", "model.item_table=frozen", "model.center_items=true",
                   "warmup.steps=2", "warmup.prompts_per_step=4", "learner.max_steps=1", "cluster.rollout.num_workers=1",
                   "cluster.local_num_cpus=3", "eval.max_samples=4", "eval.valid_max_samples=4",
                   "eval.valid_at_start=true", "run.checkpoint_every=3")  # refresh_every 2 in tiny.yaml: unused
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "phase" in r]
    assert len(steps) == 3 and all("table_refresh_row_cos" not in r for r in steps)
    assert all(r["grad_norm"] > 0 for r in steps)
    assert steps[0]["time_sync_s"] == 0.0 and steps[1]["time_sync_s"] == 0.0  # no refresh needs the weights
    assert steps[2]["reward_max_abs_diff_rollout_vs_learner"] < 1e-4
    assert [r["valid/item_table_version"] for r in records if "valid/ndcg@10" in r] == [0, 0]
    assert json.loads((tmp_path / "run" / "eval_test.json").read_text())["item_table_version"] == 0

    prepared = prepare_from_config(cfg.data)
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    initial = tiny_model.encode_items(item_prompt_ids(builder, tiny_model.tokenizer, prepared.items))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    saved = load_file(str(ckpt / "item_table.safetensors"))
    centred = initial.float() - initial.float().mean(dim=0)
    torch.testing.assert_close(saved["h_items"], centred, atol=1e-4, rtol=1e-4)
    assert saved["updates_idx"].numel() == 0

    with pytest.raises(ExportError, match="model.item_table 'frozen'"):
        export_checkpoint(ckpt, tmp_path / "re-encoded", reencode_items=True, log=lambda *_: None)
    out = export_checkpoint(ckpt, tmp_path / "export", log=lambda *_: None)
    torch.testing.assert_close(load_item_table(out / "rec_head" / "item_table.safetensors")[0], saved["h_items"])
    assert json.loads((out / "r2ec.json").read_text())["item_table"]["source"] == "checkpoint"
