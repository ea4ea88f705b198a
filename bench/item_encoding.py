"""Item encoding at the limit: the item table on vLLM and in-process, and the learner's re-encoding of a step's targets.

Every MovieLens-100k item prompt (rendered by ``PromptBuilder`` exactly as training renders them; 1,682 items,
66-88 tokens, mean ~71) starts with the same tokens: the chat template and the instruction (``shared_prefix``,
r2ec/packing.py). Only the rest differs from item to item, so that rest is what an encode has to compute. Three
parts, all with SmolLM2-135M-Instruct in float32:

1. **The item table on vLLM** (``VllmEngine.last_hidden``, what the rollout worker runs at the start, at every table
   refresh, before validation and the test), once per ``--variants`` entry ``BLOCK:BIND``: ``rollout.vllm.block_size``
   (``default`` = vLLM's own, 128 on the CPU build) and ``rollout.vllm.cpu_threads_bind``
   (VLLM_CPU_OMP_THREADS_BIND; ``auto`` gives one compute thread on a 2-core machine). vLLM's prefix cache serves
   whole KV blocks only: at 128 tokens per block no item prompt reuses anything, at 32 (the CPU attention backend's
   smallest) the first 32 tokens come from the cache. Each engine first encodes 16 items unmeasured (start-up; the
   prefix enters the cache as after a real encode's first batch), then ``--items`` others in one call.
2. **The zero-shot table in-process** (``DualHeadModel.encode_items``: what evaluation of the untrained model and
   the HF rollout engine run, no gradient, 32 items per forward): ``--table-items`` items unpacked (one padded row
   per item) and packed (``packed=True``, the default: each batch's items behind one copy of the shared prefix per
   row of at most 512 tokens), alternating, two measured encodes per side after one unmeasured batch, medians.
3. **The learner's target re-encoding** (``DualHeadModel.last_hidden`` vs ``last_hidden_packed``: what the learner's
   item term runs, with gradient, when the item table is trained): ``--targets`` distinct random items per step,
   forward + backward of a loss on their encodings, unpacked (K rows of prefix + tail) and packed behind the shared
   prefix (``learner.pack_prompts``), the two sides alternating on the same items, ``--repeats`` steps each after
   one unmeasured, medians. Full fine-tuning, no gradient checkpointing (the learner's default checkpointing would
   add one forward to both sides).

The bound. ``bound_items_per_s`` is what the machine could do if it computed only the tokens that differ (each
item's tail after the shared prefix, at its real position) at the GEMM rate this process measures for torch
float32 on the same thread count (``peak_gflops``: the model's own MLP shape, best of a few runs): forward FLOPs of a
tail token at position p = 2 N + 4 n_layers d (p + 1) (N the non-embedding parameters; the second term is the
causal attention of that token), x 3 with the backward. ``of_bound`` = items_per_s / bound_items_per_s.

Rows (``part`` vllm): ``block_size``, ``threads_bind``, ``items``, ``seconds``, ``items_per_s``, ``prompt_tokens_mean``,
``cached_tokens_mean`` (vLLM's own count), ``differing_tokens_mean``, ``bound_items_per_s``, ``of_bound``,
``speedup`` (over the first row), ``max_abs_diff`` (of the rows from the first row's). Rows (``part`` table):
``items``, ``packed``, ``seconds``, ``items_per_s``, ``prompt_tokens_mean``, ``differing_tokens_mean``,
``bound_items_per_s`` (forward only), ``of_bound``, ``speedup``, ``max_abs_diff`` (against the unpacked table).
Rows (``part`` learner):
``targets``, ``packed``, ``seconds`` (median per step), ``items_per_s``,
``forward_tokens`` (per step), ``differing_tokens``, ``bound_items_per_s``, ``of_bound``, ``speedup``,
``max_abs_diff`` (encodings against the unpacked side's), ``grad_max_rel_diff``. The load average around the run is
recorded. Needs the offline assets (``r2ec assets``).

    python bench/item_encoding.py                 # 200 items per vLLM engine, both cores, 16 targets (~2 min)
    python bench/item_encoding.py --variants default:auto,32:auto,32:0-1   # also one compute thread
    python bench/item_encoding.py --items 0       # the whole catalogue per vLLM engine (~10 min more)
    python bench/item_encoding.py --quick         # smoke run: a tiny random model, the learner table only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, report  # noqa: E402

WARMUP_ITEMS = 16


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml", help="model, data and prompt settings to use")
    p.add_argument("--items", type=int, default=200, help="items to encode per vLLM engine (0 = the whole catalogue "
                   f"after the {WARMUP_ITEMS} warm-up items)")
    p.add_argument("--variants", default="default:0-1,32:0-1",
                   help="comma-separated BLOCK:BIND pairs; BLOCK 'default' = vLLM's own; empty: no vLLM rows")
    p.add_argument("--table-items", type=int, default=128, help="items per side of the HF table encode (0: none)")
    p.add_argument("--targets", default="16", help="comma-separated targets per learner step")
    p.add_argument("--repeats", type=int, default=5, help="measured learner steps per side and target count")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny random model and synthetic prompts, "
                   "the learner table only, 1 step per side")
    p.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default bench/results)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the bound
def peak_gflops(threads: int, d_model: int, d_ff: int, tokens: int = 512, repeat: int = 5) -> float:
    """torch float32 GEMM rate on ``threads`` threads at the model's MLP shape (tokens x d) @ (d x d_ff): best of
    ``repeat`` after a warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(tokens, d_model), torch.randn(d_model, d_ff)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(8):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - t) / 8)
    finally:
        torch.set_num_threads(before)
    return 2 * tokens * d_model * d_ff / best / 1e9


