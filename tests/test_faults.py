"""Faults on a real local Ray cluster: a rollout worker killed mid-run is replaced and the run goes on unchanged; a
learner rank killed mid-run fails the run in seconds, naming the rank (a colocated actor, rollout worker and learner
rank at once, too); and (vLLM) a surviving engine re-joins a
rebuilt weight-sync group.

One embedded Ray for the module (each start costs tens of seconds on a small machine); every System in it starts
after the previous one's actors are gone, since they reuse the actor names. The data is a 30-item catalogue written
here, so encoding the item table (every run does, at least twice) takes no time.
"""

import json
import threading
import time
from pathlib import Path

import pytest

from driver.remote import ClusterError
from r2ec.config import load_config
from r2ec.testing import write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root, users=12, items_per_user=6)
    return root


def fault_cfg(tiny_model_dir, data_dir, out_dir, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"run.output_dir={out_dir}", "rollout.engine=hf",
        "data.source=files", f"data.files.interactions={data_dir / 'inter.csv'}",
        f"data.files.items={data_dir / 'items.csv'}", f"data.cache_dir={data_dir / 'cache'}",
        "learner.max_steps=3", "eval.valid_every=null", "eval.max_samples=4", "eval.valid_max_samples=4",
        *overrides])


@pytest.fixture(scope="module")
def ray_session(tiny_model_dir, data_dir, tmp_path_factory):
    import ray

    from driver.remote import connect

    connect(fault_cfg(tiny_model_dir, data_dir, tmp_path_factory.mktemp("ray")), log=print)
    yield
    ray.shutdown()


@pytest.fixture
def fresh_names(ray_session):
    """Wait until the previous System's named actors are gone (a kill frees the name a moment later)."""
    import ray

    deadline = time.monotonic() + 60
    while ray.util.list_named_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray.util.list_named_actors(), ray.util.list_named_actors()


