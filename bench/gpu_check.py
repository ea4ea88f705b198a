"""The prepared GPU check: verify the GPU facts the system relies on, in one short run on a bare GPU box.

Designed for the hardest case: one GPU, no network, a stock PyTorch image (torch + CUDA, transformers, peft) with
the missing pure-Python wheels installed from a carried folder (``make gpu-wheels``: DeepSpeed, pydantic and their
parts; Ray and vLLM are too large to carry and are not needed), no model weights (random weights built from a
config). Each phase runs in its own subprocess with its own timeout, under one global deadline, and prints
``PASS/FAIL/SKIP name value`` lines; everything goes into one JSON (``--out``).

Phases:
- ``env``: versions, the device, which optional packages import.
- ``checksum``: the weight-sync checksum (``r2ec.weight_sync.bits_checksum``) of a tensor on the device equals the
  CPU's, for bfloat16, float16 and float32 (the sync compares checksums taken on different devices).
- ``learner``: the DeepSpeed learner (one rank, tiny random model + LoRA, bf16 on GPU; ZeRO 0, 2 and 3): two RecPO
  steps, a checkpoint, a third step; a fresh learner loads the checkpoint and takes the third step again: the
  losses and the LoRA weights must be equal.
- ``rl_step``: one RL step in one process: the HF rollout engine samples G chains per user and the learner trains on
  them; the sampler/learner alarms (``alarm_h_T_max_diff``, ``alarm_logp_abs_diff_mean``) are reported at the
  training dtype (bf16 on GPU) against loose bounds. Then the colocated mode (``driver.colocated.ColocatedWorker``,
  HF engine on the learner's own module): two steps with a weight sync between them, the second step's alarms
  against the same bounds and its rollout's weight version.
- ``perf``: a model of the shape given by ``--shape`` (Qwen2.5-3B by default) with random weights: HF generate
  ms/token at batch 1/24/64; the learner's forward + backward time and peak memory with LM-head logits for every
  position against chain positions only; rec_head scoring of 10k/100k/1M items against the device's own matmul rate;
  the colocated full-weight hand-off (``r2ec.weight_share``, LoRA merged): packing the model into one buffer, then a
  second process reading it through a CUDA IPC handle (a shared-memory file on CPU) and copying it into weights of
  its own, checksums compared.

    python bench/gpu_check.py --out gpu_check.json            # on a GPU box: every phase, under 9 minutes
    python bench/gpu_check.py --device cpu --quick            # the CPU dry run (tiny shapes; make test runs it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("env", "checksum", "learner", "rl_step", "perf")
# Per-phase timeouts (seconds) on a GPU; the global deadline (--budget-s) bounds them all.
TIMEOUTS = {"env": 60, "checksum": 60, "learner": 240, "rl_step": 120, "perf": 300}
SHAPES = {  # random-weight models for the perf phase: (hidden, layers, heads, kv heads, intermediate, vocab)
    "qwen2.5-3b": (2048, 36, 16, 2, 11008, 151936),
    "tiny": (64, 2, 2, 2, 128, 512),
}


class Checks:
    """The PASS/FAIL/SKIP lines of one phase, printed as they come and returned as JSON."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool | None, value, note: str = "") -> None:
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append({"status": status, "name": name, "value": value, "note": note})
        print(f"{status} {name} {json.dumps(value)}{'  # ' + note if note else ''}", flush=True)


