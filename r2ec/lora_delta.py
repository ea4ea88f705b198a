"""LoRA-delta weight sync: the learner sends the adapters, each rollout engine merges them onto base weights it keeps.

With LoRA only the adapters train, so a full sync (``learner.weight_sync: full``) resends ~650 MB of SmolLM2-135M
for ~5 MB of change. With ``lora_delta`` learner rank 0 broadcasts, over the same bucketed group and checksums as
``r2ec.weight_sync``, only

- every LoRA layer's ``A`` (r, in) and ``B`` (out, r), in the learner's training dtype, named
  ``<module>.lora_A`` / ``<module>.lora_B`` with the module's Hugging Face name, and
- any other tensor the learner trains (a module that is not a LoRA layer but has trainable parameters), under its
  Hugging Face name in the engines' dtype, exactly as a full sync sends it;

and each receiver turns the stream back into what a full sync would have delivered for those layers,
W = W0 + scaling * B @ A (``lora_merge``, the arithmetic of peft's ``get_delta_weight`` + the learner's
``merged_lora_weight``, in the same dtype and order, so the merged weight is the one a full sync sends), cast to
the engines' dtype. W0 are the base weights of the LoRA-targeted layers, read once from the model's safetensors
files (``read_base_weights``) and kept in host memory in the checkpoint's dtype: with LoRA they never change. The
engine then loads only the merged layers; everything else it holds is already current (the base weights never
change, and the non-LoRA trainables came in the stream).

What is checksummed is what crossed the wire (the adapters), as for a full sync. That W0 on the receiver equals the
learner's base weights is checked once per receiver, on the first delta it applies: the learner sends
``base_checksum`` (``weight_sync.bits_checksum`` of its targets' base weights in the training dtype) in the plan, and
the receiver compares it with its own W0's before merging anything.

Not in the paper or the official code (both sync nothing: the official trainer samples in-process). Plain LoRA
only (no DoRA or other variants, no lora_bias, one active adapter, no embedding LoRA), as the learner's export.

Imports torch and safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from r2ec.weight_sync import TensorMeta, bits_checksum

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class LoraTarget:
    module: str  # Hugging Face module name, e.g. model.layers.0.self_attn.q_proj (its weight is module + ".weight")
    scaling: float  # peft's lora_alpha / r (or / sqrt(r) with rslora)

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class DeltaPlan:
    """What one LoRA-delta sync sends, in order (``metas``), and how receivers rebuild merged weights from it."""

    metas: tuple[TensorMeta, ...]  # each target's lora_A, lora_B (training dtype), then other trainables (dtype)
    targets: tuple[LoraTarget, ...]
    dtype: str  # the engines' dtype: merged weights are cast to it
    base_checksum: int  # bits_checksum sum over the targets' base weights in the training dtype, modulo 2**64
    train_dtype: str = field(default="float32")  # the dtype A, B and the merge use (the learner's training dtype)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas)

    @property
    def num_loaded(self) -> int:
        """Tensors a receiver hands its engine: one merged weight per target, plus every other tensor sent."""
        return len(self.targets) + sum(1 for m in self.metas if not m.name.endswith((A_SUFFIX, B_SUFFIX)))

    def to_plain(self) -> dict:
        """Lists, strings and numbers only: what crosses vLLM's msgpack RPC to its worker processes."""
        return {"metas": [(m.name, m.dtype, list(m.shape)) for m in self.metas],
                "targets": [(t.module, t.scaling) for t in self.targets], "dtype": self.dtype,
                "base_checksum": self.base_checksum, "train_dtype": self.train_dtype}

    @classmethod
    def from_plain(cls, d: dict) -> DeltaPlan:
        return cls(tuple(TensorMeta(n, dt, tuple(sh)) for n, dt, sh in d["metas"]),
                   tuple(LoraTarget(m, float(sc)) for m, sc in d["targets"]), d["dtype"], int(d["base_checksum"]),
                   d["train_dtype"])


def lora_merge(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W0 + (B @ A) * scaling in the adapters' dtype, as peft's ``get_delta_weight`` computes the delta (through
    float32 for (b)float16 on CPU) and the learner's ``merged_lora_weight`` adds it. ``w0`` may be in any dtype; it
    is cast to the adapters' first.

    Where peft's delta needs no cast, one fused ``addmm`` (W0 + scaling * B @ A: one pass over the weight instead of
    four, half the sync's time on CPU) gives the same value; on CPU in float32 to the last bit (tested: each element
    is a length-r dot product scaled and added once either way), elsewhere (a GPU epilogue may fuse the multiply and
    the add) within one rounding of the full sync's weight."""
    dtype = b.dtype
    w0 = w0.to(device=b.device, dtype=dtype)
    if b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return w0 + ((b.float() @ a.float()) * scaling).to(dtype)
    return torch.addmm(w0, b, a, alpha=scaling)


