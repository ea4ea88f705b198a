"""Shared-prompt packing in the learner: the time of a RecPO learner step with and without ``learner.pack_prompts``
and ``learner.fuse_item_term``.

One DeepSpeed learner rank (world size 1) is built in this process from ``configs/quickstart.yaml`` (SmolLM2-135M
fp32, LoRA r=4, ZeRO-2, G=4, 4 prompts per step, micro_batch_size 4) and fed real MovieLens-100k user prompts with
synthetic chains: random ordinary token ids, 40 to 63 of them, then the answer marker (the quickstart samples at
most 64 tokens; only the lengths matter to the learner's work, not which tokens). Each measured step trains
on a fresh batch of users; the sides take turns on the same worker (in an order that rotates with the step), so
all see the same machine load, weights and batches (step k of each side uses batch k). ``time_train_s``
is the learner's own timer (token term + item term + optimiser step); rewards, advantages and the weight sync are
outside it. The sides (``--sides``; the first two by default):

- ``unpacked``: every chain in a row of its own (G x (P + C) token-term tokens per group), the item term's user side
  from the token term's h_T (``fuse_item_term``, the default);
- ``packed``: the default learner: each group's prompt computed once in the whole step (P + G x C);
- ``unfused``: neither switch (unpacked, and the relabelled chain's P + C re-encoded for the item term): the
  computation before either existed.

``ratio`` = packed / unpacked (packing alone: the only switch that differs); with ``unfused``, also
``fusion_ratio`` = unpacked / unfused and ``ratio_vs_unfused`` = packed / unfused (both switches).

Caveats:
- The item table is random (the quickstart's is frozen: the item term scores against it as constants, so its
  values do not change the learner's work) and the rollout's h_T and log-probs are synthetic: they decide the
  advantages' values, not the work.
- With the quickstart's frozen table no target item is re-encoded (with ``model.item_table: trained`` the targets
  would pack too, section 7 of docs/performance.md; each step resets the table and so the targets' packing).
- One warm-up step per side (the first DeepSpeed step carries one-time costs) is left out of the medians.

    python bench/packing.py                                 # ~3 min on 2 idle cores
    python bench/packing.py --sides unpacked,packed,unfused # also the fusion's share (~2.5 min more)
    python bench/packing.py --quick    # smoke run: a tiny random model, synthetic prompts, 1 step per side
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RunClock, report  # noqa: E402

# side -> (learner.pack_prompts, learner.fuse_item_term)
SIDES = {"unpacked": (False, True), "packed": (True, True), "unfused": (False, False)}


def _real_inputs(cfg, batches: int):
    """``batches`` batches of (prompt ids, history, target) from the quickstart's training split, and the item
    prompts."""
    from transformers import AutoTokenizer

    from driver.steps import batch_inputs
    from r2ec.assets import resolve
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import EpochSampler
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    prepared = prepare_from_config(cfg.data, log=print)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    train, titles = prepared.splits["train"], list(prepared.items["title"])
    sampler = EpochSampler(len(train), cfg.run.seed)
    out = [batch_inputs([train[i] for i in sampler.next(cfg.learner.prompts_per_step)], prepared, builder, tokenizer,
                        titles) for _ in range(batches)]
    return out, item_prompt_ids(builder, tokenizer, prepared.items)


def _tiny_inputs(cfg, batches: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    U = cfg.learner.prompts_per_step
    out = [([torch.randint(10, vocab, (int(torch.randint(30, 60, (1,), generator=g)),), generator=g).tolist()
             for _ in range(U)], torch.full((U, 3), -1), torch.randint(0, 24, (U,), generator=g))
           for _ in range(batches)]
    return out, [[11, 12, 13]] * 24


def _shard(worker, prompts, history, target, G: int, chain_len: tuple[int, int], seed: int):
    """A TrainShard of ``prompts`` with G synthetic chains each: ordinary token ids, then the answer marker."""
    from r2ec.protocol import Rollout, TrainShard

    g = torch.Generator().manual_seed(seed)
    marker, vocab = worker.dual.marker_ids, min(worker.dual.tokenizer.vocab_size, 40_000)
    chains = [torch.randint(100, vocab, (int(torch.randint(*chain_len, (1,), generator=g)),), generator=g).tolist()
              + marker for _ in range(len(prompts) * G)]
    N, width = len(chains), max(len(c) for c in chains)
    logp_mask = torch.zeros(N, width)
    for r, c in enumerate(chains):
        logp_mask[r, :len(c)] = 1.0
    rollout = Rollout(chains, -3.0 * logp_mask, logp_mask, torch.zeros(N, dtype=torch.bool),
                      torch.randn(N, worker.hidden_size, generator=g), weight_version=0)
    d = worker.hidden_size
    return TrainShard(prompts, rollout, history, target, num_tokens=int(logp_mask.sum()), num_chains=N,
                      table_updates_idx=torch.zeros(0, dtype=torch.long), table_updates=torch.zeros(0, d))


def run(args) -> None:
    from learner.worker import LearnerWorker
    from r2ec.config import load_config

    cfg = load_config(args.config, [])
    if args.quick:
        from r2ec.testing import build_tiny_model

        cfg = load_config(args.config, [f"model.name_or_path={build_tiny_model(Path(args.tmp) / 'tiny')}"])
    G, steps = cfg.recpo.group_size, 1 + args.steps
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(cfg.model, cfg.learner, cfg.recpo, rank=0, world_size=1, master_addr="127.0.0.1",
                           master_port=port, device="cpu", seed=0)
    vocab = worker.dual.tokenizer.vocab_size
    batches, items = _tiny_inputs(cfg, steps, vocab) if args.quick else _real_inputs(cfg, steps)
    table = torch.nn.functional.normalize(torch.randn(len(items), worker.hidden_size), dim=1)
    chain_len = (4, 8) if args.quick else (40, 64)
    rows = []
    for k, (prompts, history, target) in enumerate(batches):
        shard = _shard(worker, prompts, history, target, G, chain_len, seed=k)
        P, C = sum(len(p) for p in prompts), sum(len(c) for c in shard.rollout.chain_ids)
        for i in range(len(args.sides)):  # rotate which side goes first
            side = args.sides[(i + k) % len(args.sides)]
            packed, fused = SIDES[side]
            worker.learner_cfg = cfg.learner.model_copy(update={"pack_prompts": packed, "fuse_item_term": fused})
            worker.set_items(items, table)  # the same table on every side; set_items packs the targets or not
            m = worker.train_step(shard).metrics
            rows.append({"step": k, "warmup": k == 0, "side": side, "packed": packed, "fused": fused,
                         "train_s": m["time_train_s"], "token_s": m["time_token_s"], "item_s": m["time_item_s"],
                         "prompt_tokens": P, "chain_tokens": C, "forward_tokens": m["tokens_forward_learner"]})
            print(f"  step {k} {side}: train {m['time_train_s']:.2f} s (token {m['time_token_s']:.2f} s, "
                  f"item {m['time_item_s']:.2f} s)")
    summary = {}
    for side in args.sides:
        measured = [r for r in rows if r["side"] == side and not r["warmup"]]
        for key in ("train", "token", "item"):
            summary[f"{side}_{key}_s"] = statistics.median(r[f"{key}_s"] for r in measured)
        summary[f"{side}_forward_tokens"] = statistics.median(r["forward_tokens"] for r in measured)
    summary["ratio"] = summary["packed_train_s"] / summary["unpacked_train_s"]
    summary["token_ratio"] = summary["packed_token_s"] / summary["unpacked_token_s"]
    if "unfused" in args.sides:
        summary["fusion_ratio"] = summary["unpacked_train_s"] / summary["unfused_train_s"]
        summary["ratio_vs_unfused"] = summary["packed_train_s"] / summary["unfused_train_s"]
    summary["measured_steps"] = args.steps
    print("\n" + "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    report("packing", rows, out_dir=args.out_dir, **summary,
           settings={"config": args.config, "group_size": G, "prompts_per_step": cfg.learner.prompts_per_step,
                     "micro_batch_size": cfg.learner.micro_batch_size, "chain_len": list(chain_len),
                     "sides": args.sides,
                     "quick": args.quick, **args.clock.fields()})


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=5, help="measured steps per side, after one warm-up step each")
    p.add_argument("--sides", default="unpacked,packed",
                   help=f"comma-separated sides to time, from {', '.join(SIDES)}; unpacked and packed are required")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random model, 1 measured step per side")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args()
    args.sides = list(dict.fromkeys(x.strip() for x in args.sides.split(",") if x.strip()))
    if not {"unpacked", "packed"} <= set(args.sides) <= set(SIDES):
        p.error(f"--sides {','.join(args.sides)}: expected unpacked and packed, optionally unfused")
    args.clock = RunClock()
    if args.quick:
        args.steps = 1
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="r2ec-bench-") as args.tmp:
        run(args)


if __name__ == "__main__":
    main()
