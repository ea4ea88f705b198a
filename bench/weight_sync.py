"""Weight sync: seconds and GB/s to broadcast the policy from learner rank 0 to 1 and 2 rollout workers.

What it measures: one full weight update as a training step ends it: learner rank 0 exports its weights (Hugging
Face names, ``lm_head.weight`` listed explicitly although it is tied, LoRA merged when the learner trains LoRA) and
broadcasts them bucket by bucket (``r2ec.weight_sync.send`` with ``plan_buckets``, default bucket 256 MiB as
``learner.sync_bucket_mb``) over the gloo group of ``r2ec.weight_sync.open_group`` on 127.0.0.1; every rollout
worker receives and loads them in place (``RolloutWorker.receive_weights``). Cases:

- ``full``: the learner trains the full model; its tensors are sent as they are.
- ``lora-merged``: the learner holds a peft LoRA model (the project's LoRA config: r 4, all linear projections);
  each LoRA layer's weight is merged (W + B A * scaling) while the stream is produced, as the learner does.
  ``export_s`` is the time to produce the whole stream without sending it (the merges; ~0 for ``full``).
- ``lora-delta``: the same LoRA learner with ``learner.weight_sync: lora_delta`` (``r2ec/lora_delta.py``): only the
  adapters are sent, and each receiver merges them onto the base weights it read from the model folder (once, at
  its first delta: that read falls in the unmeasured round) and loads the merged layers in place.

Every case runs side by side: each repetition syncs every case once, in turn. The JSON's top level compares the
LoRA-delta sync with the full one (``full_s``, ``full_bytes``, ``lora_delta_s``, ``lora_delta_bytes`` and their
ratios) on the vLLM receiver where it ran, else on one HF receiver (``pair`` says which).

How: the sender is this process and runs the learner's own export code (``learner.weights.WeightExport``'s ``metas``
and ``full_weights`` on the model without DeepSpeed, i.e. what ZeRO-0/1/2 rank 0 does; ZeRO-3 adds one parameter
gather per module, not measured) and ``send`` as ``broadcast_weights`` calls it. Receivers are real
``RolloutWorker`` processes (torch.multiprocessing spawn) with the HF engine; the time of a sync runs from the start
of ``send`` until the last receiver has finished ``receive_weights`` (receive, per-bucket checksum, copy into the
model's parameters); the receivers' checksums are checked against the sender's. One unmeasured sync first, then the
median of ``--repeat`` syncs. Optionally (on by default when vLLM is installed, off with ``--no-vllm``) a rollout
worker with the vLLM engine takes the ``full`` and ``lora-delta`` broadcasts alone (vLLM's in-place layer-wise
reload, heavier: reported in its own rows; ``lora-merged`` differs from ``full`` only on the sender side), once per
``--vllm-threads-bind`` value (``rollout.vllm.cpu_threads_bind``; default the quickstart's ``all``: every core, two
OpenMP threads on a 2-core machine, where ``auto`` gives one). The delta's receiver work (merge, vLLM's repack)
scales with its threads; a full sync is mostly the broadcast.

Baseline (``copy_s``, ``copy_gb_s``): a plain in-memory copy of the same bytes in one process, ``Tensor.copy_`` of
every exported tensor into preallocated buffers (median of 3 or more); ``sync_over_copy`` = sync seconds / copy
seconds. ``checksum_s`` is the time of ``r2ec.weight_sync.bits_checksum`` over one sync's buckets, measured alone in
the sender: the sender and every receiver each pay it once per sync, inside ``send_s`` / ``receive_s``.

Caveats: every process runs with ``--threads`` torch threads (default 1; the vLLM receiver's compute threads follow
its ``cpu_threads_bind``) and all of them share the machine's cores
(on a 2-core machine the sender and two receivers oversubscribe the CPU; in a deployment each worker has its own).
Loopback gloo measures memory copies and the TCP stack, not a network. GB = 1e9 bytes; ``gb_s`` is the bytes one
receiver gets per second (the sender pushes receivers x that). The load average before and after is recorded.

``--quick`` is a smoke run of the same code (a tiny random model built on the fly, one sync per case, no
vLLM); its numbers mean nothing (``settings.quick`` is true in the JSON; pass ``--out-dir`` to keep it away from the
real results).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import RunClock, report, run_with_quick_model, timeit  # noqa: E402

NAME = "weight_sync"
DEFAULT_MODEL = "asset://smollm2-135m-instruct"
COLUMNS = ["case", "engine", "threads_bind", "receivers", "tensors", "bytes", "export_s", "checksum_s", "send_s", "receive_s", "seconds",
           "gb_s", "copy_s", "copy_gb_s", "sync_over_copy"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model.dtype: the dtype broadcast and served")
    p.add_argument("--bucket-mb", type=int, default=256, help="learner.sync_bucket_mb")
    p.add_argument("--receivers", type=int, nargs="+", default=[1, 2], help="HF rollout workers per case")
    p.add_argument("--repeat", type=int, default=5, help="timed syncs per case (median), after one warm-up round")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    p.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip the vLLM receiver")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM receiver: rollout.vllm.cpu_kvcache_space_gib")
    p.add_argument("--vllm-threads-bind", nargs="+", default=["all"],
                   help="vLLM receiver: rollout.vllm.cpu_threads_bind, one receiver (and its rows) per value; the\n"
                        "first gives the headline pair (default: the quickstart's all)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a stuck sync fails")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny random model built on the fly (unless --model is given), 1 receiver, "
                        "1 timed sync per case, no warm-up, no vLLM")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.vllm = 1, False
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ receiver process
def _receiver(index: int, engine: str, model_cfg, kv_cache_gib: int, threads: int, threads_bind: str, commands,
              results) -> None:
    """One rollout worker: load, then serve join / receive / stop commands from the sender."""
    torch.set_num_threads(threads)
    from r2ec.config import RolloutConfig, VllmConfig
    from rollout.worker import RolloutWorker

    try:
        t = time.perf_counter()
        rollout_cfg = RolloutConfig(engine=engine, vllm=VllmConfig(cpu_kvcache_space_gib=kv_cache_gib,
                                                                   cpu_threads_bind=threads_bind))
        worker = RolloutWorker(model_cfg, rollout_cfg, seed=0, device="cpu", worker_index=index)
        results.put(("ready", index, time.perf_counter() - t))
        while True:
            cmd, *rest = commands.get()
            if cmd == "join":
                info, rank = rest
                worker.join_sync_group(info, rank)
                results.put(("joined", index, rank))
            elif cmd == "receive":
                metas, bucket_bytes, version, delta = rest
                t = time.perf_counter()
                checksum = worker.receive_weights(metas, bucket_bytes, version, delta)
                results.put(("received", index, time.perf_counter() - t, time.perf_counter(), checksum))
            else:
                break
        if hasattr(worker.engine, "close"):
            worker.engine.close()
    except BaseException as e:  # report instead of leaving the sender waiting
        results.put(("error", index, f"{type(e).__name__}: {e}"))
        raise


class Receivers:
    """Receiver processes and their command queues; ``expect`` waits for their replies (and notices deaths)."""

    def __init__(self, engine: str, count: int, first_index: int, model_cfg, args: argparse.Namespace,
                 threads_bind: str = "auto"):
        ctx = torch.multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(count)]
        self.indices = list(range(first_index, first_index + count))
        self.procs = [ctx.Process(target=_receiver, daemon=False,  # vLLM starts processes of its own
                                  args=(i, engine, model_cfg, args.kv_cache_gib, args.threads, threads_bind, q,
                                        self.results))
                      for i, q in zip(self.indices, self.commands, strict=True)]
        self.timeout = args.timeout
        for p in self.procs:
            p.start()

    def expect(self, kind: str, n: int) -> list[tuple]:
        out, deadline = [], time.monotonic() + self.timeout
        while len(out) < n:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.pid for p in self.procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"receivers: waiting for {kind!r}; dead {dead}, timed out "
                                       f"{time.monotonic() > deadline}") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"receiver {msg[1]} failed: {msg[2]}")
            if msg[0] != kind:
                raise RuntimeError(f"receivers: expected {kind!r}, got {msg!r}")
            out.append(msg)
        return out

    def send(self, which: list[int], *cmd) -> None:
        for i in which:
            self.commands[self.indices.index(i)].put(cmd)

    def stop(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


# ------------------------------------------------------------------------------------------------ sender
def learner_export(model_cfg, lora_delta: bool = False):
    """The learner's own export code (``WeightExport``, ZeRO-0/1/2 path: no gathers) on ``model_cfg``'s model, held
    as the learner holds it, without DeepSpeed. LoRA adapters get random B so the merge is real; ``lora_delta``
    prepares the LoRA-delta sync (``learner.weight_sync: lora_delta``)."""
    import contextlib

    from learner.ds_config import training_dtype
    from learner.weights import WeightExport
    from r2ec.model import DualHeadModel

    # The learner holds the model in its training dtype (float32 on CPU) and sends it in model.dtype.
    dual = DualHeadModel.from_config(model_cfg.model_copy(update={"dtype": training_dtype(model_cfg.dtype, "cpu")}))
    model = dual.model
    if model_cfg.lora.enabled:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return WeightExport(base, 0, False, model_cfg.dtype, lambda params: contextlib.nullcontext(), lora_delta=lora_delta)


def copy_baseline(learner, repeat: int) -> float:
    """Median seconds of Tensor.copy_ of every exported tensor into preallocated buffers (same bytes as a sync)."""
    src = [t for _, t in learner.full_weights()]
    dst = [torch.empty_like(t) for t in src]

    def copy() -> None:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    return timeit(copy, repeat=max(repeat, 3), warmup=1)


def checksum_seconds(learner, bucket_bytes: int) -> float:
    """Seconds of ``bits_checksum`` over every bucket of one sync: what each side adds to the transfer."""
    from r2ec.weight_sync import bits_checksum, plan_buckets

    metas, tensors = learner.metas(), [t for _, t in learner.full_weights()]
    total = 0.0
    for bucket in plan_buckets(metas, bucket_bytes):
        buf = torch.cat([tensors[i].reshape(-1) for i in bucket])
        t = time.perf_counter()
        bits_checksum(buf)
        total += time.perf_counter() - t
    return total


def delta_floor(learner, model_path: str, repeat: int, full_s: float | None) -> dict:
    """What a LoRA-delta sync into a CPU vLLM engine costs without any transport: the receiver's merge
    (``DeltaApplier.merged`` over the learner's own delta stream, W0 already read) and, where vLLM is installed,
    the oneDNN packing its CPU linear layers redo for every merged weight (``create_onednn_mm``, what vLLM's
    layer-wise reload runs after loading a layer; vLLM also concatenates q, k, v and gate, up first, not counted).
    Both in this process on ``--threads`` threads, medians; ``floor_over_full_s`` divides their sum by the full
    sync's seconds on the vLLM receiver."""
    from r2ec.assets import resolve
    from r2ec.lora_delta import DeltaApplier

    applier, plan = DeltaApplier(resolve(model_path)), learner.delta_plan()
    merged: list[torch.Tensor] = []

    def merge() -> None:
        merged[:] = [t for _, t in applier.merged(plan, learner.delta_tensors())]

    out = {"merge_s": timeit(merge, repeat=max(repeat, 3), warmup=1), "merged_tensors": len(merged),
           "merged_bytes": sum(t.nbytes for t in merged)}
    if importlib.util.find_spec("vllm") is not None:
        from vllm import _custom_ops as ops

        if getattr(ops, "_supports_onednn", False):
            weights = [t for t in merged if t.dim() == 2]
            out["repack_s"] = timeit(lambda: [ops.create_onednn_mm(w.t(), 32) for w in weights],
                                     repeat=max(repeat, 3), warmup=1)
    out["floor_s"] = out["merge_s"] + out.get("repack_s", 0.0)
    if full_s:
        out["floor_over_full_s"] = out["floor_s"] / full_s
    return out


def _stream(case: str, learner):
    """What one sync of ``case`` sends: (metas, tensors, the delta plan or None)."""
    if case == "lora-delta":
        plan = learner.delta_plan()
        return list(plan.metas), learner.delta_tensors(), plan
    return learner.metas(), learner.full_weights(), None


def run_cases(cases: dict, engine: str, group, receivers: Receivers, which: list[int], args, version: list[int],
              copy_s: float, checksum_s: float) -> list[dict]:
    """Every case's syncs, alternating case by case within each repetition (side by side on the same machine
    state), one unmeasured round first; one row per case."""
    from r2ec.weight_sync import send

    bucket_bytes = args.bucket_mb * 2**20
    times: dict[str, dict[str, list[float]]] = {c: {"export": [], "send": [], "total": [], "receive": []} for c in cases}
    for rep in range(args.repeat + (0 if args.quick else 1)):
        for case, learner in cases.items():
            t = time.perf_counter()
            for _ in _stream(case, learner)[1]:
                pass
            export_s = time.perf_counter() - t
            metas, tensors, plan = _stream(case, learner)
            version[0] += 1
            receivers.send(which, "receive", metas, bucket_bytes, version[0], plan)
            t0 = time.perf_counter()
            sent = send(group, metas, tensors, bucket_bytes)
            t_send = time.perf_counter() - t0
            got = receivers.expect("received", len(which))
            t_all = max(msg[3] for msg in got) - t0  # perf_counter is the system-wide monotonic clock on Linux
            bad = [msg[1] for msg in got if msg[4] != sent]
            if bad:
                raise RuntimeError(f"{case}: receivers {bad} got a different checksum than was sent")
            if rep or args.quick:
                for key, value in (("export", export_s), ("send", t_send), ("total", t_all),
                                   ("receive", max(msg[2] for msg in got))):
                    times[case][key].append(value)
    rows = []
    for case, learner in cases.items():
        metas = _stream(case, learner)[0]
        nbytes = sum(m.nbytes for m in metas)
        med = statistics.median(times[case]["total"])
        rows.append({
            "case": case, "engine": engine, "receivers": len(which), "tensors": len(metas), "gb": nbytes / 1e9,
            "bytes": nbytes, "export_s": statistics.median(times[case]["export"]), "checksum_s": checksum_s,
            "send_s": statistics.median(times[case]["send"]), "receive_s": statistics.median(times[case]["receive"]),
            "seconds": med, "gb_s": nbytes / med / 1e9, "copy_s": copy_s, "copy_gb_s": nbytes / copy_s / 1e9,
            "sync_over_copy": med / copy_s, "measured_syncs": len(times[case]["total"]),
            "all_seconds": times[case]["total"]})
        print(f"{case} -> {len(which)} {engine} receiver(s): {med:.3f} s, {nbytes / 1e6:.1f} MB "
              f"({rows[-1]['sync_over_copy']:.2f}x a plain copy of the full model)", flush=True)
    return rows


def delta_vs_full(rows: list[dict], threads_bind: str | None = None) -> dict:
    """The LoRA-delta sync against the full one, from the same run: the vLLM receiver's rows where it ran (the
    engine a run uses; its first ``--vllm-threads-bind`` unless ``threads_bind`` names another), else one HF
    receiver's."""
    vllm_rows = [r for r in rows if r["engine"] == "vllm"]
    bind = threads_bind or (vllm_rows[0]["threads_bind"] if vllm_rows else None)
    for engine in ("vllm", "hf"):
        pair = {r["case"]: r for r in rows if r["engine"] == engine and r["receivers"] == 1
                and r.get("threads_bind") in (None, bind)}
        if "full" in pair and "lora-delta" in pair:
            full, delta = pair["full"], pair["lora-delta"]
            where = f", cpu_threads_bind {bind}" if engine == "vllm" else ""
            return {"pair": f"{engine}, 1 receiver{where}", "full_s": full["seconds"], "full_bytes": full["bytes"],
                    "lora_delta_s": delta["seconds"], "lora_delta_bytes": delta["bytes"],
                    "lora_delta_over_full_s": delta["seconds"] / full["seconds"],
                    "lora_delta_over_full_bytes": delta["bytes"] / full["bytes"]}
    return {}


def open_with(receivers: Receivers, which: list[int], timeout: float):
    """A new broadcast group: rank 0 here, the receivers ``which`` as ranks 1.. (blocks until all have joined)."""
    from r2ec.weight_sync import SyncGroup, open_group

    info = SyncGroup("127.0.0.1", _free_port(), world_size=1 + len(which), backend="gloo", timeout_s=timeout)
    for rank, i in enumerate(which, start=1):
        receivers.send([i], "join", info, rank)
    group = open_group(info, 0)
    receivers.expect("joined", len(which))
    return group


def main(argv: list[str] | None = None) -> None:
    run_with_quick_model(_parse(argv), run, DEFAULT_MODEL)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # inherited by the receiver processes
    from r2ec.config import LoraConfig, ModelConfig
    from r2ec.weight_sync import close_group

    clock = RunClock()
    base_cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype)
    lora_cfg = base_cfg.model_copy(update={"lora": LoraConfig(enabled=True)})
    n_hf = max(args.receivers)
    hf = Receivers("hf", n_hf, 0, base_cfg, args)  # they load while the sender builds its models
    learners = {"full": learner_export(base_cfg), "lora-merged": learner_export(lora_cfg),
                "lora-delta": learner_export(lora_cfg, lora_delta=True)}
    metas = [learners[case].metas() for case in ("full", "lora-merged")]
    if metas[0] != metas[1]:
        raise RuntimeError("the LoRA learner's merged export does not match the full model's names and shapes")
    copy_s = copy_baseline(learners["full"], args.repeat)
    checksum_s = checksum_seconds(learners["full"], args.bucket_mb * 2**20)
    load_s = [msg[2] for msg in hf.expect("ready", n_hf)]
    rows, version = [], [0]
    try:
        for count in args.receivers:
            which = hf.indices[:count]
            group = open_with(hf, which, args.timeout)
            rows += run_cases(learners, "hf", group, hf, which, args, version, copy_s, checksum_s)
            close_group(group)
    finally:
        hf.stop()
    vllm_note = "skipped (--no-vllm or --quick)"
    if args.vllm:
        if importlib.util.find_spec("vllm") is None:  # the receiver imports it, not this process
            vllm_note = "skipped: vLLM is not installed"
        else:
            notes = []
            for i, bind in enumerate(args.vllm_threads_bind):  # one receiver at a time, each bind its own rows
                t = time.perf_counter()
                vl = Receivers("vllm", 1, n_hf + i, base_cfg, args, threads_bind=bind)
                try:
                    vl.expect("ready", 1)
                    notes.append(f"vLLM receiver (cpu_threads_bind {bind}) started in {time.perf_counter() - t:.1f} s")
                    group = open_with(vl, vl.indices, args.timeout)
                    # Not lora-merged: its merge is sender-side work, already measured in the HF rows.
                    cases = {case: learners[case] for case in ("full", "lora-delta")}
                    got = run_cases(cases, "vllm", group, vl, vl.indices, args, version, copy_s, checksum_s)
                    rows += [{**r, "threads_bind": bind} for r in got]
                    close_group(group)
                finally:
                    vl.stop()
            vllm_note = "; ".join(notes)
    model = "tiny random model (r2ec.testing.build_tiny_model)" if getattr(args, "tiny_model", False) else args.model
    settings = {"model": model, "dtype": args.dtype, "bucket_mb": args.bucket_mb, "repeat": args.repeat,
                "warmup_syncs": 0 if args.quick else 1, "threads_per_process": args.threads, "backend": "gloo",
                "address": "127.0.0.1", "lora": LoraConfig(enabled=True).model_dump(), "quick": args.quick,
                "hf_receiver_load_s": load_s, "vllm": vllm_note, **clock.fields()}
    notes = ("seconds: start of send -> last receiver done loading in place (median); gb_s per receiver; "
             "copy: Tensor.copy_ of the same bytes in one process; sync_over_copy = seconds / copy_s")
    pair = delta_vs_full(rows)
    if len(args.vllm_threads_bind) > 1:  # the other receivers' pairs, each side by side within its own rows
        pair["pairs_by_threads_bind"] = {b: delta_vs_full(rows, b) for b in args.vllm_threads_bind}
    floor = delta_floor(learners["lora-delta"], args.model, args.repeat, pair.get("full_s"))
    print(f"LoRA-delta floor without transport: merge {floor['merge_s']:.3f} s + oneDNN repack "
          f"{floor.get('repack_s', float('nan')):.3f} s", flush=True)
    report(NAME, rows, COLUMNS, out_dir=Path(args.out_dir) if args.out_dir else None,
           settings=settings, notes=notes, **pair, lora_delta_floor=floor)


if __name__ == "__main__":
    main()
