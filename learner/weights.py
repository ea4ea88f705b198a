"""What the learner exports to the rollout engines and to Hugging Face folders: the model as export units, and the
learner's side of every weight hand-off (``WeightExport``: the broadcast to the rollout engines, the colocated
hand-off, the full state dict).

A unit is a module whose own tensors are exported together (one ZeRO-3 gather): a LoRA layer, whose weight is
exported merged with its adapters exactly as peft's ``merge_and_unload`` computes it, or any other module with
parameters or persistent buffers of its own. Imports torch (and peft, when present) and the project's torch-only
weight-transfer modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from r2ec.lora_delta import A_SUFFIX, B_SUFFIX, DeltaPlan, LoraTarget, base_checksum
from r2ec.weight_share import pack
from r2ec.weight_sync import SyncGroup, TensorMeta, close_group, open_group, send


@dataclass
class ExportUnit:
    """A module whose own tensors are exported together (one ZeRO-3 gather): a LoRA layer (base weights merged
    with the adapters) or any other module with parameters / persistent buffers of its own."""

    prefix: str
    module: torch.nn.Module
    lora: bool

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(local name, tensor) of what a Hugging Face checkpoint holds for this module."""
        owner = self.module.get_base_layer() if self.lora else self.module
        named = list(owner.named_parameters(recurse=False))
        named += [(n, b) for n, b in owner.named_buffers(recurse=False) if n not in owner._non_persistent_buffers_set]
        return named

    def params(self) -> list[torch.nn.Parameter]:
        # A LoRA layer needs its adapters too (recursive); any other unit only its own parameters.
        return list(self.module.parameters(recurse=self.lora))


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))  # ZeRO-3 partitioned parameters have shape (0,)


def _check_plain_lora(layer: torch.nn.Module) -> None:
    if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
        raise NotImplementedError("weight export merges plain LoRA only (no DoRA or other variants, no lora_bias)")


def merged_lora_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + sum_a B_a A_a * scaling_a over the active adapters, exactly as peft's ``merge_and_unload`` computes it."""
    _check_plain_lora(layer)
    weight = layer.get_base_layer().weight.detach()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
            weight = weight + layer.get_delta_weight(adapter).detach()
    return weight


