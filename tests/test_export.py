"""``r2ec export`` / ``recommend`` / ``eval --checkpoint`` on real DeepSpeed checkpoints (CPU, gloo, tiny model).

The checkpoints are written here the way training writes them: LearnerWorker ranks in spawned processes (LoRA on the
tiny random Llama) take one RecPO step, then ``engine.save_checkpoint(<ckpt>/learner, tag="ds")`` on every rank; the
test writes config.json, item_table.safetensors and trainer_state.json and commits the folder (manifest, ``latest``).
Two checkpoints: ZeRO-2 at world size 1, and ZeRO-3 at world size 2 (frozen base weights and adapters sharded).

What is checked:
- the exported weights equal the learner's own merged weights (``full_state_dict(merged=True)``), for both;
- plain transformers loads the folder, and greedy reasoning with it (``DualHeadModel`` on the export, and a plain
  argmax loop on ``AutoModelForCausalLM``) equals the learner's greedy chains;
- the re-encoded item table equals the learner's encoding; ``--keep-table`` copies the checkpoint's table bit for bit;
  the catalogue travels with the table;
- vLLM loads the folder as a normal causal LM and its greedy tokens equal transformers' (``vllm`` marker);
- the CLI: ``recommend`` prints k items as JSON and names unknown history items; ``eval --checkpoint`` writes
  metrics, and refuses data with another catalogue; a corrupted or unsafe checkpoint file is named in the error.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from test_learner import gather_ranks

from r2ec.checkpoint import CheckpointError
from r2ec.testing import write_tiny_dataset

TIMEOUT_S = 420  # the first DeepSpeed init on a machine compiles a shm op (~1 min on 2 cores)
USERS = 4
G = 2
NEW_TOKENS = 8
STEP = 3


# ---------------------------------------------------------------------------------------------- data and config
def _config(model_dir: Path, root: Path, zero_stage: int, world_size: int, lora: bool = True,
            dtype: str = "float32") -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "tau": 0.5, "dtype": dtype,
                  "lora": {"enabled": lora, "r": 4, "alpha": 8.0, "dropout": 0.0}},
        "data": {"source": "files", "files": {"interactions": str(root / "inter.csv"),
                                               "items": str(root / "items.csv")},
                 "max_history": 5, "prompt": {"category": "movies", "item_singular": "movie", "history_items": 5}},
        "learner": {"zero_stage": zero_stage, "lr": 1e-2, "prompts_per_step": USERS, "micro_batch_size": 4,
                    "gradient_checkpointing": False, "timeout_s": TIMEOUT_S},
        "recpo": {"group_size": G, "relabel_topk": 1},
        "eval": {"max_new_tokens": NEW_TOKENS, "batch_size": 4, "max_samples": 3, "item_batch_size": 16},
        "cluster": {"learner": {"num_workers": world_size}},
        "run": {"output_dir": str(root / f"run-z{zero_stage}"), "seed": 0, "device": "cpu"},
    }


# ---------------------------------------------------------------------------------------------- learner ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(payload: dict, users: list[int], hidden: int):
    """One RecPO step's part for ``users``: the run's user prompts, random chains and rollout h_T (the step only
    has to move the adapters), the step's global normalisers."""
    from r2ec.protocol import Rollout, TrainShard

    g = torch.Generator().manual_seed(1)
    chains_all = [torch.randint(10, 400, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
                  for _ in range(USERS * G)]
    h_T_all = torch.randn(USERS * G, hidden, generator=g)
    rows = [u * G + j for u in users for j in range(G)]
    chains = [chains_all[r] for r in rows]
    width = max(len(c) for c in chains)
    mask = torch.zeros(len(rows), width)
    for i, c in enumerate(chains):
        mask[i, :len(c)] = 1.0
    rollout = Rollout(chains, torch.zeros(len(rows), width), mask, torch.zeros(len(rows), dtype=torch.bool),
                      h_T_all[rows], weight_version=0)
    return TrainShard([payload["prompts"][u] for u in users], rollout, torch.full((len(users), 1), -1),
                      torch.tensor([payload["targets"][u] for u in users]),
                      num_tokens=sum(len(c) for c in chains_all), num_chains=USERS * G,
                      table_updates_idx=torch.zeros(0, dtype=torch.long), table_updates=torch.zeros(0, hidden))


def _rank_main(rank: int, world_size: int, port: int, cfg_dict: dict, payload: dict, queue) -> None:
    torch.set_num_threads(1)  # one core per rank on a 2-core machine
    try:
        from learner.worker import LearnerWorker
        from r2ec.config import load_config

        cfg = load_config(data=cfg_dict)
        worker = LearnerWorker(cfg.model, cfg.learner, cfg.recpo, rank=rank, world_size=world_size,
                               master_addr="127.0.0.1", master_port=port, device="cpu", seed=0)
        items = payload["item_prompts"]
        # A random table, so the fused rewards differ within each group: non-zero advantages, a real update.
        worker.set_items(items, torch.randn(len(items), worker.hidden_size, generator=torch.Generator().manual_seed(2)))
        per_rank = USERS // world_size
        users = list(range(rank * per_rank, (rank + 1) * per_rank))
        worker.train_step(_shard(payload, users, worker.hidden_size))
        worker.engine.save_checkpoint(payload["learner_dir"], tag="ds", save_latest=False)
        out = {"merged": worker.full_state_dict(merged=True),
               "greedy": worker.greedy(payload["prompts"][:2], NEW_TOKENS),
               "table": worker.encode_items(items, batch_size=16)}
        queue.put((rank, pickle.dumps(out if rank == 0 else {})))
    except BaseException:  # noqa: BLE001 - report the traceback instead of letting the parent time out
        queue.put((rank, traceback.format_exc()))


def _run_ranks(world_size: int, cfg_dict: dict, payload: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, cfg_dict, payload, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = gather_ranks(procs, queue, TIMEOUT_S)
    return results[0]


def _make_checkpoint(model_dir: Path, root: Path, zero_stage: int, world_size: int, **kw) -> dict[str, Any]:
    """Train one step on ``world_size`` ranks and commit a checkpoint of step STEP, as training lays it out."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from r2ec import checkpoint
    from r2ec.config import load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.prompts import PromptBuilder, item_prompt_ids, user_prompt_ids

    cfg_dict = _config(model_dir, root, zero_stage, world_size, **kw)
    cfg = load_config(data=cfg_dict)
    prepared = prepare_from_config(cfg.data, log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    titles = list(prepared.items["title"])
    rows = [prepared.splits["train"][i] for i in range(USERS)]
    tmp = checkpoint.stage(cfg.run.output_dir, STEP)
    payload = {"item_prompts": item_prompt_ids(builder, tokenizer, prepared.items),
               "prompts": [user_prompt_ids(builder, tokenizer, r, titles) for r in rows],
               "targets": [r["target_item_idx"] for r in rows], "learner_dir": str(tmp / "learner")}
    learner = _run_ranks(world_size, cfg_dict, payload)
    (tmp / checkpoint.CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    save_file({"h_items": learner["table"]}, str(tmp / checkpoint.ITEM_TABLE))
    (tmp / checkpoint.TRAINER_STATE).write_text(json.dumps(
        {"step": STEP, "learner_world_size": world_size, "config_hash": cfg.hash(),
         "catalogue_sha256": checkpoint.catalogue_sha256(prepared.item_ids())}))
    folder = checkpoint.commit(tmp, STEP)
    return {"folder": folder, "cfg": cfg, "learner": learner, "prepared": prepared, "prompts": payload["prompts"]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("R2EC_CACHE", str(root / "cache"))  # prepared data of this module's dataset only
        write_tiny_dataset(root)
        yield root


@pytest.fixture(scope="module")
def z2(workspace, tiny_model_dir):
    return _make_checkpoint(Path(tiny_model_dir), workspace, zero_stage=2, world_size=1)


@pytest.fixture(scope="module")
def z2_export(z2, workspace):
    from r2ec.export import export_checkpoint

    return export_checkpoint(z2["folder"], workspace / "export-z2", log=lambda *_: None)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Plain argmax decoding, one prompt at a time: what any causal-LM runtime must reproduce."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(n):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            out.append(ids[0, len(p):].tolist())
    return out


# ---------------------------------------------------------------------------------------------- tests
def test_export_equals_the_learner_and_loads_with_transformers(z2, z2_export):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from r2ec.bundle import load_export
    from r2ec.checkpoint import catalogue_sha256

    out = z2_export
    assert not list(out.parent.glob(".tmp-*"))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # vLLM loads every one there
    # weights: exactly the learner's merged weights (LoRA folded in), lm_head tied as in the base model
    hf = AutoModelForCausalLM.from_pretrained(out)
    exported = hf.state_dict()
    merged = z2["learner"]["merged"]
    assert _max_diff(exported, merged) <= 1e-6
    assert not any("lora" in k for k in exported)
    base = AutoModelForCausalLM.from_pretrained(z2["cfg"].model.name_or_path).state_dict()
    assert _max_diff(exported, base) > 1e-3  # the step moved the adapters: the merge is not a no-op
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    # greedy reasoning: the export (as DualHeadModel) and a plain argmax loop reproduce the learner
    loaded = load_export(out, "cpu")
    chains = loaded.model.generate(z2["prompts"][:2], max_new_tokens=NEW_TOKENS)
    assert [c.token_ids for c in chains] == z2["learner"]["greedy"]
    raw = _hf_greedy(hf, z2["prompts"][:2], NEW_TOKENS)
    for chain, tokens in zip(chains, raw, strict=True):
        kept = loaded.model.finisher.num_kept(tokens)
        assert chain.token_ids[:kept] == tokens[:kept]
    # the item table: re-encoded with the exported weights = the learner's encoding; catalogue alongside
    torch.testing.assert_close(loaded.h_items, z2["learner"]["table"], atol=1e-5, rtol=1e-5)
    ids = z2["prepared"].item_ids()
    assert loaded.item_ids == ids and loaded.titles == list(z2["prepared"].items["title"])
    with safe_open(str(out / "rec_head" / "item_table.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["item_ids"]) == ids and f.get_tensor("h_items").dtype == torch.float32
    meta = json.loads((out / "r2ec.json").read_text())
    assert meta["source"]["step"] == STEP and meta["source"]["config_hash"] == z2["cfg"].hash()
    assert meta["item_table"]["catalogue_sha256"] == catalogue_sha256(ids)
    assert meta["item_table"]["source"] == "re-encoded" and meta["tau"] == 0.5
    assert meta["prompt"] == z2["cfg"].data.prompt.model_dump(mode="json")
    assert json.loads((out / "r2ec_config.json").read_text()) == z2["cfg"].model_dump(mode="json")


def test_keep_table_from_a_run_folder_and_no_silent_overwrite(z2, z2_export, workspace):
    from safetensors.torch import load_file

    from r2ec.bundle import ExportError, load_item_table
    from r2ec.export import export_checkpoint

    out = workspace / "export-keep"
    # PATH may be the run's output_dir: its newest complete checkpoint is taken
    export_checkpoint(z2["cfg"].run.output_dir, out, reencode_items=False, log=lambda *_: None)
    table, _, _ = load_item_table(out / "rec_head" / "item_table.safetensors")
    assert torch.equal(table, load_file(str(z2["folder"] / "item_table.safetensors"))["h_items"])
    assert json.loads((out / "r2ec.json").read_text())["item_table"]["source"] == "checkpoint"
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(z2["folder"], out, log=lambda *_: None)


@pytest.mark.multirank
def test_zero3_two_ranks_export_equals_the_learner(workspace, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from r2ec.export import export_checkpoint

    z3 = _make_checkpoint(Path(tiny_model_dir), workspace, zero_stage=3, world_size=2)
    assert len(list((z3["folder"] / "learner" / "ds").glob("*_optim_states.pt"))) == 2
    out = export_checkpoint(z3["folder"], workspace / "export-z3", reencode_items=False, log=lambda *_: None)
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert _max_diff(exported, z3["learner"]["merged"]) <= 1e-6
    assert _max_diff(exported, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()) > 1e-3


def test_zero0_full_finetune_exports_in_bfloat16(workspace, tiny_model_dir):
    """ZeRO-0 keeps no fp32 master copy for zero_to_fp32: the module weights are exported. The learner trains in
    float32 on CPU; the export is written in the configured model.dtype."""
    from transformers import AutoModelForCausalLM

    from r2ec.export import export_checkpoint

    z0 = _make_checkpoint(Path(tiny_model_dir), workspace, zero_stage=0, world_size=1, lora=False, dtype="bfloat16")
    out = export_checkpoint(z0["folder"], workspace / "export-z0", log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    learner = {k: v.to(torch.bfloat16) for k, v in z0["learner"]["merged"].items()}
    assert _max_diff(hf.state_dict(), learner) == 0.0
    assert _max_diff(hf.state_dict(), AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()) > 1e-3


def test_cli_recommend_prints_k_items(z2_export, capsys):
    from driver.cli import main

    assert main(["recommend", "--model", str(z2_export), "--history", "i03:4:1000000", "i07::1000600", "i11",
                 "-k", "5", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["item_ids"]) == len(out["titles"]) == len(out["scores"]) == 5
    assert not {"i03", "i07", "i11"} & set(out["item_ids"])  # history masked
    assert out["scores"] == sorted(out["scores"], reverse=True)
    assert out["titles"][0] == f"Title {int(out['item_ids'][0][1:])}" and out["reasoning"].endswith("<answer>")

    assert main(["recommend", "--model", str(z2_export), "--history", "i03", "nope", "zz9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope, zz9" in err and "not in the catalogue" in err


def test_cli_eval_checkpoint_writes_metrics(z2_export, workspace, capsys):
    from driver.cli import main

    assert main(["eval", "--checkpoint", str(z2_export), "--split", "test"]) == 0
    result = json.loads((z2_export / "eval" / "eval_test.json").read_text())
    assert result["method"] == "r2ec-export" and result["num_samples"] == 3 and result["step"] == STEP
    assert {"hit@10", "ndcg@10"} <= set(result)
    samples = (z2_export / "eval" / "eval_test_samples.jsonl").read_text().splitlines()
    assert all(json.loads(s)["reasoning"].endswith("<answer>") for s in samples)
    capsys.readouterr()

    # --config with data whose catalogue differs: refused, saying what differs
    other = workspace / "other"
    other.mkdir(exist_ok=True)
    write_tiny_dataset(other)
    with open(other / "items.csv", "a") as f:
        f.write("i99,Title 99,An item the export has never seen,Comedy\n")
    cfg = json.loads((z2_export / "r2ec_config.json").read_text())
    cfg["data"]["files"]["items"] = str(other / "items.csv")
    cfg["run"]["output_dir"] = str(other / "out")
    (other / "cfg.json").write_text(json.dumps(cfg))
    assert main(["eval", "--checkpoint", str(z2_export), "--config", str(other / "cfg.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r2ec: error: ") and "catalogue" in err and "the data 31" in err and "i99" in err


def test_corrupted_or_unsafe_checkpoint_is_named(z2, workspace, capsys):
    from driver.cli import main
    from r2ec.checkpoint import write_manifest
    from r2ec.export import export_checkpoint

    bad = workspace / "bad" / "checkpoints" / z2["folder"].name
    shutil.copytree(z2["folder"], bad)
    target = sorted((bad / "learner" / "ds").glob("*_optim_states.pt"))[0]
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=target.name):
        export_checkpoint(bad, workspace / "never", log=lambda *_: None)
    assert main(["export", "--checkpoint", str(bad), "--out", str(workspace / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r2ec: error: ") and target.name in err and "corrupted" in err
    assert not (workspace / "never").exists()
    # a checkpoint is not an exported model: recommend says what to do instead
    assert main(["recommend", "--model", str(z2["folder"]), "--history", "i01"]) == 2
    assert "r2ec export --checkpoint" in capsys.readouterr().err

    # A pickle that would run code on load is refused before DeepSpeed sees it, even with a valid manifest.
    torch.save({"x": _Evil()}, target)
    write_manifest(bad, STEP)
    with pytest.raises(CheckpointError, match=f"{target.name}.*weights_only"):
        export_checkpoint(bad, workspace / "never", log=lambda *_: None)
    assert not (workspace / "never").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.vllm
def test_vllm_loads_the_export_and_matches_transformers(z2, z2_export, monkeypatch):
    vllm = pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM
    from vllm.inputs import TokensPrompt

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    prompts = z2["prompts"][:2]
    expected = _hf_greedy(AutoModelForCausalLM.from_pretrained(z2_export), prompts, NEW_TOKENS)
    llm = vllm.LLM(model=str(z2_export), enforce_eager=True, dtype="float32", max_model_len=512, seed=0)
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected
    finally:
        del llm