def _local_folder(path: str) -> str:
    """A model folder on disk: ``path`` itself, or the hub's cached snapshot of repo id ``path`` (weights and index
    only; the engine and the learner have fetched it already)."""
    if os.path.isdir(path):
        return path
    if os.path.isabs(path) or path.startswith("."):
        raise FileNotFoundError(f"LoRA-delta sync: the model folder {path} does not exist")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.safetensors", "*.safetensors.index.json"])


def read_base_weights(path: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` from a model folder's safetensors files (single file or sharded with an index), in the
    checkpoint's own dtype, on CPU."""
    from safetensors import safe_open

    folder = _local_folder(path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = json.load(f)["weight_map"]
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        where = None
    else:
        raise FileNotFoundError(f"LoRA-delta sync: {folder} has no model.safetensors(.index.json); the rollout needs "
                                "the base weights in safetensors (or use learner.weight_sync: full)")
    missing = [n for n in names if where is not None and n not in where]
    if missing:
        raise KeyError(f"LoRA-delta sync: {index} has no tensors {missing[:3]}")
    files: dict[str, list[str]] = {}
    for n in names:
        files.setdefault(where[n] if where is not None else "model.safetensors", []).append(n)
    out: dict[str, torch.Tensor] = {}
    for file, wanted in files.items():
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            keys = set(f.keys())
            absent = [n for n in wanted if n not in keys]
            if absent:
                raise KeyError(f"LoRA-delta sync: {os.path.join(folder, file)} has no tensors {absent[:3]}")
            for n in wanted:
                out[n] = f.get_tensor(n)
    return out


def base_checksum(weights: Iterable[torch.Tensor], dtype: torch.dtype) -> int:
    """Sum of ``bits_checksum`` of each tensor cast to ``dtype`` (the learner's training dtype), modulo 2**64."""
    total = 0
    for w in weights:
        total = (total + bits_checksum(w.detach().to(dtype).contiguous().reshape(-1))) % 2**64
    return total


class DeltaApplier:
    """A receiver's side: holds W0 of the plan's targets (read once from the model folder) and turns a received
    delta stream into the merged (name, weight) pairs an engine loads."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._w0: dict[str, torch.Tensor] | None = None
        self._checked: int | None = None  # the base checksum already verified

    def _base(self, plan: DeltaPlan, also: Sequence[str]) -> dict[str, torch.Tensor]:
        names = [t.weight for t in plan.targets]
        if self._w0 is None or set(self._w0) != set(names) | set(also):
            self._w0 = read_base_weights(self.model_path, names + [n for n in also if n not in names])
        if self._checked != plan.base_checksum:
            got = base_checksum((self._w0[n] for n in names), getattr(torch, plan.train_dtype))
            if got != plan.base_checksum:
                raise RuntimeError(f"LoRA-delta sync: the base weights in {self.model_path} differ from the learner's "
                                   f"(checksum {got} vs {plan.base_checksum}); use learner.weight_sync: full")
            self._checked = plan.base_checksum
        return self._w0

    def merged(self, plan: DeltaPlan, stream: Iterable[tuple[str, torch.Tensor]], also: Sequence[str] = ()
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor in the engines' dtype) for every target (merged) and every dense trainable,
        as the stream delivers them, then the base weights ``also`` names (an engine that fuses layers, as vLLM's
        qkv_proj, must get every shard of a fused layer it reloads, targeted by LoRA or not)."""
        w0 = self._base(plan, also)
        scaling = {t.module: t.scaling for t in plan.targets}
        dtype = getattr(torch, plan.dtype)
        pending: dict[str, torch.Tensor] = {}
        device = torch.device("cpu")
        for name, t in stream:
            device = t.device  # where the receiver wants its tensors
            if name.endswith(A_SUFFIX):
                pending[name[: -len(A_SUFFIX)]] = t
            elif name.endswith(B_SUFFIX):
                module = name[: -len(B_SUFFIX)]
                a = pending.pop(module, None)
                if a is None or module not in scaling:
                    raise RuntimeError(f"LoRA-delta sync: {name} arrived without its lora_A or target")
                yield f"{module}.weight", lora_merge(w0[f"{module}.weight"], a, t, scaling[module]).to(dtype)
            else:
                yield name, t
        if pending:
            raise RuntimeError(f"LoRA-delta sync: lora_A without lora_B for {sorted(pending)[:3]}")
        for name in also:
            yield name, w0[name].to(device=device, dtype=dtype)