def model_shape(model) -> dict:
    """Non-embedding parameters, layers, hidden and MLP sizes of an HF decoder."""
    cfg = model.config
    embed = sum(p.numel() for p in model.get_input_embeddings().parameters())
    out = model.get_output_embeddings()
    head = 0 if out is None or out.weight is model.get_input_embeddings().weight else out.weight.numel()
    return {"non_embedding_params": sum(p.numel() for p in model.parameters()) - embed - head,
            "n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size, "d_ff": cfg.intermediate_size}


def tail_flops(shape: dict, prefix: int, tail: int) -> float:
    """Forward FLOPs of a tail of ``tail`` tokens after a ``prefix``-token shared prefix (see the module docstring)."""
    n, layers, d = shape["non_embedding_params"], shape["n_layers"], shape["d_model"]
    positions = range(prefix, prefix + tail)
    return sum(2 * n + 4 * layers * d * (p + 1) for p in positions)


# ---------------------------------------------------------------------------------------------- vLLM
def _cpus(bind: str) -> list[int]:
    """The CPU ids of a VLLM_CPU_OMP_THREADS_BIND list such as ``0-1`` or ``0,2-3``."""
    out: list[int] = []
    for part in bind.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def vllm_rows(args, cfg, ids: list[list[int]], prefix: int, shape: dict, peaks: dict[int, float]) -> list[dict]:
    from rollout.vllm_engine import VllmEngine

    warm, measured = ids[:WARMUP_ITEMS], ids[WARMUP_ITEMS:]
    if args.items:
        measured = measured[:args.items]
    ideal = sum(tail_flops(shape, prefix, len(s) - prefix) for s in measured) / len(measured)
    rows, reference = [], None
    for spec in filter(None, args.variants.split(",")):
        block_spec, bind = spec.strip().split(":", 1)
        block = None if block_spec == "default" else int(block_spec)
        vcfg = cfg.rollout.vllm.model_copy(update={"block_size": block, "cpu_threads_bind": bind})
        engine = VllmEngine(cfg.model, cfg.rollout.model_copy(update={"vllm": vcfg}), seed=0, device="cpu")
        try:
            engine.last_hidden(warm)
            t = time.perf_counter()
            h = engine.last_hidden(measured).float()
            seconds = time.perf_counter() - t
            cached = engine.last_num_cached_tokens
        finally:
            engine.close()
        if reference is None:
            reference = (h, seconds)
        threads = 1 if bind == "auto" else len(_cpus(bind))
        bound = peaks[threads] * 1e9 / ideal
        rows.append({
            "part": "vllm", "block_size": block_spec, "threads_bind": bind, "threads": threads, "items": len(measured),
            "seconds": seconds, "items_per_s": len(measured) / seconds,
            "prompt_tokens_mean": sum(len(s) for s in measured) / len(measured),
            "cached_tokens_mean": sum(cached) / len(cached),
            "differing_tokens_mean": sum(len(s) - prefix for s in measured) / len(measured),
            "bound_items_per_s": bound, "of_bound": len(measured) / seconds / bound,
            "speedup": reference[1] / seconds, "max_abs_diff": float((h - reference[0]).abs().max()),
        })
        del h
    return rows


# ---------------------------------------------------------------------------------------------- HF table
def table_rows(args, dual, ids: list[list[int]], prefix: int, shape: dict, peak: float) -> list[dict]:
    """``DualHeadModel.encode_items`` (the zero-shot table of evaluation and the HF rollout engine) unpacked and
    packed on the same ``--table-items`` items, the two sides alternating, two measured encodes each after one
    unmeasured batch; medians."""
    items = ids[WARMUP_ITEMS:][:args.table_items]
    if not items:
        return []
    ideal = sum(tail_flops(shape, prefix, len(s) - prefix) for s in items) / len(items)  # forward only
    bound = peak * 1e9 / ideal
    dual.model.eval()
    times: dict[bool, list[float]] = {False: [], True: []}
    out = {}
    dual.encode_items(ids[:WARMUP_ITEMS])
    for _ in range(min(args.repeats, 2)):
        for packed in (False, True):
            t = time.perf_counter()
            out[packed] = dual.encode_items(items, packed=packed)
            times[packed].append(time.perf_counter() - t)
    base = statistics.median(times[False])
    rows = []
    for packed in (False, True):
        sec = statistics.median(times[packed])
        rows.append({"part": "table", "items": len(items), "packed": packed, "seconds": sec,
                     "items_per_s": len(items) / sec, "prompt_tokens_mean": sum(map(len, items)) / len(items),
                     "differing_tokens_mean": sum(len(s) - prefix for s in items) / len(items),
                     "bound_items_per_s": bound, "of_bound": len(items) / sec / bound, "speedup": base / sec,
                     "max_abs_diff": float((out[packed] - out[False]).abs().max())})
    return rows


# ---------------------------------------------------------------------------------------------- learner
def learner_rows(args, dual, ids: list[list[int]], prefix: int, shape: dict, peak: float) -> list[dict]:
    from r2ec.packing import PACKED_ROW_TOKENS, tail_rows

    rows = []
    g = torch.Generator().manual_seed(0)
    dual.model.train()
    params = [p for p in dual.model.parameters() if p.requires_grad]
    for K in (int(k) for k in args.targets.split(",")):
        times: dict[bool, list[float]] = {False: [], True: []}
        tokens: dict[bool, list[int]] = {False: [], True: []}
        diffs, grad_diffs, differing, ideal = [], [], [], []
        for step in range(args.repeats + 1):  # step 0 unmeasured
            items = sorted(torch.randperm(len(ids), generator=g)[:K].tolist())
            tails = [ids[v][prefix:] for v in items]
            packing = tail_rows(prefix, [len(t) for t in tails], PACKED_ROW_TOKENS)
            weights = torch.randn(K, shape["d_model"], generator=g)
            out = {}
            for packed in (False, True):
                dual.model.zero_grad(set_to_none=True)
                t = time.perf_counter()
                if packed:
                    h = dual.last_hidden_packed([ids[items[0]][:prefix]] * len(packing),
                                                [[tails[i] for i in r] for r in packing])
                else:
                    h = dual.last_hidden([ids[v] for v in items])
                (h.float() * weights).sum().backward()
                seconds = time.perf_counter() - t
                out[packed] = (h.detach(), [p.grad.clone() for p in params])
                if step:
                    times[packed].append(seconds)
                    tokens[packed].append(prefix * len(packing) + sum(map(len, tails)) if packed
                                          else sum(len(ids[v]) for v in items))
            if step:
                diffs.append(float((out[True][0] - out[False][0]).abs().max()))
                grad_diffs.append(max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                                      for a, b in zip(out[True][1], out[False][1], strict=True)))
                differing.append(sum(len(t) for t in tails))
                ideal.append(3 * sum(tail_flops(shape, prefix, len(t)) for t in tails) / K)  # forward + backward
        base, bound = statistics.median(times[False]), peak * 1e9 / statistics.mean(ideal)
        for packed in (False, True):
            sec = statistics.median(times[packed])
            rows.append({"part": "learner", "targets": K, "packed": packed, "seconds": sec, "items_per_s": K / sec,
                         "forward_tokens": statistics.mean(tokens[packed]), "differing_tokens": statistics.mean(differing),
                         "bound_items_per_s": bound, "of_bound": K / sec / bound, "speedup": base / sec,
                         "max_abs_diff": max(diffs) if packed else 0.0,
                         "grad_max_rel_diff": max(grad_diffs) if packed else 0.0})
    return rows


