"""What computing LM-head logits only for the chain positions saves in the learner's forward + backward.

``DualHeadModel.chain_forward`` (the learner's RecPO forward) applies the LM head only to the hidden states that
predict a chain token. Before, it applied it to every position of prompt + chain and masked afterwards; this script
keeps that former computation (``all_positions_logp`` below, used nowhere else) to time the two side by side on the
same inputs: one forward + backward of the token term's log-probs plus h_T, as the learner's micro-batch runs it.

How: random token ids (the cost does not depend on the values), B sequences of a P-token prompt and an L-token
chain; the model's real LM head and vocabulary, with a LoRA adapter (default shape) as the learner trains it. Each variant runs in its own fresh subprocess, so its peak memory
is its own: on CPU the growth of the peak resident set over the resident set after the model is loaded and one
unmeasured warm-up run (allocator caches included, so a lower bound on what the variant needs), on CUDA
``torch.cuda.max_memory_allocated`` above the memory held before the measured runs. Time is the median of
``--repeat`` runs after one warm-up. A check first confirms that both give the same log-probs on the chain tokens.

    python bench/chain_logits.py                 # SmolLM2-135M, B=4, P=256, L=64 (~1 min on 2 idle cores)
    python bench/chain_logits.py --quick         # smoke run: a tiny random model, tiny shapes
    python bench/chain_logits.py --device cuda --model PATH --batch 8 --prompt-len 512 --chain-len 640
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RunClock, report, run_with_quick_model, timeit  # noqa: E402

DEFAULT_MODEL = "asset://smollm2-135m-instruct"
VARIANTS = ("all_positions", "chain_only")


def all_positions_logp(dual, prompt_ids, chains):
    """The former chain_forward: LM-head logits (B, P+L-1, vocab) for every position, prompt included."""
    from r2ec.model import last_token_index, pad_batch

    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, chains, strict=True)]
    ids, attn, pos = pad_batch(seqs, dual.pad_id, "right", dual.device)
    h = dual.hidden_states(ids, attn, pos)
    h_T = h[torch.arange(h.shape[0], device=h.device), last_token_index(attn)]
    logits = dual.model.get_output_embeddings()(h[:, :-1]).float()
    softcap = getattr(dual.model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(logp)
    for i, (p, c) in enumerate(zip(prompt_ids, chains, strict=True)):
        mask[i, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return logp, mask, h_T


def _load(args):
    from r2ec.config import LoraConfig, ModelConfig
    from r2ec.model import DualHeadModel

    cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype, lora=LoraConfig(enabled=True))  # as the learner
    dual = DualHeadModel.from_config(cfg, device=args.device)
    dual.model.train()
    g = torch.Generator().manual_seed(0)
    vocab = dual.model.get_output_embeddings().weight.shape[0]
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    chains = torch.randint(0, vocab, (args.batch, args.chain_len), generator=g).tolist()
    return dual, prompts, chains


def _forward(dual, variant: str, prompts, chains):
    if variant == "all_positions":
        return all_positions_logp(dual, prompts, chains)
    return dual.chain_forward(prompts, chains)


def fwd_bwd(dual, variant: str, prompts, chains) -> None:
    """One forward + backward of the micro-batch with ``variant``'s logits (a loss on the chain log-probs and h_T,
    as the token and item terms use them), gradients dropped, the device synchronised."""
    logp, mask, h_T = _forward(dual, variant, prompts, chains)
    ((logp * mask).sum() / mask.sum() + h_T.float().pow(2).mean()).backward()
    dual.model.zero_grad(set_to_none=True)
    if dual.device.type == "cuda":
        torch.cuda.synchronize()


def measure_one(args) -> dict:
    """One variant in this process: median forward + backward seconds and peak memory growth (MB)."""
    dual, prompts, chains = _load(args)
    fwd_bwd(dual, args.variant, prompts, chains)  # warm-up: allocator and kernels
    if dual.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    seconds = timeit(lambda: fwd_bwd(dual, args.variant, prompts, chains), repeat=args.repeat, warmup=0)
    if dual.device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # ru_maxrss also covers the warm-up run, which allocated what the measured runs reuse
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"variant": args.variant, "fwd_bwd_s": seconds, "peak_mem_mb": round(peak_mb, 1)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def check_equal(args) -> float:
    """Largest |difference| of the two variants' log-probs on the chain tokens (they must agree)."""
    dual, prompts, chains = _load(args)
    with torch.no_grad():
        a, mask, h_a = all_positions_logp(dual, prompts, chains)
        b, mask_b, h_b = dual.chain_forward(prompts, chains)
    if not torch.equal(mask, mask_b):
        raise SystemExit("chain_logits: the two variants disagree on the chain mask")
    at = mask.bool()
    return float((a[at] - b[at]).abs().max())


def run(args) -> None:
    clock = RunClock()
    diff = check_equal(args)
    print(f"max |logp difference| on chain tokens: {diff:.3g}")
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--one", variant, "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
               "--chain-len", str(args.chain_len), "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"chain_logits: the {variant} run failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["time_vs_all"] = round(r["fwd_bwd_s"] / base["fwd_bwd_s"], 3)
    settings = {"model": args.model, "device": args.device, "dtype": args.dtype, "batch": args.batch,
                "prompt_len": args.prompt_len, "chain_len": args.chain_len, "repeat": args.repeat,
                "quick": args.quick, "max_abs_logp_diff": diff, **clock.fields()}
    report("chain_logits", rows, out_dir=args.out_dir, settings=settings)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--chain-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny random model and tiny shapes")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--one", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)  # internal: one variant
    args = ap.parse_args(argv)
    args.tiny_model = False
    if args.variant:
        print(json.dumps(measure_one(args)))
        return
    if args.quick:
        args.batch, args.prompt_len, args.chain_len, args.repeat = 2, 24, 8, 1
    run_with_quick_model(args, run, DEFAULT_MODEL)


if __name__ == "__main__":
    main()
