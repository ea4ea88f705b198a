"""LoRA-delta weight sync (r2ec/lora_delta.py, learner/weights.py's delta plan): a receiver that merges the adapters
onto the base weights it reads gets, bit for bit, the weights a full sync sends. Pure code and a tiny model in
process; the vLLM receiver is tested in tests/test_vllm_engine.py, the whole path in a Ray run in
tests/test_train_ray.py."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from r2ec.config import LoraConfig, ModelConfig
from r2ec.lora_delta import DeltaApplier, DeltaPlan, lora_merge, read_base_weights
from r2ec.weight_sync import bits_checksum


def _lora_export(model_dir, targets=("q_proj", "v_proj", "gate_proj"), seed: int = 3):
    """A learner's WeightExport (ZeRO 0-2 path) over a LoRA model with random, non-zero adapters."""
    from learner.weights import WeightExport
    from r2ec.model import DualHeadModel

    cfg = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0,
                                                                   target_modules=list(targets)))
    model = DualHeadModel.from_config(cfg).model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    export = WeightExport(model.get_base_model(), 0, False, "float32", lambda params: contextlib.nullcontext(),
                          lora_delta=True)
    return model, export


def test_lora_merge_is_peft_merge_bit_for_bit(tiny_model_dir):
    model, export = _lora_export(tiny_model_dir)
    merged = dict(export.full_weights())  # the learner's merge (peft's get_delta_weight)
    for name, w in model.merge_and_unload().state_dict().items():
        if name in merged:
            assert torch.equal(merged[name], w), name
    # bf16 adapters on CPU go through float32 as peft does
    w0, a, b = (torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in ((6, 5), (2, 5), (6, 2)))
    ref = w0.bfloat16() + ((b.bfloat16().float() @ a.bfloat16().float()) * 0.5).bfloat16()
    assert torch.equal(lora_merge(w0.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5), ref)


def test_applier_rebuilds_the_full_sync_of_the_targets(tiny_model_dir):
    _, export = _lora_export(tiny_model_dir)
    plan = export.delta_plan()
    full = dict(export.full_weights())
    names = [m.name for m in plan.metas]
    assert names[:2] == ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B"]
    assert len(plan.targets) == 3 * 2 and plan.num_loaded == 6  # 3 targets x 2 layers, nothing else trainable
    assert plan.nbytes < 0.2 * sum(t.numel() * t.element_size() for t in full.values())
    applier = DeltaApplier(str(tiny_model_dir))
    # the stream as receive() yields it: views into per-bucket buffers, A and B possibly in different buckets
    got = dict(applier.merged(plan, ((n, t.clone()) for n, t in export.delta_tensors()),
                              also=["model.layers.0.self_attn.k_proj.weight"]))
    assert set(got) == {t.weight for t in plan.targets} | {"model.layers.0.self_attn.k_proj.weight"}
    for name, w in got.items():
        assert torch.equal(w, full[name]), name  # the k_proj base weight too: LoRA does not touch it
    # plain round trip across an RPC that knows lists and numbers only
    assert DeltaPlan.from_plain(json.loads(json.dumps(plan.to_plain()))) == plan


def test_base_weights_that_differ_from_the_learners_are_refused(tiny_model_dir, tmp_path):
    from r2ec.testing import build_tiny_model

    _, export = _lora_export(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)  # same names and shapes, other values
    with pytest.raises(RuntimeError, match="base weights in .* differ from the learner's"):
        list(DeltaApplier(str(other)).merged(export.delta_plan(), export.delta_tensors()))


def test_read_base_weights_follows_a_sharded_index(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    save_file({n: state[n] for n in names[:half]}, str(tmp_path / "a.safetensors"))
    save_file({n: state[n] for n in names[half:]}, str(tmp_path / "b.safetensors"))
    weight_map = {n: "a.safetensors" if i < half else "b.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = read_base_weights(str(tmp_path), [names[0], names[-1]])
    assert torch.equal(got[names[0]], state[names[0]]) and torch.equal(got[names[-1]], state[names[-1]])
    with pytest.raises(KeyError, match="has no tensors"):
        read_base_weights(str(tmp_path), ["model.nope.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_base_weights(str(tmp_path / "empty"), names[:1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_base_weights(str(tmp_path / "missing"), names[:1])


def test_delta_plan_checksum_is_the_base_weights(tiny_model_dir):
    model, export = _lora_export(tiny_model_dir, targets=("o_proj",))
    plan = export.delta_plan()
    base = read_base_weights(str(tiny_model_dir), [t.weight for t in plan.targets])
    total = sum(bits_checksum(base[t.weight].reshape(-1)) for t in plan.targets) % 2**64
    assert plan.base_checksum == total and plan.train_dtype == "float32"


def test_config_refuses_lora_delta_without_lora_or_with_colocate():
    from r2ec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs model.lora.enabled"):
        load_config("configs/quickstart.yaml", ["learner.weight_sync=lora_delta", "model.lora.enabled=false"])
    with pytest.raises(ConfigError, match="no cluster.colocate"):
        load_config("configs/quickstart.yaml", ["learner.weight_sync=lora_delta", "cluster.colocate=true"])
    assert load_config("configs/quickstart.yaml", ["learner.weight_sync=lora_delta"]).learner.weight_sync == \
        "lora_delta"


def sync_delta(engine, export, bucket_bytes: int = 4096) -> tuple[int, int]:
    """Learner rank 0 (a thread here) broadcasts ``export``'s delta while ``engine`` (rank 1) receives it, over a
    real gloo group on 127.0.0.1; small buckets so an adapter's A and B land in different ones. Returns the
    (sent, received) checksums."""
    import socket
    import threading

    from r2ec.weight_sync import SyncGroup, close_group, open_group, send

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = SyncGroup("127.0.0.1", port, world_size=1 + engine.num_sync_ranks, backend="gloo", timeout_s=60)
    plan, sent, group = export.delta_plan(), [], []

    def learner() -> None:
        group.append(open_group(info, 0))
        sent.append(send(group[0], list(plan.metas), export.delta_tensors(), bucket_bytes))

    thread = threading.Thread(target=learner, daemon=True)
    thread.start()
    engine.join_sync_group(info, first_rank=1)
    received = engine.receive_weights(list(plan.metas), bucket_bytes, plan)
    thread.join(timeout=60)
    assert not thread.is_alive() and sent
    close_group(group[0])
    return sent[0], received


def test_hf_engine_receives_a_delta_as_the_merged_model(tiny_model_dir):
    from r2ec.config import RolloutConfig
    from rollout.hf_engine import HFEngine

    model, export = _lora_export(tiny_model_dir)
    engine = HFEngine(ModelConfig(name_or_path=str(tiny_model_dir)), RolloutConfig(engine="hf"), 0, "cpu")
    sent, received = sync_delta(engine, export)
    assert sent == received
    merged = model.merge_and_unload().state_dict()
    held = engine.model.model.state_dict()
    assert set(held) == set(merged)
    for name, w in held.items():
        assert torch.equal(w, merged[name]), name  # targets merged, everything else the untouched base