def _quick_inputs():
    import tempfile

    from r2ec.model import DualHeadModel
    from r2ec.testing import build_tiny_model

    path = build_tiny_model(Path(tempfile.mkdtemp(prefix="r2ec-bench-")) / "tiny-model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dual = DualHeadModel(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    g = torch.Generator().manual_seed(1)
    head = torch.randint(10, 300, (20,), generator=g).tolist()
    ids = [head + torch.randint(10, 300, (int(torch.randint(5, 15, (1,), generator=g)),), generator=g).tolist()
           for _ in range(64)]
    return dual, ids


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    from r2ec.packing import shared_prefix

    load_before = load_average()
    if args.quick:
        args.variants, args.targets, args.repeats = "", "8", 1
        dual, ids, cfg = *_quick_inputs(), None
    else:
        from transformers import AutoTokenizer

        from r2ec.assets import resolve
        from r2ec.config import load_config
        from r2ec.data.prepare import prepare_from_config
        from r2ec.model import DualHeadModel
        from r2ec.prompts import PromptBuilder, item_prompt_ids

        cfg = load_config(args.config)
        prepared = prepare_from_config(cfg.data, log=lambda *a: None)
        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
        builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
        ids = item_prompt_ids(builder, tokenizer, prepared.items)
        model_cfg = cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False}),
                                                 "dtype": "float32"})
        dual = DualHeadModel.from_config(model_cfg)
    prefix = shared_prefix(ids)
    shape = model_shape(dual.model)
    peaks = {t: peak_gflops(t, shape["d_model"], shape["d_ff"]) for t in (1, 2)}
    print(f"shared prefix {prefix} tokens of {sum(map(len, ids)) / len(ids):.1f} on average; torch float32 GEMM "
          f"{peaks[1]:.1f} GFLOP/s on 1 thread, {peaks[2]:.1f} on 2")
    rows = vllm_rows(args, cfg, ids, prefix, shape, peaks) if args.variants else []
    threads = torch.get_num_threads() if torch.get_num_threads() in peaks else 2
    rows += table_rows(args, dual, ids, prefix, shape, peaks[threads])
    rows += learner_rows(args, dual, ids, prefix, shape, peaks[threads])
    columns = list(dict.fromkeys(k for r in rows for k in r))
    report("item_encoding", rows, columns, out_dir=args.out_dir, load_average_before=load_before,
           load_average_after=load_average(), shared_prefix_tokens=prefix, model_shape=shape,
           peak_gflops={str(k): v for k, v in peaks.items()})

if __name__ == "__main__":
    main()
