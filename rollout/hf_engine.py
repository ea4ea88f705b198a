"""The transformers rollout engine: the reference the vLLM engine is checked against, and the fallback.

Sampling is ``generate`` with left padding; the behaviour log-probs and h_T of the sampled chains come from one
extra forward pass over prompt + chain (``DualHeadModel.chain_forward``), which is exactly what the learner
computes, so with equal weights the rollout/learner mismatch alarms read ~0.

The engine serves the plain base model: the learner broadcasts full (LoRA-merged) weights, so the engine never needs
peft. Weights arrive over the broadcast group of :mod:`r2ec.weight_sync` and are copied in place.

Colocated (``cluster.colocate``), the engine is built on the learner's own ``DualHeadModel`` instead (``model=``):
it samples with the learner's module as it is (LoRA unmerged, the learner's dtype), so there is nothing to receive.
Each call runs in eval mode and restores the module's mode afterwards, and sampling seeds a forked RNG, so the
learner's own random stream is the one it would have without the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from r2ec.lora_delta import DeltaApplier, DeltaPlan
from r2ec.model import DualHeadModel
from r2ec.weight_sync import SyncGroup, TensorMeta, close_group, open_group, receive
from rollout.engine import Completion, Sampling


class HFEngine:
    def __init__(self, model_cfg, rollout_cfg, seed: int, device: str, model: DualHeadModel | None = None):
        self.shared = model is not None  # the colocated learner's own module (see the module docstring)
        self._delta: DeltaApplier | None = None  # LoRA-delta sync: the base weights, read at the first delta
        if model is None:
            from r2ec.assets import resolve

            self._delta = DeltaApplier(resolve(model_cfg.name_or_path))
            base_cfg = model_cfg.model_copy(update={"lora": model_cfg.lora.model_copy(update={"enabled": False})})
            model = DualHeadModel.from_config(base_cfg, device)
        self.model = model
        self.batch_size = rollout_cfg.batch_size
        self._group = None

    @classmethod
    def sharing(cls, model: DualHeadModel, rollout_cfg) -> HFEngine:
        """An engine on ``model`` itself (the colocated learner's): its weights are always the learner's."""
        return cls(None, rollout_cfg, 0, str(model.device), model=model)

    @property
    def num_sync_ranks(self) -> int:
        return 1

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (no dropout, no gradient checkpointing) and no autograd; the module's mode is restored after."""
        module = self.model.model
        training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            module.train(training)

    def sample(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: Sampling) -> list[Completion]:
        m = self.model
        devices = [m.device] if m.device.type == "cuda" else []
        with self._inference(), torch.random.fork_rng(devices=devices):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            expanded = [list(p) for p in prompt_ids for _ in range(n)]  # grouped: prompt i -> rows i*n .. i*n+n-1
            out: list[Completion] = []
            step = max(1, self.batch_size * n)
            for lo in range(0, len(expanded), step):
                out.extend(Completion(c, None) for c in m.generate_raw(
                    expanded[lo:lo + step], sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p))
        return out

    def last_hidden(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        with self._inference():
            return self.model.encode_items(seqs, batch_size=self.batch_size).cpu()

    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        with self._inference():
            return self._chain_states(prompt_ids, chains)

    def _chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                      ) -> tuple[torch.Tensor, list[list[float]]]:
        h_T, logps = [], []
        for lo in range(0, len(chains), self.batch_size):
            p, c = prompt_ids[lo:lo + self.batch_size], chains[lo:lo + self.batch_size]
            logp, mask, h = self.model.chain_forward(p, c)
            h_T.append(h.float().cpu())
            for row, m in zip(logp.cpu(), mask.cpu(), strict=True):
                logps.append(row[m.bool()].tolist())
        return torch.cat(h_T), logps

    def _not_shared(self, what: str) -> None:
        if self.shared:
            raise RuntimeError(f"{what}: this engine shares the colocated learner's module, there is nothing to receive")

    def join_sync_group(self, info: SyncGroup, first_rank: int) -> None:
        self._not_shared("join_sync_group")
        # A second join means the driver rebuilt the group (a rollout worker was replaced): let go of the old one
        # first, so its connections to a dead member are closed rather than left to time out.
        close_group(self._group)
        self._group = None
        self._group = open_group(info, first_rank)

    @torch.no_grad()
    def receive_weights(self, metas: Sequence[TensorMeta], bucket_bytes: int, delta: DeltaPlan | None = None) -> int:
        """Copy a broadcast into the model in place; with ``delta`` (a LoRA-delta sync, ``metas`` = its metas), the
        merged weights of its targets (``r2ec.lora_delta``). Returns the receive checksum."""
        self._not_shared("receive_weights")
        if self._group is None:
            raise RuntimeError("receive_weights before join_sync_group")
        # state_dict() lists tied weights under both names (sharing storage), so lm_head.weight has a home.
        params = self.model.model.state_dict(keep_vars=True)
        box, unknown = [0], []
        stream = receive(self._group, metas, bucket_bytes, device=self.model.device, checksum=box)
        if delta is not None:
            stream = self._delta.merged(delta, stream)
        for name, t in stream:
            if name in params:
                params[name].data.copy_(t)
            else:  # keep draining the broadcast so the sender is not left hanging, then fail
                unknown.append(name)
        if unknown:
            raise KeyError(f"weight sync: the rollout model has no parameters named {unknown[:5]}")
        return box[0]