# ---------------------------------------------------------------------------------------------------- phases
def phase_env(args, checks: Checks) -> None:
    import importlib
    import platform

    import torch

    checks.add("python", True, platform.python_version())
    checks.add("torch", True, torch.__version__)
    if args.device == "cuda":
        ok = torch.cuda.is_available()
        checks.add("cuda.available", ok, torch.version.cuda)
        if not ok:
            return
        checks.add("cuda.device", True, torch.cuda.get_device_name(0))
        checks.add("cuda.capability", True, ".".join(map(str, torch.cuda.get_device_capability(0))))
        checks.add("cuda.bf16", torch.cuda.is_bf16_supported(), torch.cuda.is_bf16_supported())
        checks.add("cuda.memory_gib", True, round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    for name, needed in (("transformers", True), ("peft", True), ("deepspeed", True), ("pydantic", True),
                         ("ray", False), ("vllm", False)):
        try:
            version = getattr(importlib.import_module(name), "__version__", "?")
            checks.add(f"import.{name}", True, version)
        except Exception as e:  # noqa: BLE001 - a missing optional package is a finding, not a crash
            checks.add(f"import.{name}", False if needed else None, None, f"{type(e).__name__}: {e}"[:200])


def phase_checksum(args, checks: Checks) -> None:
    import torch

    from r2ec.weight_sync import bits_checksum

    g = torch.Generator().manual_seed(0)
    n = 4096 if args.quick else 1 << 24
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(n, generator=g).to(dtype)
        cpu, dev = bits_checksum(x), bits_checksum(x.to(args.device))
        checks.add(f"checksum.{str(dtype).removeprefix('torch.')}", cpu == dev, [cpu, dev])


def _tiny_setup(args, tmp: Path):
    """A tiny random model + LoRA, the configs of one learner rank and one step's users."""
    import torch

    from r2ec.config import LoraConfig, ModelConfig, RecPOConfig
    from r2ec.testing import build_tiny_model

    path = build_tiny_model(tmp / "tiny-model")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = ModelConfig(name_or_path=str(path), dtype=dtype, tau=0.5, lora=LoraConfig(enabled=True, r=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(10, 400, (n,), generator=g).tolist()

    users = {"prompts": [ids(8 + u) for u in range(4)], "items": [ids(6) for _ in range(24)],
             "history": torch.tensor([[0, 1, -1], [2, 3, 4], [6, -1, -1], [7, 8, 10]]),
             "target": torch.tensor([5, 9, 9, 7])}
    return model, RecPOConfig(group_size=4, relabel_topk=1), users


def _learner(args, model, recpo, zero: int, lr: float = 1e-3):
    import socket

    from learner.worker import LearnerWorker
    from r2ec.config import LearnerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LearnerConfig(zero_stage=zero, lr=lr, prompts_per_step=4, micro_batch_size=4, timeout_s=300,
                        sync_timeout_s=60)
    return LearnerWorker(model, cfg, recpo, 0, 1, "127.0.0.1", port, device=args.device, seed=0)


def _shard(users, rollout, G: int):
    import torch

    from r2ec.protocol import TrainShard

    d = rollout.h_T.shape[1]
    return TrainShard(users["prompts"], rollout, users["history"], users["target"], rollout.num_sampled_tokens,
                      len(rollout), torch.zeros(0, dtype=torch.long), torch.zeros(0, d))


def _rollout(model, users, G: int, seed: int, device: str):
    """G chains per user from the HF rollout engine (the learner's base weights: LoRA starts at zero)."""
    from r2ec.config import RolloutConfig, SamplingConfig
    from rollout.worker import RolloutWorker

    cfg = RolloutConfig(engine="hf", batch_size=4, sampling=SamplingConfig(temperature=1.0, top_k=50,
                                                                           max_new_tokens=12))
    worker = RolloutWorker(model, cfg, seed, device=device)
    return worker, worker.generate(users["prompts"], G, seed)


def phase_learner(args, checks: Checks) -> None:
    import os

    import torch

    if args.device == "cuda":  # exact resume needs deterministic kernels (cuBLAS reductions, scatter-adds)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    with tempfile.TemporaryDirectory(prefix="r2ec-gpu-check-") as tmp:
        model, recpo, users = _tiny_setup(args, Path(tmp))
        worker, first = _rollout(model, users, recpo.group_size, 1, args.device)
        rollouts = [first] + [worker.generate(users["prompts"], recpo.group_size, s) for s in (2, 3)]
        del worker
        for zero in ((2,) if args.quick else (0, 2, 3)):
            t = time.perf_counter()
            a = _learner(args, model, recpo, zero)
            table = a.encode_items(users["items"])
            a.set_items(users["items"], table)
            for r in rollouts[:2]:
                a.train_step(_shard(users, r, recpo.group_size))
            ckpt = Path(tmp) / f"zero{zero}"
            a.save_checkpoint(str(ckpt))
            table_at_save = a.table.clone()  # the learner writes re-encoded targets into its table (driver state)
            third = a.train_step(_shard(users, rollouts[2], recpo.group_size)).metrics
            w_a = a.trainable_state_dict()
            del a
            b = _learner(args, model, recpo, zero)
            b.load_checkpoint(str(ckpt))
            b.set_items(users["items"], table_at_save)
            again = b.train_step(_shard(users, rollouts[2], recpo.group_size)).metrics
            w_b = b.trainable_state_dict()
            del b
            loss_diff = max(abs(third[k] - again[k]) for k in ("loss_token", "loss_item"))
            w_diff = max(float((w_a[k].float() - w_b[k].float()).abs().max()) for k in w_a)
            checks.add(f"learner.zero{zero}.resume_loss_diff", loss_diff == 0.0, loss_diff)
            checks.add(f"learner.zero{zero}.resume_weight_diff", w_diff == 0.0, w_diff)
            checks.add(f"learner.zero{zero}.seconds", True, round(time.perf_counter() - t, 1))
            if args.device == "cuda":
                torch.cuda.empty_cache()


def phase_rl_step(args, checks: Checks) -> None:
    with tempfile.TemporaryDirectory(prefix="r2ec-gpu-check-") as tmp:
        model, recpo, users = _tiny_setup(args, Path(tmp))
        t = time.perf_counter()
        _, rollout = _rollout(model, users, recpo.group_size, 7, args.device)
        learner = _learner(args, model, recpo, zero=2)
        learner.set_items(users["items"], learner.encode_items(users["items"]))
        metrics = learner.train_step(_shard(users, rollout, recpo.group_size)).metrics
        # Loose bounds: the two sides run the same weights through different kernels (generate's KV cache against
        # one full forward); in bf16 the differences are rounding, in float32 they are near zero.
        bf16 = args.device == "cuda"
        h_bound, logp_bound = (0.5, 0.05) if bf16 else (1e-3, 1e-4)
        checks.add("rl_step.alarm_h_T_max_diff", metrics["alarm_h_T_max_diff"] < h_bound,
                   metrics["alarm_h_T_max_diff"], f"bound {h_bound}")
        checks.add("rl_step.alarm_logp_abs_diff_mean", metrics["alarm_logp_abs_diff_mean"] < logp_bound,
                   metrics["alarm_logp_abs_diff_mean"], f"bound {logp_bound}")
        checks.add("rl_step.seconds", True, round(time.perf_counter() - t, 1))
        del learner
        _colocated_steps(args, checks, model, recpo, users, (h_bound, logp_bound))


def _colocated_steps(args, checks: Checks, model, recpo, users, bounds: tuple[float, float]) -> None:
    """Two RL steps of a colocated learner rank (HF engine on its module) with a weight sync in between."""
    import socket

    from driver.colocated import ColocatedWorker
    from r2ec.config import LearnerConfig, RolloutConfig, SamplingConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    rollout_cfg = RolloutConfig(engine="hf", batch_size=4, sampling=SamplingConfig(temperature=1.0, top_k=50,
                                                                                   max_new_tokens=12))
    learner_cfg = LearnerConfig(zero_stage=2, lr=1e-3, prompts_per_step=4, micro_batch_size=4, timeout_s=300,
                                sync_timeout_s=60)
    w = ColocatedWorker(model, rollout_cfg, learner_cfg, recpo, 0, 1, "127.0.0.1", port, device=args.device, seed=0)
    w.set_items(users["items"], w.encode_items(users["items"]))
    w.train_step(_shard(users, w.generate(users["prompts"], recpo.group_size, 11), recpo.group_size))
    w.sync_weights(1)
    rollout = w.generate(users["prompts"], recpo.group_size, 12)
    metrics = w.train_step(_shard(users, rollout, recpo.group_size)).metrics
    checks.add("rl_step.colocated.weight_version", rollout.weight_version == 1, rollout.weight_version)
    for key, bound in zip(("alarm_h_T_max_diff", "alarm_logp_abs_diff_mean"), bounds, strict=True):
        checks.add(f"rl_step.colocated.{key}", metrics[key] < bound, metrics[key], f"bound {bound}")
    checks.add("rl_step.colocated.seconds", True, round(time.perf_counter() - t, 1))


def _random_model(args):
    """A DualHeadModel of ``--shape`` with random weights on the device (bf16 on GPU), LoRA as the learner's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from r2ec.model import DualHeadModel
    from r2ec.testing import build_tokenizer

    hidden, layers, heads, kv, inter, vocab = SHAPES[args.shape]
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=128, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], task_type="CAUSAL_LM"))
    return DualHeadModel(model, build_tokenizer(), tau=0.02), vocab


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def phase_perf(args, checks: Checks) -> None:
    import torch

    from bench.chain_logits import VARIANTS, fwd_bwd
    from r2ec.algo.metrics import topk_items
    from r2ec.algo.recpo import cosine_scores, unit_rows

    dual, vocab = _random_model(args)
    dual.model.eval()
    g = torch.Generator().manual_seed(0)
    new_tokens = 8 if args.quick else 64
    prompt_len = 32 if args.quick else 512
    for batch in ((1, 4) if args.quick else (1, 24, 64)):
        prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(args.device)
        with torch.no_grad():
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            dual.model.generate(input_ids=prompts, **kw)  # warm-up
            _sync(args.device)
            t = time.perf_counter()
            dual.model.generate(input_ids=prompts, **kw)
            _sync(args.device)
        checks.add(f"perf.generate_ms_per_token.batch{batch}", True,
                   round(1000 * (time.perf_counter() - t) / new_tokens, 2))

    # The learner's forward + backward of one micro-batch: every position's logits against chain positions only.
    dual.model.train()
    batch, chain_len = (2, 8) if args.quick else (8, 640)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()
    chains = torch.randint(0, vocab, (batch, chain_len), generator=g).tolist()
    for variant in VARIANTS:
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        try:
            t = time.perf_counter()
            fwd_bwd(dual, variant, prompts, chains)
            seconds = round(time.perf_counter() - t, 3)
            peak = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if args.device == "cuda" else None
            checks.add(f"perf.learner_fwd_bwd.{variant}", True, {"seconds": seconds, "peak_gib": peak})
        except torch.OutOfMemoryError as e:
            checks.add(f"perf.learner_fwd_bwd.{variant}", False, None, f"out of memory: {str(e)[:120]}")
    dual.model.eval()

    # rec_head scoring over the catalogue against the plain matmul of the same shapes.
    d = dual.model.config.hidden_size
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    h_user = torch.randn(64, d, generator=g).to(args.device, dtype)
    for items in ((10_000, 50_000) if args.quick else (10_000, 100_000, 1_000_000)):
        table = unit_rows(torch.randn(items, d, generator=g).to(args.device, dtype))
        with torch.no_grad():
            for _ in range(2):  # the second run is timed
                _sync(args.device)
                t = time.perf_counter()
                topk_items(cosine_scores(h_user, table, 0.02, items_unit=True), 20)
                _sync(args.device)
                scoring = time.perf_counter() - t
                t = time.perf_counter()
                h_user @ table.T
                _sync(args.device)
                matmul = time.perf_counter() - t
        flops = 2 * 64 * d * items
        checks.add(f"perf.rec_head.items{items}", True,
                   {"scoring_ms": round(1000 * scoring, 2), "matmul_tflops": round(flops / matmul / 1e12, 2),
                    "frac_of_matmul": round(matmul / scoring, 3)})
        del table
    del h_user
    if args.device == "cuda":
        torch.cuda.empty_cache()
    _handoff(args, checks, dual)


def _handoff_reader(conn, device: str) -> None:
    """A second process, as a colocated vLLM engine is: map the learner's buffer, copy it into weights of its own."""
    import torch

    from r2ec.weight_share import checksum, from_cuda_handle, open_file_buffer, views

    metas, nbytes = conn.recv()
    own = {m.name: torch.empty(m.shape, dtype=m.torch_dtype, device=device) for m in metas}
    conn.send("ready")
    source = conn.recv()
    _sync(device)
    t = time.perf_counter()
    buf = open_file_buffer(source["file"], nbytes) if "file" in source else from_cuda_handle(source["cuda_ipc"])
    for name, view in views(buf, metas):
        own[name].copy_(view)
    total = checksum(buf)
    _sync(device)
    conn.send((total, time.perf_counter() - t))


def _handoff(args, checks: Checks, dual) -> None:
    """The colocated weight hand-off of the perf model: pack (LoRA merged), then another process reads it."""
    import contextlib
    import multiprocessing as mp
    import os

    import torch

    from learner.weights import WeightExport
    from r2ec.weight_share import cuda_handle, file_buffer, layout, pack

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    export = WeightExport(dual.model.get_base_model(), 0, False, dtype, lambda params: contextlib.nullcontext())
    named, metas = list(export.full_weights()), export.metas()  # the learner's own export: LoRA merged
    _, nbytes = layout(metas)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    reader = ctx.Process(target=_handoff_reader, args=(there, args.device))
    reader.start()
    try:
        here.send((metas, nbytes))
        if not here.poll(120) or here.recv() != "ready":
            raise RuntimeError("the hand-off reader did not start within 120s")
        path = None
        _sync(args.device)
        t = time.perf_counter()
        if args.device == "cuda":
            buf = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
            sent = pack(buf, metas, iter(named))
            _sync(args.device)
            source = {"cuda_ipc": cuda_handle(buf)}
        else:
            buf, path = file_buffer(nbytes)
            sent = pack(buf, metas, iter(named))
            source = {"file": path, "nbytes": nbytes}
        packed = time.perf_counter() - t
        here.send(source)
        if not here.poll(120):
            raise RuntimeError("the hand-off reader did not answer within 120s")
        got, read = here.recv()
        total = time.perf_counter() - t
        del buf
        if path is not None:
            os.remove(path)
    finally:
        reader.join(30)
        if reader.is_alive():
            reader.kill()
    how = "cuda_ipc" if args.device == "cuda" else "shm_file"
    checks.add(f"perf.weight_handoff.{how}.checksum_equal", got == sent, got == sent)
    checks.add(f"perf.weight_handoff.{how}", True,
               {"gib": round(nbytes / 2**30, 3), "pack_s": round(packed, 3), "read_and_copy_s": round(read, 3),
                "total_s": round(total, 3)})


PHASE_FUNCS = {"env": phase_env, "checksum": phase_checksum, "learner": phase_learner, "rl_step": phase_rl_step,
               "perf": phase_perf}


# ---------------------------------------------------------------------------------------------------- driver
def run_phase(args) -> None:
    """Inside the phase's subprocess: run it and print its rows as the last line."""
    checks = Checks()
    try:
        PHASE_FUNCS[args.phase](args, checks)
    except Exception as e:  # noqa: BLE001 - a crashing phase is a FAIL line, and the next phase still runs
        import traceback

        traceback.print_exc()
        checks.add(f"{args.phase}.error", False, None, f"{type(e).__name__}: {e}"[:300])
    print("ROWS " + json.dumps(checks.rows), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and one ZeRO stage: the CPU dry run")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="the perf phase's model shape")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    ap.add_argument("--budget-s", type=float, default=540, help="global deadline for every phase together")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    args = ap.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.quick else "qwen2.5-3b")
    if args.phase:
        run_phase(args)
        return 0
    deadline = time.monotonic() + args.budget_s
    record = {"command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]), "device": args.device,
              "quick": args.quick, "shape": args.shape, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "phases": {}}
    failed = 0
    for phase in [p.strip() for p in args.phases.split(",") if p.strip()]:
        if phase not in PHASES:
            raise SystemExit(f"gpu_check: unknown phase {phase!r}; expected some of {', '.join(PHASES)}")
        left = deadline - time.monotonic()
        timeout = min(TIMEOUTS[phase] * (3 if args.device == "cpu" else 1), left)
        print(f"== {phase} (timeout {timeout:.0f}s)", flush=True)
        if timeout < 5:
            record["phases"][phase] = {"status": "SKIP", "reason": "global deadline reached", "rows": []}
            print(f"SKIP {phase} global deadline reached", flush=True)
            continue
        cmd = [sys.executable, __file__, "--phase", phase, "--device", args.device, "--shape", args.shape]
        cmd += ["--quick"] if args.quick else []
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = proc.stdout.splitlines()
            rows = json.loads(lines[-1][5:]) if lines and lines[-1].startswith("ROWS ") else []
            for line in lines:
                if not line.startswith("ROWS "):
                    print(line, flush=True)
            status = "PASS" if proc.returncode == 0 and rows and all(r["status"] != "FAIL" for r in rows) else "FAIL"
            detail = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:] if status == "FAIL" else ""}
        except subprocess.TimeoutExpired as e:
            rows, status = [], "FAIL"
            detail = {"returncode": None, "stderr_tail": f"timed out after {timeout:.0f}s; "
                                                        f"{(e.stderr or b'')[-2000:]!r}"}
            print(f"FAIL {phase} timed out after {timeout:.0f}s", flush=True)
        failed += status == "FAIL"
        record["phases"][phase] = {"status": status, "seconds": round(time.perf_counter() - t, 1), "rows": rows,
                                   **detail}
    record["failed_phases"] = failed
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'all phases passed' if not failed else f'{failed} phase(s) failed'} -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