def _step_records(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward_mean" in r]


def _kill_at(method: str, call_number: int, actor: str, monkeypatch, killed: list) -> None:
    """Kill ``actor`` as System.``method`` starts its ``call_number``-th call (1-based), from another thread, so the
    kill lands while the call's remote work is being issued or is running."""
    import ray

    from driver.system import System

    original = getattr(System, method)
    calls = [0]

    def wrapped(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call_number:
            def kill():
                ray.kill(ray.get_actor(actor), no_restart=True)
                killed.append((actor, time.monotonic()))

            threading.Thread(target=kill, daemon=True).start()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(System, method, wrapped)


@pytest.mark.ray
def test_rollout_worker_killed_mid_run_is_replaced_and_the_run_is_unchanged(
        tiny_model_dir, data_dir, tmp_path, fresh_names, monkeypatch):
    import ray

    from driver.loop import train

    overrides = ("cluster.rollout.num_workers=2", "cluster.learner.num_workers=1", "cluster.rollout.max_restarts=2")

    # The reference: the same run, nothing killed.
    reference = tmp_path / "reference"
    train(fault_cfg(tiny_model_dir, data_dir, reference, *overrides), log=print)
    expected = _step_records(reference)

    deadline = time.monotonic() + 60
    while ray.util.list_named_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    # rollout-0 dies as step 2's generate starts, rollout-1 as step 3's weight sync starts: both paths recover.
    killed: list = []
    _kill_at("generate", 2, "rollout-0", monkeypatch, killed)
    _kill_at("sync_weights", 3, "rollout-1", monkeypatch, killed)
    faults: list[str] = []
    out = tmp_path / "faulty"
    result = train(fault_cfg(tiny_model_dir, data_dir, out, *overrides),
                   log=lambda m: (faults.append(m) if m.startswith("fault:") else None, print(m)))

    assert [a for a, _ in killed] == ["rollout-0", "rollout-1"]
    assert result["steps"] == 3
    got = _step_records(out)
    assert [r["step"] for r in got] == [1, 2, 3]  # every step once: none lost, none counted twice
    assert [r["weight_version"] for r in got] == [0, 1, 2]
    # Seeds are fixed per chunk by the driver and the replacement gets the current weights: the same chains,
    # hence the same rewards and losses as the run that lost nothing.
    for r, e in zip(got, expected, strict=True):
        for key in ("reward_mean", "reward_std", "loss_token", "chain_len_mean"):
            assert r[key] == pytest.approx(e[key], rel=1e-6, abs=1e-9), (r["step"], key)
    assert any("rollout worker 0 died during generate" in m for m in faults), faults
    assert any("rollout worker 1 died during weight sync" in m for m in faults), faults
    test_ref = json.loads((reference / "eval_test.json").read_text())
    test_got = json.loads((out / "eval_test.json").read_text())
    assert test_got["ndcg@10"] == pytest.approx(test_ref["ndcg@10"], abs=1e-9)


@pytest.mark.ray
def test_rollout_worker_killed_during_the_overlapped_rollout_is_replaced(
        tiny_model_dir, data_dir, tmp_path, fresh_names, monkeypatch):
    """rollout.async: rollout-0 dies while it samples step 2's chains during step 1's learner update. It is replaced
    as in the synchronous loop; the replacement was brought to the weights while the learner changed them, so that
    rollout is discarded and step 2's is sampled again after the sync (on-policy). No step is lost or repeated."""
    from driver.loop import train

    overrides = ("cluster.rollout.num_workers=2", "cluster.learner.num_workers=1", "cluster.rollout.max_restarts=2",
                 "rollout.async=true", "recpo.off_policy=tis")
    killed: list = []
    _kill_at("generate", 2, "rollout-0", monkeypatch, killed)  # call 1: step 1's own rollout; call 2: step 2's
    faults: list[str] = []
    out = tmp_path / "faulty"
    result = train(fault_cfg(tiny_model_dir, data_dir, out, *overrides),
                   log=lambda m: (faults.append(m) if m.startswith("fault:") else None, print(m)))
    assert [a for a, _ in killed] == ["rollout-0"] and result["steps"] == 3
    got = _step_records(out)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["ahead_discarded"] for r in got] == [1.0, 0.0, 0.0]
    assert [r["weight_staleness"] for r in got] == [0.0, 0.0, 1.0]  # step 2 resampled with step 1's weights
    assert [r["weight_version"] for r in got] == [0, 1, 1]
    assert any("rollout worker 0 died during generate" in m for m in faults), faults


def _await_dead(name: str) -> None:
    import ray

    deadline = time.monotonic() + 60
    while name in ray.util.list_named_actors() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_chunk_from_other_weights_is_refused_naming_its_worker():
    from driver.remote import check_weight_versions

    check_weight_versions([4, 4, 4], [0, 1, 0], expected=4)
    with pytest.raises(ClusterError, match="rollout worker 1 sampled with the weights of version 3, expected version 4"):
        check_weight_versions([4, 3, 4], [0, 1, 0], expected=4)


@pytest.mark.ray
def test_rollout_restarts_are_events_and_bounded(tiny_model_dir, data_dir, tmp_path, fresh_names, monkeypatch):
    import ray

    from driver import sync_wait
    from driver.system import System

    cfg = fault_cfg(tiny_model_dir, data_dir, tmp_path, "cluster.rollout.num_workers=2",
                    "cluster.learner.num_workers=1", "cluster.rollout.max_restarts=2")
    items = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    prompts = [[20, 21, 22, 23], [24, 25], [26, 27, 28], [29, 30, 31, 32, 33]]
    with System(cfg, "cpu", log=print) as system:
        before = system.encode_items(items)
        system.sync_weights(version=7)
        chains = system.generate(prompts, group_size=2, seed=11, weight_version=7)
        ray.kill(ray.get_actor("rollout-0"), no_restart=True)
        _await_dead("rollout-0")  # ray.kill is asynchronous: the next call must be the one that meets the death
        after = system.encode_items(items)  # its one chunk goes to worker 0: replaced, re-synced, re-issued
        assert (after - before).abs().max() < 1e-5  # version 7 is the learner's untrained weights
        assert system.weight_version == 7
        # The replacement samples exactly what the dead worker did: seeds are the driver's, per chunk.
        again = system.generate(prompts, group_size=2, seed=11, weight_version=7)
        assert again.chain_ids == chains.chain_ids and again.weight_version == chains.weight_version == 7
        with pytest.raises(ClusterError, match=r"rollout worker \d sampled with the weights of version 7, expected "
                                               r"version 8"):
            system.generate(prompts, group_size=2, seed=11, weight_version=8)
        [event] = system.drain_events()
        assert event["worker"] == 0 and event["call"] == "item encoding" and event["cause"] == "died"
        assert event["deaths"] == 1 and event["restart_s"] > 0 and "ray.kill" in event["reason"]
        assert system.drain_events() == []

        # A worker that dies inside the sync group (here: the check before the sync is skipped once): learner rank
        # 0's broadcast fails, the other worker may be left waiting for buckets that never come (then it is
        # replaced too, after the grace period); the sync is redone for everyone on a new group.
        monkeypatch.setattr(sync_wait, "_SYNC_GRACE_S", 3.0)
        check = System._rollout_get
        skipped: list = []

        def skip_first_check(self, refs, timeout_s, what):
            if what.startswith("weight sync: checking") and not skipped:
                skipped.append(what)
                return [None] * len(refs)
            return check(self, refs, timeout_s, what)

        monkeypatch.setattr(System, "_rollout_get", skip_first_check)
        ray.kill(ray.get_actor("rollout-1"), no_restart=True)
        _await_dead("rollout-1")
        system.sync_weights(version=8)
        assert skipped
        events = system.drain_events()
        assert (events[0]["worker"], events[0]["call"], events[0]["cause"]) == (1, "weight sync", "died"), events
        assert "receive_weights" in events[0]["reason"]
        assert all(e["cause"] == "stuck" and e["worker"] == 0 for e in events[1:]), events
        assert [ray.get(a.ready.remote(), timeout=60)["weight_version"] for a in system.rollouts] == [8, 8]
        assert (system.encode_items(items) - before).abs().max() < 1e-5

        ray.kill(ray.get_actor("rollout-0"), no_restart=True)
        _await_dead("rollout-0")
        with pytest.raises(ClusterError, match=r"rollout worker 0 died during item encoding .*max_restarts=2"):
            system.encode_items(items)


@pytest.mark.ray
def test_learner_rank_killed_mid_run_fails_fast_naming_it(tiny_model_dir, data_dir, tmp_path, fresh_names,
                                                          monkeypatch):
    from driver.loop import train

    # learner-1 dies as step 2's learner step starts: learner rank 0 is then left waiting in a collective with it
    # (up to learner.timeout_s, 300 s here), which a plain ray.get on both ranks would wait out.
    killed: list = []
    _kill_at("train_step", 2, "learner-1", monkeypatch, killed)
    cfg = fault_cfg(tiny_model_dir, data_dir, tmp_path, "cluster.rollout.num_workers=1",
                    "cluster.learner.num_workers=2")
    with pytest.raises(ClusterError) as info:
        train(cfg, log=print)
    elapsed = time.monotonic() - killed[0][1]
    message = str(info.value)
    assert "learner rank 1 died during learner train_step" in message
    assert "r2ec train --resume auto" in message
    assert elapsed < 60, elapsed
    assert [r["step"] for r in _step_records(tmp_path)] == [1]


@pytest.mark.ray
def test_colocated_actor_killed_while_sampling_fails_the_run_as_a_learner_rank(tiny_model_dir, data_dir, tmp_path,
                                                                              fresh_names, monkeypatch):
    from driver.loop import train

    # Colocated, rollout worker 0 is learner rank 0: its death is not a rollout restart but a learner death.
    killed: list = []
    _kill_at("generate", 2, "colocated-0", monkeypatch, killed)
    cfg = fault_cfg(tiny_model_dir, data_dir, tmp_path, "cluster.colocate=true", "cluster.rollout.num_workers=1",
                    "cluster.learner.num_workers=1")
    with pytest.raises(ClusterError) as info:
        train(cfg, log=print)
    message = str(info.value)
    assert "learner rank 0 died during generate" in message and "r2ec train --resume auto" in message
    assert time.monotonic() - killed[0][1] < 60
    assert [r["step"] for r in _step_records(tmp_path)] == [1]


@pytest.mark.vllm
def test_vllm_engine_rejoins_a_rebuilt_sync_group(tiny_model_dir, tiny_model):
    """A surviving vLLM engine is handed a new SyncGroup after a replacement: it drops the old group (inside
    vLLM's worker) and takes the next broadcast on the new one."""
    pytest.importorskip("vllm")
    import socket

    from r2ec.config import ModelConfig, RolloutConfig
    from r2ec.weight_sync import SyncGroup, close_group, meta_of, open_group, send
    from rollout.vllm_engine import VllmEngine

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    state = dict(tiny_model.model.state_dict())
    state.setdefault("lm_head.weight", tiny_model.model.get_output_embeddings().weight)
    metas = [meta_of(name, t) for name, t in state.items()]

    def learner_side(info, old, box):
        close_group(old)
        group = open_group(info, 0)
        box.append((group, send(group, metas, iter(state.items()), 64 * 1024)))

    engine = VllmEngine(ModelConfig(name_or_path=str(tiny_model_dir)), RolloutConfig(), seed=0, device="cpu",
                        extra_llm_kwargs=dict(max_num_batched_tokens=512, max_num_seqs=4, max_model_len=512))
    try:
        old = None
        for _ in range(2):  # the first group, then the rebuilt one on a fresh port
            info = SyncGroup("127.0.0.1", free_port(), world_size=2, backend="gloo", timeout_s=60)
            box: list = []
            thread = threading.Thread(target=learner_side, args=(info, old, box), daemon=True)
            thread.start()
            engine.join_sync_group(info, first_rank=1)
            received = engine.receive_weights(metas, 64 * 1024)
            thread.join(timeout=60)
            assert box and received == box[0][1]
            old = box[0][0]
    finally:
        engine.close()
