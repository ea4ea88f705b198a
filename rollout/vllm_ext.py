"""Code that runs inside vLLM's model worker process(es): hidden-state capture and in-place weight updates.

``VllmEngine`` passes ``worker_extension_cls="rollout.vllm_ext.R2ecWorkerExtension"`` to ``vllm.LLM``; vLLM then
adds this class to its worker's bases, and ``llm.collective_rpc("r2ec_...")`` calls these methods on every worker
(one per tensor-parallel rank). Method and attribute names carry an ``r2ec_`` prefix because vLLM refuses an
extension whose names collide with the worker's.

Written against vLLM 0.32 (``rollout.vllm_engine`` checks the version before it starts an engine). The vLLM internals
used here, and why:

- ``self.model_runner`` (the V1 ``GPUModelRunner``, or ``CPUModelRunner`` which subclasses it) and its per-step
  state, read from inside a forward hook to map the flattened token batch back to requests:
  ``input_batch.req_ids`` (request order within the step), ``query_start_loc.np`` (token offsets of each request,
  filled for the step before the forward runs), ``input_batch.num_computed_tokens_cpu`` (tokens already computed
  before this step: prefix-cache hits plus earlier prefill chunks) and ``requests[req_id]`` (``prompt_token_ids``,
  ``num_tokens``). The engine forces the V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``), whose state differs.
- ``self.model_runner.get_model().model.norm``: the final norm, hooked; vLLM's RMSNorm returns
  ``(hidden, residual)`` when it fuses the residual add, so the first element is taken.
- ``self.reload_weights(weights_iterator=..., is_checkpoint_format=True)`` (``vllm.v1.worker.gpu_worker.Worker``):
  loads checkpoint-named tensors in place through vLLM's layer-wise reload, which re-runs each layer's
  post-load processing (on CPU that rebuilds the packed GEMM weights). A raw ``model.load_weights`` after start
  skips that processing (on the CPU backend it fails).
- ``lm_head.quant_method.process_weights_after_loading(lm_head)``: with tied embeddings vLLM's loader skips
  ``lm_head.weight`` (an alias of ``embed_tokens.weight``), so the reload never re-runs the LM head's own CPU GEMM
  dispatch (``cpu_linear``, built from the weight at load time). With the float32 oneDNN path the tests use, the
  logits followed the new embedding even without this (the oneDNN handle apparently reads the weight storage,
  which the reload updates in place), but the packed-weight paths (sgl / zentorch kernels) hold a packed copy;
  rebuilding it is cheap and makes the logits follow the new embedding on every path. A no-op on GPUs.
- ``vllm.distributed.parallel_state.get_tensor_model_parallel_rank``: this worker's rank in the broadcast group.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Capture:
    """Rows wanted by one ``last_hidden`` call: sequence -> output rows (a sequence may be asked for twice)."""

    rows: dict[tuple[int, ...], list[int]]
    h: torch.Tensor  # (N, d) float32, filled by the hook
    filled: torch.Tensor  # (N,) bool


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's final norm (Llama, Qwen2, Mistral, Gemma-2, SmolLM2 all name it ``model.norm``)."""
    inner = model.get_language_model() if hasattr(model, "get_language_model") else model
    norm = getattr(getattr(inner, "model", None), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise RuntimeError(f"r2ec: cannot find the final norm (model.norm) in vLLM model {type(model).__name__}")
    return norm


class R2ecWorkerExtension:
    """Mixed into vLLM's worker; ``self`` is the worker (``model_runner``, ``device``, ``reload_weights``)."""

    # ------------------------------------------------------------------------------------------ hidden states
    def r2ec_setup(self) -> dict[str, Any]:
        """Install the final-norm hook once and check that the runner exposes the state the hook reads."""
        runner = self.model_runner  # type: ignore[attr-defined]
        missing = [a for a in ("input_batch", "query_start_loc", "requests") if not hasattr(runner, a)]
        if missing:
            raise RuntimeError(
                f"r2ec: vLLM model runner {type(runner).__name__} lacks {missing}; hidden-state capture needs the "
                "V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        if getattr(self, "_r2ec_hook", None) is None:
            self._r2ec_capture: _Capture | None = None
            self._r2ec_hook = _final_norm(runner.get_model()).register_forward_hook(self._r2ec_on_norm)
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return {"runner": type(runner).__name__, "tp_rank": get_tensor_model_parallel_rank(),
                "device": str(self.device)}  # type: ignore[attr-defined]

    def r2ec_begin_capture(self, seqs: Sequence[Sequence[int]], hidden_size: int) -> None:
        """Arm the hook for the next prefill: remember which rows each sequence fills."""
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(seqs):
            rows.setdefault(tuple(s), []).append(i)
        n = len(seqs)
        self._r2ec_capture = _Capture(rows, torch.zeros((n, hidden_size), dtype=torch.float32),
                                      torch.zeros(n, dtype=torch.bool))

    def r2ec_end_capture(self) -> tuple[bytes, list[bool]]:
        """Disarm the hook; returns h (N, d) float32 as raw bytes and which rows were filled.

        Plain bytes and lists because the reply crosses vLLM's RPC serialisers (msgpack between processes),
        which turn tuples of tensors into nested lists."""
        cap = self._r2ec_capture
        self._r2ec_capture = None
        if cap is None:
            raise RuntimeError("r2ec: end_capture without begin_capture")
        return cap.h.numpy().tobytes(), cap.filled.tolist()

    def _r2ec_on_norm(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        cap = self._r2ec_capture
        if cap is None:
            return
        h = output[0] if isinstance(output, tuple) else output
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        # Offsets of each request's tokens in this step's flattened batch (prefix-cache hits and earlier chunks
        # are not in it: only the tokens scheduled now are).
        qsl = runner.query_start_loc.np[: num_reqs + 1]
        src: list[int] = []  # token rows of this step's batch ...
        dst: list[list[int]] = []  # ... and the output rows they go to
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            end = int(qsl[i + 1])
            scheduled = end - int(qsl[i])
            if scheduled <= 0:
                continue
            state = runner.requests[req_id]
            # Only the step whose chunk reaches the sequence's last token holds the row we want: earlier chunks
            # of a chunked prefill end mid-sequence.
            if int(batch.num_computed_tokens_cpu[i]) + scheduled < state.num_tokens:
                continue
            wanted = cap.rows.get(tuple(state.prompt_token_ids))
            if wanted is not None:
                src.append(end - 1)
                dst.append(wanted)
        if not src:
            return
        # One gather and one device-to-host copy per step.
        rows = h[torch.as_tensor(src, device=h.device)].detach().to(device="cpu", dtype=torch.float32)
        for row, wanted in zip(rows, dst, strict=True):
            idx = torch.as_tensor(wanted, dtype=torch.long)
            cap.h[idx] = row
            cap.filled[idx] = True

    # ------------------------------------------------------------------------------------------ weight sync
    def r2ec_join_sync_group(self, info: dict[str, Any], first_rank: int) -> int:
        """Join the learner's broadcast group as rank first_rank + tp_rank (blocks until every member joins)."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        from r2ec.weight_sync import SyncGroup, close_group, open_group

        rank = first_rank + get_tensor_model_parallel_rank()
        # A second join means the driver rebuilt the group (a rollout worker was replaced): drop the old one first.
        close_group(getattr(self, "_r2ec_group", None))
        self._r2ec_group = None
        self._r2ec_group = open_group(SyncGroup(**info), rank)
        return rank

    def r2ec_receive_weights(self, metas: Sequence[tuple[str, str, Sequence[int]]], bucket_bytes: int,
                             delta: dict[str, Any] | None = None) -> float:
        """Receive one broadcast straight into vLLM's in-place reload; returns the receive checksum. With ``delta``
        (``DeltaPlan.to_plain()``), a LoRA-delta sync: the merged weights of its targets are reloaded, every other
        layer keeps what it holds."""
        from r2ec.lora_delta import DeltaApplier, DeltaPlan
        from r2ec.weight_sync import TensorMeta, receive

        group = getattr(self, "_r2ec_group", None)
        if group is None:
            raise RuntimeError("r2ec: receive_weights before join_sync_group")
        ms = [TensorMeta(name, dtype, tuple(shape)) for name, dtype, shape in metas]
        checksum = [0]
        stream = receive(group, ms, bucket_bytes, device=self.device, checksum=checksum)  # type: ignore[attr-defined]
        if delta is None:
            self._r2ec_reload(stream, len(ms), "broadcast")
            return checksum[0]
        plan = DeltaPlan.from_plain(delta)
        if getattr(self, "_r2ec_delta", None) is None:  # the base weights are read from the served model's folder
            self._r2ec_delta = DeltaApplier(self.model_runner.model_config.model)  # type: ignore[attr-defined]
        also = self._r2ec_fused_siblings(plan)
        with _quiet_partial_reload():
            self._r2ec_reload(self._r2ec_delta.merged(plan, stream, also), plan.num_loaded + len(also), "merged",
                              tied_head=any(m.name.endswith("embed_tokens.weight") for m in plan.metas))
        return checksum[0]

    def _r2ec_fused_siblings(self, plan: Any) -> list[str]:
        """Base weights to reload with a delta: the shards of a fused layer (``packed_modules_mapping``, e.g.
        qkv_proj = q, k, v) that LoRA does not target, when another shard of it is targeted. The layer-wise reload
        processes a fused layer once all its elements are loaded; a partial one would be processed with the
        missing shards never written."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        mapping = getattr(model, "packed_modules_mapping", None) or {}
        targets = {t.module for t in plan.targets}
        extra: set[str] = set()
        for module in targets:
            parent, _, leaf = module.rpartition(".")
            for shards in mapping.values():
                if leaf in shards:
                    extra.update(f"{parent}.{s}.weight" for s in shards if f"{parent}.{s}" not in targets)
        return sorted(extra)

    def r2ec_load_packed(self, source: dict[str, Any], metas: Sequence[tuple[str, str, Sequence[int]]]) -> int:
        """Colocated: reload every weight from the learner's flat buffer on this host (``r2ec.weight_share``);
        returns the checksum of the buffer as read here."""
        from r2ec.weight_share import checksum, from_cuda_handle, open_file_buffer, views
        from r2ec.weight_sync import TensorMeta

        ms = [TensorMeta(name, dtype, tuple(shape)) for name, dtype, shape in metas]
        if "file" in source:
            buf = open_file_buffer(source["file"], int(source["nbytes"]))
        else:
            buf = from_cuda_handle(source["cuda_ipc"], self.device.index)  # type: ignore[attr-defined]
        self._r2ec_reload(views(buf, ms), len(ms), "handed over")
        total = checksum(buf)
        del buf  # the learner frees its buffer once this returns
        return total

    def _r2ec_reload(self, weights: Iterator[tuple[str, torch.Tensor]], expected: int, how: str,
                     tied_head: bool = True) -> None:
        """Feed ``weights`` to vLLM's in-place reload, check it took all ``expected`` tensors, refresh a tied head
        (unless ``tied_head`` is False: the embedding was not in ``weights``)."""
        counted = _Counted(weights)
        try:
            self.reload_weights(weights_iterator=counted, is_checkpoint_format=True)  # type: ignore[attr-defined]
        finally:
            consumed = counted.n
            # A broadcast's sender sends every bucket whatever we do with them: drain what the loader left unread, or
            # the next collective on the group would pair with a stale bucket.
            for _ in counted:
                pass
        if consumed != expected:
            raise RuntimeError(f"r2ec: vLLM's weight loader took {consumed} of the {expected} tensors {how}")
        if tied_head:
            self._r2ec_refresh_tied_head()

    def _r2ec_refresh_tied_head(self) -> None:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        inner = model.get_language_model() if hasattr(model, "get_language_model") else model
        lm_head = getattr(inner, "lm_head", None)
        embed = getattr(getattr(inner, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or lm_head.weight is not embed.weight:
            return  # untied: lm_head.weight was sent and reloaded like every other layer
        method = getattr(lm_head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(lm_head)


class _DropUnloaded(logging.Filter):
    """Drops the layer-wise reload's "Failed to load weights" warning, which it logs for every layer the update did
    not include. A LoRA-delta sync includes only the merged layers on purpose: the others keep their weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


@contextlib.contextmanager
def _quiet_partial_reload() -> Iterator[None]:
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    drop = _DropUnloaded()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class _Counted:
    """Iterator wrapper that counts what it hands out."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]):
        self._it = it
        self.n = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        item = next(self._it)
        self.n += 1
        return item
