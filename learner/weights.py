"""What the learner exports to the rollout engines and to Hugging Face folders: the model as export units.

A unit is a module whose own tensors are exported together (one ZeRO-3 gather): a LoRA layer, whose weight is
exported merged with its adapters exactly as peft's ``merge_and_unload`` computes it, or any other module with
parameters or persistent buffers of its own. Imports torch (and peft, when present) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def merged_lora_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + sum_a B_a A_a * scaling_a over the active adapters, exactly as peft's ``merge_and_unload`` computes it."""
    if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
        raise NotImplementedError("weight export merges plain LoRA only (no DoRA or other variants, no lora_bias)")
    weight = layer.get_base_layer().weight.detach()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
            weight = weight + layer.get_delta_weight(adapter).detach()
    return weight


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

