"""The DeepSpeed learner (learner/worker.py) on CPU: real ranks as spawned processes (gloo), a tiny random Llama.

What is checked, against values computed independently in the test process with ``DualHeadModel``:
- a train_step under ZeRO-2 and ZeRO-3 changes the parameters and returns finite metrics (with the default
  ``learner.pack_prompts``, against an unpacked reference: packing is exact, the groups' prompts and the item
  prompts' shared prefix alike; with the default ``learner.fuse_item_term``, and re-encoded it is the same step);
- sharded equals global: 2 ranks with half the users each take the same update as 1 rank with all users (ZeRO-2
  and ZeRO-3), and the reported gradient norm equals a plain-PyTorch reference of the RecPO loss;
- rewards from the learner's recomputed h_T equal the rollout's when the rollout used the same weights;
- LoRA: only the adapters change, and the broadcast weights equal peft's ``merge_and_unload``;
- the weight broadcast delivers the full (merged) state dict, ``lm_head.weight`` included, under ZeRO-3 at world
  size 2; unequal shards do not deadlock ZeRO-3 (padding micro-batches).

The item term gathers the other ranks' targets (learner/item_term.py), so the sharded runs give the ranks different
targets, one of them shared (candidates {5, 9} and {7, 9}, globally {5, 7, 9}): the invariant must still be exact.
The model temperature is 0.5 instead of 0.02 so the item term has a non-vanishing gradient on a random model.
"""

from __future__ import annotations

import pickle
import socket
import threading
import traceback
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from r2ec.algo.recpo import compute_advantages, fused_reward, item_loss, relabel_mask, token_loss
from r2ec.config import LearnerConfig, LoraConfig, ModelConfig, RecPOConfig
from r2ec.protocol import Rollout, TrainShard

G = 4
USERS = 4
ITEM_PREFIX = [11, 12, 13]  # packed once per row by the learner's item re-encoding (learner.pack_prompts)
TAU = 0.5
TARGETS = [5, 9, 9, 7]  # users 0,1 -> rank 0 and 2,3 -> rank 1: candidates {5, 9} and {7, 9}, the step's {5, 7, 9}
TIMEOUT_S = 420  # the first DeepSpeed init on a machine compiles a shm op (~1 min on 2 cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(model_dir: str, zero_stage: int, lora: bool = False, checkpointing: bool = False
             ) -> tuple[ModelConfig, LearnerConfig, RecPOConfig]:
    model = ModelConfig(name_or_path=model_dir, tau=TAU,
                        lora=LoraConfig(enabled=lora, r=4, alpha=8.0, dropout=0.0))
    learner = LearnerConfig(zero_stage=zero_stage, lr=1e-3, prompts_per_step=USERS, micro_batch_size=4,
                            gradient_checkpointing=checkpointing, timeout_s=TIMEOUT_S)
    return model, learner, RecPOConfig(group_size=G, relabel_topk=1)


# ---------------------------------------------------------------------------------------------- one step's data
def _make_step(dual, seed: int = 0) -> dict[str, Any]:
    """Random prompts and chains; h_T, logp and the item table from ``dual`` (the learner's initial weights)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(10, 400, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    items = [ITEM_PREFIX + ids(1, 7) for _ in range(24)]  # a shared prefix, as real item prompts have
    prompts = [ids(6, 11) for _ in range(USERS)]
    chains = [ids(2, 8) for _ in range(USERS * G)]
    appended = torch.zeros(USERS * G, dtype=torch.bool)
    appended[[1, 6]] = True  # their last token is an appended marker: no behaviour logp, no token loss
    with torch.no_grad():
        table = dual.encode_items(items)
        logp_full, mask_full, h_T = dual.chain_forward([prompts[r // G] for r in range(USERS * G)], chains)
    width = max(len(c) for c in chains)
    logp, logp_mask = torch.zeros(USERS * G, width), torch.zeros(USERS * G, width)
    for r, c in enumerate(chains):
        logp[r, :len(c)] = logp_full[r][mask_full[r].bool()]
        logp_mask[r, :len(c) - (1 if appended[r] else 0)] = 1.0
    history = torch.tensor([[0, 1, -1], [2, 3, 4], [6, -1, -1], [7, 8, 10]])
    return dict(items=items, table=table, prompts=prompts, chains=chains, appended=appended, logp=logp,
                logp_mask=logp_mask, h_T=h_T.float(), history=history, target=torch.tensor(TARGETS))


def _shard(step: dict[str, Any], users: list[int]) -> TrainShard:
    """The part of the step for ``users`` (whole groups) with the step's GLOBAL normalisers."""
    rows = [u * G + j for u in users for j in range(G)]
    idx = torch.tensor(rows)
    rollout = Rollout([step["chains"][r] for r in rows], step["logp"][idx], step["logp_mask"][idx],
                      step["appended"][idx], step["h_T"][idx], weight_version=0)
    d = step["table"].shape[1]
    return TrainShard([step["prompts"][u] for u in users], rollout, step["history"][users], step["target"][users],
                      num_tokens=int(step["logp_mask"].sum()), num_chains=USERS * 1,
                      table_updates_idx=torch.zeros(0, dtype=torch.long), table_updates=torch.zeros(0, d))