def lora_adapter(layer: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.nn.Parameter, float]:
    """(A (r, in), B (out, r), scaling) of a LoRA linear layer's one active adapter, for the LoRA-delta sync."""
    _check_plain_lora(layer)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"LoRA-delta sync needs one active linear adapter per layer (not transposed), got "
                                  f"{active}; use learner.weight_sync: full")
    name = active[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def export_units(base: torch.nn.Module) -> list[ExportUnit]:
    """Modules in checkpoint order; LoRA layers become one unit each and their inner modules are skipped.
    A tied ``lm_head`` is its own unit, so ``lm_head.weight`` is listed explicitly."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no LoRA layers can exist
        LoraLayer = ()  # noqa: N806
    units: list[ExportUnit] = []
    inside: str | None = None
    for prefix, module in base.named_modules():
        if inside is not None and prefix.startswith(inside + "."):
            continue
        inside = None
        if isinstance(module, LoraLayer):
            units.append(ExportUnit(prefix, module, lora=True))
            inside = prefix
            continue
        unit = ExportUnit(prefix, module, lora=False)
        if unit.tensors():
            units.append(unit)
    return units


class WeightExport:
    """The full model of one learner rank, as the rollout engines and exports need it: Hugging Face names, LoRA
    merged, in the engines' dtype (``model.dtype``), gathered one unit at a time under ZeRO-3 (never the whole model).

    Under ZeRO-3 every call that gathers (``full_weights``, ``full_state_dict``, ``broadcast``, ``pack``) must run on
    every rank at once. ``gathered(params)`` is the rank's context manager that gathers ZeRO-3 parameters."""

    def __init__(self, base: torch.nn.Module, rank: int, zero3: bool, dtype: str,
                 gathered: Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager],
                 lora_delta: bool = False):
        self.units = export_units(base)
        self.rank, self.zero3, self.dtype, self._gathered = rank, zero3, dtype, gathered
        self._sync: tuple[SyncGroup, Any] | None = None  # rank 0: the broadcast group it hosts
        # LoRA-delta sync: the checksum of the LoRA layers' base weights, which never change; computed once here
        # because under ZeRO-3 it gathers (construction runs on every rank at once).
        self._base_checksum = self._lora_base_checksum() if lora_delta else None

    @staticmethod
    def _name(unit: ExportUnit, local: str) -> str:
        return f"{unit.prefix}.{local}" if unit.prefix else local

    def metas(self) -> list[TensorMeta]:
        """Hugging Face checkpoint names of the full model (LoRA merged, ``lm_head.weight`` explicit), in sync order,
        with the engines' dtype. Local, no communication."""
        return [TensorMeta(self._name(u, local), self.dtype, full_shape(t)) for u in self.units
                for local, t in u.tensors()]

    def full_weights(self, merged: bool = True, materialize: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) in ``metas`` order. ``materialize=False`` only takes part in the gathers (ZeRO-3
        ranks that need nothing)."""
        for unit in self.units:
            with self._gathered(unit.params()):
                if not materialize:
                    continue
                out = []
                for local, t in unit.tensors():
                    if unit.lora and merged and local == "weight":
                        t = merged_lora_weight(unit.module)
                    t = t.detach()
                    # The gathered storage is released when the context exits: keep a copy under ZeRO-3.
                    out.append((self._name(unit, local), t.clone() if self.zero3 else t))
            yield from out

    def _join_gathers(self, weights: Iterator | None = None) -> None:
        """Go through the remaining ZeRO-3 gathers with the other ranks (nothing to do under ZeRO 0-2)."""
        if self.zero3:
            for _ in weights if weights is not None else self.full_weights(materialize=False):
                pass

    # ------------------------------------------------------------------------------------------ LoRA-delta sync
    def _delta_units(self) -> Iterator[tuple[ExportUnit, list[torch.nn.Parameter]]]:
        """Units the LoRA-delta sync sends, with the parameters it gathers: each LoRA layer's A and B, and every
        other unit with a trainable parameter."""
        for unit in self.units:
            if unit.lora:
                a, b, _ = lora_adapter(unit.module)
                yield unit, [a, b]
            elif any(p.requires_grad for p in unit.params()):
                yield unit, unit.params()

    def _lora_base_checksum(self) -> int:
        """``base_checksum`` of the LoRA layers' base weights (rank 0; 0 elsewhere), one gathered layer at a time."""
        total = 0
        for unit in self.units:
            if unit.lora:
                base = unit.module.get_base_layer().weight
                with self._gathered([base]):
                    if self.rank == 0:
                        total = (total + base_checksum([base.detach()], base.dtype)) % 2**64
        return total

    def delta_plan(self) -> DeltaPlan:
        """What a LoRA-delta sync sends (``r2ec.lora_delta``): names, shapes and dtypes in order, the targets'
        scalings, the base weights' checksum. Local, no communication."""
        if self._base_checksum is None:
            raise RuntimeError("delta_plan needs a WeightExport built with lora_delta=True")
        metas: list[TensorMeta] = []
        targets: list[LoraTarget] = []
        train_dtype = "float32"
        for unit, params in self._delta_units():
            if unit.lora:
                (a, b), scaling = params, lora_adapter(unit.module)[2]
                train_dtype = str(a.dtype).removeprefix("torch.")
                metas += [TensorMeta(unit.prefix + A_SUFFIX, train_dtype, full_shape(a)),
                          TensorMeta(unit.prefix + B_SUFFIX, train_dtype, full_shape(b))]
                targets.append(LoraTarget(unit.prefix, scaling))
            else:
                metas += [TensorMeta(self._name(unit, local), self.dtype, full_shape(t)) for local, t in unit.tensors()]
        if not targets:
            raise ValueError("LoRA-delta sync: the learner's model has no LoRA layers (use learner.weight_sync: full)")
        return DeltaPlan(tuple(metas), tuple(targets), self.dtype, self._base_checksum, train_dtype)

    def delta_tensors(self, materialize: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in ``delta_plan().metas`` order, gathered one unit at a time under ZeRO-3."""
        for unit, params in self._delta_units():
            with self._gathered(params):
                if not materialize:
                    continue
                if unit.lora:
                    out = [(unit.prefix + A_SUFFIX, params[0].detach()), (unit.prefix + B_SUFFIX, params[1].detach())]
                else:
                    out = [(self._name(unit, local), t.detach()) for local, t in unit.tensors()]
                out = [(n, t.clone() if self.zero3 else t) for n, t in out]
            yield from out

    def full_state_dict(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """The full model (LoRA merged unless ``merged=False``, which gives the frozen base weights) on CPU on rank 0;
        {} elsewhere. Holds the whole model on rank 0: for export and tests."""
        if self.rank != 0:
            self._join_gathers()
            return {}
        return {name: t.cpu().clone() for name, t in self.full_weights(merged)}

    def pack(self, buf: torch.Tensor) -> int:
        """Colocated mode: the full merged weights into the flat buffer ``buf`` (``r2ec.weight_share``'s layout) for
        this rank's own engine; the buffer's checksum. Every rank packs (each feeds its own engine)."""
        return pack(buf, self.metas(), self.full_weights())

    def broadcast(self, info: SyncGroup | None, bucket_bytes: int, device: torch.device, delta: bool = False
                  ) -> int | None:
        """Send the full merged weights (or with ``delta``, what ``delta_plan`` lists) to every rollout engine
        (``r2ec.weight_sync``); the checksum on rank 0, None elsewhere. Rank 0 joins the group
        (``open_group(info, 0)``) on its first call, which blocks until every receiver has joined; a different
        ``info`` means the driver rebuilt the group after replacing a rollout worker: the old one (its store, its
        connections to a dead member) is dropped before the new one is hosted."""
        if self.rank != 0:
            self._join_gathers(self.delta_tensors(materialize=False) if delta else None)
            return None
        if info is None:
            raise ValueError("broadcast_weights on rank 0 needs the SyncGroup")
        weights = self.delta_tensors() if delta else self.full_weights()
        metas = list(self.delta_plan().metas) if delta else self.metas()
        try:
            if self._sync is None or self._sync[0] != info:
                self._drop_group()
                self._sync = (info, open_group(info, 0))
            send_device = device if info.backend == "nccl" else torch.device("cpu")
            return send(self._sync[1], metas, weights, bucket_bytes, device=send_device)
        except Exception:
            # A receiver died before or during the broadcast, or the sync timed out or was aborted by the driver.
            # The group is spent: abort it now rather than leave NCCL's watchdog a communicator to time out on.
            # Under ZeRO-3 the other ranks are gathering all the same: go through the remaining gathers with them,
            # so the learner ranks stay in step and the driver can redo the sync on a new group.
            self._drop_group()
            self._join_gathers(weights)
            raise

    def _drop_group(self) -> None:
        if self._sync is not None:
            close_group(self._sync[1])
            self._sync = None