def _reference(dual, step: dict[str, Any]) -> dict[str, Any]:
    """Rewards and the pre-clipping gradient norm of the whole step's RecPO loss, in plain PyTorch."""
    recpo = RecPOConfig(group_size=G, relabel_topk=1)
    target = step["target"].repeat_interleave(G)
    scores = dual.item_scores(step["h_T"], step["table"], step["history"].repeat_interleave(G, 0), target)
    rewards = fused_reward(scores, target, recpo.beta, recpo.k_r).rewards
    adv = compute_advantages(rewards.view(USERS, G), recpo.advantage)
    sel = relabel_mask(adv, recpo.relabel_topk).flatten().nonzero().flatten().tolist()
    adv = adv.flatten()
    prompts = [step["prompts"][r // G] for r in range(USERS * G)]
    dual.model.zero_grad()
    logp, _, _ = dual.chain_forward(prompts, step["chains"])
    mask = torch.zeros_like(logp)
    for r, c in enumerate(step["chains"]):
        mask[r, len(prompts[r]) - 1: len(prompts[r]) - 1 + len(c)] = step["logp_mask"][r, :len(c)]
    loss = token_loss(logp, logp.detach(), adv, mask, num_tokens=int(step["logp_mask"].sum())).loss
    items, label = torch.unique(step["target"], return_inverse=True)
    h_user = dual.last_hidden([list(prompts[r]) + step["chains"][r] for r in sel])
    h_items = dual.last_hidden([step["items"][v] for v in items.tolist()])
    loss_item = item_loss(h_user, h_items, label.repeat_interleave(G)[sel], adv[sel],
                          torch.ones(len(sel), dtype=torch.bool), TAU, num_chains=USERS)
    (loss + loss_item).backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in dual.model.parameters() if p.grad is not None])
    dual.model.zero_grad()
    return {"rewards": rewards, "grad_norm": float(grad_norm), "loss_token": float(loss.detach()),
            "loss_item": float(loss_item.detach())}


# ---------------------------------------------------------------------------------------------- rank processes
def _scenario_step(worker, rank: int, payload: dict[str, Any]) -> dict[str, Any]:
    step, users = payload["step"], payload["users"][rank]
    worker.set_items(step["items"], step["table"])
    before = worker.full_state_dict()
    fingerprint = worker.fingerprint()
    result = worker.train_step(_shard(step, users))
    out = {"result": result, "before": before, "after": worker.full_state_dict(),
           "fingerprints": (fingerprint, worker.fingerprint()),
           "local_numel": sum(p.numel() for p in worker.dual.model.parameters())}
    if payload.get("unequal_then_broadcast"):
        # Unequal shards (3 users vs 1): rank 1 runs padding micro-batches; must not deadlock ZeRO-3.
        uneven = [[0, 1, 2], [3]][rank]
        out["result2"] = worker.train_step(_shard(step, uneven))
        chains = step["chains"][: 8 if rank == 0 else 3]
        out["chain_states"] = worker.chain_states([step["prompts"][r // G] for r in range(len(chains))], chains)
        out["metas"] = worker.weight_metas()
        out["final"] = worker.full_state_dict()
        out["checksum"] = worker.broadcast_weights(payload["sync"] if rank == 0 else None, bucket_bytes=20_000)
        # More collectives with unequal work per rank: generation (synced) and item encoding (padding batches).
        out["greedy"] = worker.greedy(step["prompts"][: 2 if rank == 0 else 1], max_new_tokens=6)
        out["encoded"] = worker.encode_items(step["items"][: 5 if rank == 0 else 3], batch_size=2)
    elif rank == 0:
        out["sync_address"] = worker.sync_address()
    return out


def _scenario_lora(worker, rank: int, payload: dict[str, Any]) -> dict[str, Any]:
    step, users = payload["step"], payload["users"][rank]
    worker.set_items(step["items"], step["table"])
    base_before, adapters_before = worker.full_state_dict(merged=False), worker.trainable_state_dict()
    result = worker.train_step(_shard(step, users))
    out = {"result": result, "base_before": base_before, "adapters_before": adapters_before,
           "base_after": worker.full_state_dict(merged=False), "adapters_after": worker.trainable_state_dict(),
           "merged": worker.full_state_dict(merged=True), "metas": worker.weight_metas()}
    sync = payload["sync"] if rank == 0 else None
    if payload.get("delta"):  # the full merge first, then learner.weight_sync's LoRA delta on the same group
        out["checksum"] = worker.export.broadcast(sync, 20_000, worker.device, delta=False)
        out["plan"] = worker.delta_plan()
        out["delta_checksum"] = worker.broadcast_weights(sync, bucket_bytes=20_000)
    else:
        out["checksum"] = worker.broadcast_weights(sync, bucket_bytes=20_000)
    return out


def _scenario_kl(worker, rank: int, payload: dict[str, Any]) -> dict[str, Any]:
    step, users = payload["step"], payload["users"][rank]
    worker.set_items(step["items"], step["table"])
    first = worker.train_step(_shard(step, users)).metrics
    after_first = worker.trainable_state_dict()
    second = worker.train_step(_shard(step, users)).metrics
    return {"first": first, "second": second, "after_first": after_first,
            "after_second": worker.trainable_state_dict()}


SCENARIOS = {"step": _scenario_step, "lora": _scenario_lora, "kl": _scenario_kl}


def _rank_main(scenario: str, rank: int, world_size: int, port: int, cfgs: tuple, payload: dict, queue) -> None:
    torch.set_num_threads(1)  # one core per rank on a 2-core machine
    try:
        from learner.worker import LearnerWorker

        worker = LearnerWorker(*cfgs, rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port,
                               device="cpu", seed=0)
        # Plain pickle (by value): torch's queue pickler would share memory that dies with this process.
        queue.put((rank, pickle.dumps(SCENARIOS[scenario](worker, rank, payload))))
    except BaseException:  # noqa: BLE001 - report the traceback instead of letting the parent time out
        queue.put((rank, traceback.format_exc()))


def gather_ranks(procs: list, queue, timeout_s: float) -> dict[int, Any]:
    """Each spawned rank's pickled result by rank (started processes); a rank's traceback fails the test and
    every process still alive is killed."""
    try:
        results: dict[int, Any] = {}
        for _ in procs:
            rank, blob = queue.get(timeout=timeout_s)
            if isinstance(blob, str):
                pytest.fail(f"learner rank {rank} failed:\n{blob}")
            results[rank] = pickle.loads(blob)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


def _run_ranks(scenario: str, world_size: int, cfgs: tuple, payload: dict, receiver=None) -> list[dict]:
    """Run ``scenario`` on ``world_size`` spawned ranks; ``receiver()`` (the weight sync's other end) runs in a
    thread here meanwhile, so a failing rank is reported at once instead of after the sync's timeout. Returns each
    rank's result in rank order; rank 0's has the receiver's result under "received"."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(scenario, r, world_size, port, cfgs, payload, queue), daemon=True)
             for r in range(world_size)]
    received: list = []
    thread = None
    if receiver is not None:
        thread = threading.Thread(target=lambda: received.append(receiver()), daemon=True)
        thread.start()
    for p in procs:
        p.start()
    results = gather_ranks(procs, queue, TIMEOUT_S)
    out = [results[r] for r in range(world_size)]
    if thread is not None:
        thread.join(timeout=60)
        assert received, "the weight-sync receiver did not finish"
        out[0]["received"] = received[0]
    return out


def _receiver(info, metas, delta=None, model_dir: str | None = None):
    """The rollout side of the weight sync: join as rank 1 and collect every tensor (with the checksum); with
    ``delta`` (a DeltaPlan), then a LoRA-delta sync merged as a rollout worker merges it."""
    from r2ec.lora_delta import DeltaApplier
    from r2ec.weight_sync import open_group, receive

    def run() -> tuple:
        group = open_group(info, 1)
        box: list[int] = []
        got = {name: t.clone() for name, t in receive(group, metas, bucket_bytes=20_000, checksum=box)}
        if delta is None:
            return got, box[0]
        stream = receive(group, list(delta.metas), bucket_bytes=20_000, checksum=(delta_box := [0]))
        merged = {name: t.clone() for name, t in DeltaApplier(model_dir).merged(delta, stream)}
        return got, box[0], merged, delta_box[0]

    return run


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _assert_finite_metrics(metrics: dict[str, float]) -> None:
    for key in ("loss_token", "loss_item", "reward_mean", "reward_std", "r_d_mean", "r_c_mean", "clip_frac",
                "grad_norm", "chain_len_mean", "alarm_h_T_max_diff", "alarm_logp_abs_diff_mean", "time_reward_s",
                "time_train_s"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), (key, metrics.get(key))


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def step_data(tiny_model_dir):
    from r2ec.model import DualHeadModel

    model_cfg = _configs(str(tiny_model_dir), 2)[0]
    dual = DualHeadModel.from_config(model_cfg)
    step = _make_step(dual)
    return step, _reference(dual, step)


@pytest.fixture(scope="module")
def global_run(tiny_model_dir, step_data):
    """One rank, ZeRO-2, all users: the reference every sharded run must reproduce."""
    step, _ = step_data
    cfgs = _configs(str(tiny_model_dir), 2)
    return _run_ranks("step", 1, cfgs, {"step": step, "users": [list(range(USERS))]})[0]


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_one_rank_step_matches_reference(global_run, step_data):
    step, ref = step_data
    result = global_run["result"]
    _assert_finite_metrics(result.metrics)
    assert global_run["fingerprints"][0] != global_run["fingerprints"][1]
    assert _max_diff(global_run["before"], global_run["after"]) > 1e-4  # lr 1e-3: every touched weight moves
    # rewards from the rollout h_T equal the reference computation; the learner's own h_T gives the same rewards
    assert torch.allclose(result.rewards, ref["rewards"], atol=1e-6)
    assert (result.rewards_learner - result.rewards).abs().max() < 1e-4
    assert result.metrics["alarm_h_T_max_diff"] < 1e-4 and result.metrics["alarm_logp_abs_diff_mean"] < 1e-4
    # losses and the gradient norm equal the plain-PyTorch loss of the whole step (no GAS or world-size scaling)
    assert result.metrics["loss_token"] == pytest.approx(ref["loss_token"], rel=1e-4, abs=1e-7)
    assert result.metrics["loss_item"] == pytest.approx(ref["loss_item"], rel=1e-4)
    assert ref["loss_item"] != 0.0
    assert result.metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert result.metrics["clip_frac"] == 0.0  # on-policy: the ratio is exactly 1
    # the re-encoded targets come back and match the item encodings of the (pre-step) weights
    assert result.table_updates_idx.tolist() == sorted(set(TARGETS))
    assert torch.allclose(result.table_updates, step["table"][result.table_updates_idx], atol=1e-5)


@pytest.mark.slow
def test_item_term_re_encoded_equals_the_fused_one(tiny_model_dir, step_data, global_run):
    """learner.fuse_item_term false re-encodes the relabelled chains in a backward of their own: the same step."""
    step, ref = step_data
    model, learner, recpo = _configs(str(tiny_model_dir), 2)
    cfgs = (model, learner.model_copy(update={"fuse_item_term": False}), recpo)
    run = _run_ranks("step", 1, cfgs, {"step": step, "users": [list(range(USERS))]})[0]
    m, fused = run["result"].metrics, global_run["result"].metrics
    assert _max_diff(run["after"], global_run["after"]) < 1e-5
    for key in ("loss_token", "loss_item", "grad_norm"):
        assert m[key] == pytest.approx(fused[key], rel=1e-4), key
    assert torch.equal(run["result"].table_updates_idx, global_run["result"].table_updates_idx)
    assert torch.allclose(run["result"].table_updates, global_run["result"].table_updates, atol=1e-6)


@pytest.mark.slow
def test_zero2_two_ranks_equal_one_rank(tiny_model_dir, step_data, global_run):
    step, _ = step_data
    cfgs = _configs(str(tiny_model_dir), 2)
    ranks = _run_ranks("step", 2, cfgs, {"step": step, "users": [[0, 1], [2, 3]]})
    metrics = [r["result"].metrics for r in ranks]
    for m in metrics:
        _assert_finite_metrics(m)
    g = global_run["result"].metrics
    assert sum(m["loss_token"] for m in metrics) == pytest.approx(g["loss_token"], rel=1e-5, abs=1e-8)
    assert sum(m["loss_item"] for m in metrics) == pytest.approx(g["loss_item"], rel=1e-5)
    assert metrics[0]["grad_norm"] == pytest.approx(g["grad_norm"], rel=1e-5)
    rewards = torch.cat([r["result"].rewards for r in ranks])
    assert torch.allclose(rewards, global_run["result"].rewards, atol=1e-6)
    assert _max_diff(ranks[0]["after"], global_run["after"]) < 1e-5
    assert ranks[0]["fingerprints"] == pytest.approx(ranks[1]["fingerprints"], abs=0)
    host, port = ranks[0]["sync_address"]
    assert host == "127.0.0.1" and port > 0


@pytest.mark.slow
def test_zero3_two_ranks_equal_one_rank_then_broadcast(tiny_model_dir, step_data, global_run):
    from r2ec.weight_sync import SyncGroup

    step, _ = step_data
    cfgs = _configs(str(tiny_model_dir), 3, checkpointing=True)
    info = SyncGroup("127.0.0.1", _free_port(), world_size=2, backend="gloo", timeout_s=TIMEOUT_S)
    # The receiver needs the metas before the learner sends: the HF state_dict layout of the model.
    metas = _expected_metas(str(tiny_model_dir))
    ranks = _run_ranks("step", 2, cfgs, {"step": step, "users": [[0, 1], [2, 3]], "unequal_then_broadcast": True,
                                         "sync": info}, receiver=_receiver(info, metas))
    # (a) ZeRO-3: the step moves the parameters, metrics are finite; ZeRO-3 shards equal the global ZeRO-2 run
    for r in ranks:
        _assert_finite_metrics(r["result"].metrics)
        _assert_finite_metrics(r["result2"].metrics)
    assert ranks[0]["fingerprints"][0] != ranks[0]["fingerprints"][1]
    assert ranks[0]["local_numel"] == 0  # really sharded: no rank holds a whole parameter outside a gather
    assert _max_diff(ranks[0]["after"], global_run["after"]) < 1e-5
    assert ranks[0]["result"].metrics["grad_norm"] == pytest.approx(global_run["result"].metrics["grad_norm"],
                                                                    rel=1e-5)
    # chain_states with unequal counts per rank (padding forwards) agree across ranks
    h0, lp0 = ranks[0]["chain_states"]
    h1, lp1 = ranks[1]["chain_states"]
    assert h0.shape[0] == 8 and h1.shape[0] == 3
    assert torch.allclose(h0[:3], h1, atol=1e-5) and len(lp0[2]) == len(step["chains"][2])
    # (d) the receiver got exactly the learner's full state dict, lm_head.weight included
    got, checksum = ranks[0]["received"]
    final = ranks[0]["final"]
    assert ranks[0]["metas"] == metas and [m.name for m in metas] == list(final) == list(got)
    assert "lm_head.weight" in got and torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert all(torch.equal(got[k], final[k]) for k in final)
    assert checksum == ranks[0]["checksum"] and ranks[1]["checksum"] is None
    assert _max_diff(final, ranks[0]["after"]) > 0  # the second (unequal) step changed the weights again
    assert ranks[0]["greedy"][0] == ranks[1]["greedy"][0] and len(ranks[0]["greedy"]) == 2
    assert torch.allclose(ranks[0]["encoded"][:3], ranks[1]["encoded"], atol=1e-5)


@pytest.mark.slow
def test_catalogue_negatives_two_ranks_equal_one_rank(tiny_model_dir, step_data):
    # The catalogue term gathers every rank's users too: 2 ranks (ZeRO-2) take the update 1 rank takes.
    step, _ = step_data
    model, learner, recpo = _configs(str(tiny_model_dir), 2)
    cfgs = (model, learner, recpo.model_copy(update={"item_negatives": "catalogue"}))
    one = _run_ranks("step", 1, cfgs, {"step": step, "users": [list(range(USERS))]})[0]
    two = _run_ranks("step", 2, cfgs, {"step": step, "users": [[0, 1], [2, 3]]})
    g, parts = one["result"].metrics, [r["result"].metrics for r in two]
    assert g["item_candidates"] == step["table"].shape[0]
    assert sum(m["loss_item"] for m in parts) == pytest.approx(g["loss_item"], rel=1e-5)
    assert parts[0]["grad_norm"] == pytest.approx(g["grad_norm"], rel=1e-5)
    assert _max_diff(two[0]["after"], one["after"]) < 1e-5
    # and the catalogue term changes the update against in-batch negatives alone
    assert g["loss_item"] != pytest.approx(step_data[1]["loss_item"], rel=1e-3)


def _expected_metas(model_dir: str):
    """What weight_metas must list for the tiny model: its HF state_dict (tied lm_head included), in order."""
    from transformers import AutoModelForCausalLM

    from r2ec.weight_sync import meta_of

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return [meta_of(name, t) for name, t in model.state_dict().items()]


@pytest.mark.slow
def test_lora_trains_only_adapters_and_broadcasts_the_merge(tiny_model_dir, step_data):
    from r2ec.model import DualHeadModel
    from r2ec.weight_sync import SyncGroup

    """ZeRO-3, 2 ranks: the adapters alone train; the full sync delivers peft's merge, and the LoRA-delta sync
    (learner.weight_sync: lora_delta, gathered under ZeRO-3) merged on the receiver delivers the same weights."""
    step, _ = step_data
    model_cfg, learner_cfg, recpo_cfg = _configs(str(tiny_model_dir), 3, lora=True, checkpointing=True)
    cfgs = (model_cfg, learner_cfg.model_copy(update={"weight_sync": "lora_delta"}), recpo_cfg)
    info = SyncGroup("127.0.0.1", _free_port(), world_size=2, backend="gloo", timeout_s=TIMEOUT_S)
    metas = _expected_metas(str(tiny_model_dir))
    plan = _local_delta_plan(model_cfg)
    ranks = _run_ranks("lora", 2, cfgs, {"step": step, "users": [[0, 1], [2, 3]], "sync": info, "delta": True},
                       receiver=_receiver(info, metas, plan, str(tiny_model_dir)))
    r0 = ranks[0]
    _assert_finite_metrics(r0["result"].metrics)
    # only adapters change
    assert _max_diff(r0["base_before"], r0["base_after"]) == 0.0
    assert r0["adapters_before"].keys() == r0["adapters_after"].keys()
    assert all("lora_" in k for k in r0["adapters_after"])
    assert _max_diff(r0["adapters_before"], r0["adapters_after"]) > 1e-4
    # merged export == peft's merge_and_unload of the same adapters; the receiver got exactly that
    peft_model = DualHeadModel.from_config(cfgs[0]).model
    missing, unexpected = peft_model.load_state_dict(r0["adapters_after"], strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    reference = peft_model.merge_and_unload().state_dict()
    merged, (got, checksum, delta_got, delta_checksum) = r0["merged"], r0["received"]
    assert r0["metas"] == metas and list(merged) == list(reference) == list(got) == [m.name for m in metas]
    assert _max_diff(merged, reference) < 1e-6
    assert all(torch.equal(got[k], merged[k]) for k in merged)
    assert _max_diff(merged, r0["base_after"]) > 0  # the merge is not a no-op
    assert checksum == r0["checksum"]
    # the delta: the plan (base checksum gathered under ZeRO-3 included) is the one a plain model gives
    assert r0["plan"] == plan and delta_checksum == r0["delta_checksum"]
    assert set(delta_got) == {t.weight for t in plan.targets}
    assert all(torch.equal(delta_got[k], merged[k]) for k in delta_got)


def _local_delta_plan(model_cfg):
    """The DeltaPlan a learner rank should send, from a plain (no DeepSpeed) model of the same config."""
    import contextlib

    from learner.weights import WeightExport
    from r2ec.model import DualHeadModel

    model = DualHeadModel.from_config(model_cfg).model
    return WeightExport(model.get_base_model(), 0, False, model_cfg.dtype, lambda p: contextlib.nullcontext(),
                        lora_delta=True).delta_plan()


@pytest.mark.parametrize("zero", [2, pytest.param(3, marks=pytest.mark.multirank)])
def test_kl_term_is_zero_at_the_reference_then_shapes_the_update(tiny_model_dir, step_data, zero):
    """recpo.kl_coef with LoRA: the reference is the model with its adapters disabled. At the first step the policy
    is the reference (LoRA's B starts at zero), so the KL and its gradient are exactly zero and the step equals the
    step without KL; after it the KL is positive and changes the next update."""
    step, _ = step_data
    model, learner, recpo = _configs(str(tiny_model_dir), zero, lora=True)
    payload = {"step": step, "users": [list(range(USERS))]}
    with_kl = _run_ranks("kl", 1, (model, learner, recpo.model_copy(update={"kl_coef": 0.5})), payload)[0]
    without = _run_ranks("kl", 1, (model, learner, recpo), payload)[0]
    assert with_kl["first"]["loss_kl"] == 0.0 and "loss_kl" not in without["first"]
    assert with_kl["second"]["loss_kl"] > 0
    for key in ("loss_token", "loss_item", "grad_norm"):
        assert with_kl["first"][key] == without["first"][key], key
    assert _max_diff(with_kl["after_first"], without["after_first"]) == 0.0
    assert _max_diff(with_kl["after_second"], without["after_second"]) > 0


def test_kl_coef_without_lora_is_refused(tiny_model_dir):
    from learner.worker import LearnerWorker

    model, learner, _ = _configs(str(tiny_model_dir), 2)
    with pytest.raises(ValueError, match="kl_coef > 0 needs model.lora.enabled"):
        LearnerWorker(model, learner, RecPOConfig(kl_coef=0.1), 0, 1, "127.0.0.1", _free_port(), "cpu", 0)

@pytest.mark.slow
def test_packed_prompts_and_token_budget_take_the_unpacked_update(tiny_model_dir, step_data):
    """learner.pack_prompts (one row per group) with token-budget micro-batches of unequal sizes takes the same two
    steps as the unpacked learner with fixed micro-batches: the token term, pi_old (two mini-batches) and the KL
    reference (LoRA, second step) all go through the packed forward."""
    step, _ = step_data
    model, learner, recpo = _configs(str(tiny_model_dir), 2, lora=True)
    recpo = recpo.model_copy(update={"kl_coef": 0.5})
    payload = {"step": step, "users": [list(range(USERS))]}
    lengths = [len(step["prompts"][u]) + sum(len(c) for c in step["chains"][u * G:(u + 1) * G]) for u in range(USERS)]
    budget = 2 * max(lengths) - 1  # the longest row goes alone, a shorter pair may share a micro-batch
    packed_cfg = learner.model_copy(update={"pack_prompts": True, "max_tokens_per_micro_batch": budget,
                                            "mini_batches": 2})
    packed = _run_ranks("kl", 1, (model, packed_cfg, recpo), payload)[0]
    plain_cfg = learner.model_copy(update={"pack_prompts": False, "mini_batches": 2})
    plain = _run_ranks("kl", 1, (model, plain_cfg, recpo), payload)[0]
    for when in ("first", "second"):
        for key in ("loss_token", "loss_item", "grad_norm", "loss_kl", "alarm_logp_abs_diff_mean",
                    "alarm_h_T_max_diff", "clip_frac"):
            assert packed[when][key] == pytest.approx(plain[when][key], rel=1e-4, abs=1e-6), (when, key)
    assert packed["second"]["loss_kl"] > 0 and packed["second"]["grad_norm"] > 0
    P, C = sum(len(p) for p in step["prompts"]), sum(len(c) for c in step["chains"])
    assert packed["first"]["tokens_forward_learner"] == P + C  # each prompt once
    assert plain["first"]["tokens_forward_learner"] == G * P + C
    assert _max_diff(packed["after_first"], plain["after_first"]) < 1e-5
    assert _max_diff(packed["after_second"], plain["after_second"]) < 1e-5


def test_micro_batch_plans():
    from learner.micro_batches import plan_micro_batches

    assert plan_micro_batches([5, 5, 5, 5, 5], per_batch=2, max_tokens=None) == [[0, 1], [2, 3], [4]]
    # budget 20: 2 x 9 fits, a third would make 3 x 9; 30 alone exceeds it and goes alone; 2 x max(4, 12) > 20
    assert plan_micro_batches([9, 8, 7, 30, 4, 12], per_batch=1, max_tokens=20) == [[0, 1], [2], [3], [4], [5]]
    assert plan_micro_batches([3, 3, 3, 3], per_batch=1, max_tokens=12) == [[0, 1, 2, 3]]
    assert plan_micro_batches([], per_batch=4, max_tokens=None) == []
    with pytest.raises(ValueError, match="per_batch must be at least 1"):
        plan_micro_batches([1], per_batch=0, max_tokens=None)
