"""The R2ec dual-head model around any Hugging Face causal LM.

- ``lm_head`` is the model's own LM head: it writes the reasoning chain.
- ``rec_head`` is the item table H_V (V, d): each row is the final hidden state (after the final norm) at the last
  token of the item's prompt, produced by the same model. A user's chain is scored by
  ``s(v) = cos(h_T, H_V[v]) / tau`` where h_T is the final hidden state at the last token of the answer marker.

Deviations from the paper / official code:
- The official code finds the last token as "first pad token - 1", which is wrong under left padding and when the
  pad token also occurs inside the text (it is EOS for many models). We take the last position whose attention mask
  is 1 and pass explicit position ids, so left and right padding give the same hidden states.
- A chain that ends without the marker (EOS or length cut) gets the marker's tokens appended (as the paper says);
  a chain that contains it is cut right after the token that completes it.
- Scores use cosine similarity (as the official code), not the paper's plain inner product.
- Models whose attention soft-caps its logits (Gemma-2) load with eager attention (``attention_for``): the SDPA
  default would silently drop the cap that vLLM applies when sampling.
- The learner may compute a group's G chains in one row behind one copy of their prompt
  (``chain_forward_packed``, r2ec/packing.py): the same log-probs and h_T as ``chain_forward`` within float
  rounding, with the prompt's tokens computed once instead of G times. ``encode_items`` packs the item prompts
  behind their shared prefix the same way (``packed=False`` for one row per item, as the official code).
- Optionally (``model.item_table: frozen``, ``model.center_items``; the driver applies them) H_V stays the initial
  weights' encodings, minus their mean row, instead of following the trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r2ec.algo.metrics import mask_history, topk_items
from r2ec.algo.recpo import cosine_scores


def attention_for(path: str) -> str | None:
    """The attention implementation to load ``path`` with: "eager" where the architecture soft-caps attention logits
    (Gemma-2's ``attn_logit_softcapping``), because transformers' SDPA and flash paths skip the cap that vLLM's
    sampler applies, which would make the learner's log-probs and h_T disagree with the rollout's; otherwise None
    (transformers' default, SDPA where supported)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for right *and* left padding.

    attention_mask: (B, L) 0/1. Returns (B,) long.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token id lists. Returns input_ids (B, L), attention_mask (B, L), position_ids (B, L)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    # Explicit positions: the model must not see left padding as extra context.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@dataclass
class Chain:
    """One finished reasoning chain."""

    token_ids: list[int]  # completion tokens, ending with the answer marker
    text: str
    appended_marker: bool  # True when the marker was appended (the chain ended without it)


class ChainFinisher:
    """Turns a raw completion into a :class:`Chain`: cut at EOS/padding or right after the marker, and append the
    marker when it is missing. Needs only the tokenizer, so every rollout engine shares it."""

    def __init__(self, tokenizer, marker: str, eos_ids: set[int], pad_id: int | None):
        self.tokenizer = tokenizer
        self.marker = marker
        self.marker_ids: list[int] = tokenizer.encode(marker, add_special_tokens=False)
        self.stop_ids = set(eos_ids) | ({pad_id} if pad_id is not None else set())

    @classmethod
    def from_pretrained(cls, path: str, marker: str) -> ChainFinisher:
        """EOS ids from the checkpoint's generation config (falling back to the tokenizer's), as ``generate`` uses."""
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            eos = None
        eos = eos if eos is not None else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(tokenizer, marker, set(eos if isinstance(eos, list) else [eos]), pad)

    def num_kept(self, generated: Sequence[int]) -> int:
        """How many leading tokens of ``generated`` the chain keeps (before any appended marker)."""
        ids = list(generated)
        for j, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:j]
                break
        if self.marker in self.tokenizer.decode(ids, skip_special_tokens=False):
            # Shortest prefix whose text contains the marker: the chain ends at the token completing it.
            k = len(ids)
            while k > 1 and self.marker in self.tokenizer.decode(ids[:k - 1], skip_special_tokens=False):
                k -= 1
            return k
        return len(ids)

    def __call__(self, generated: Sequence[int]) -> Chain:
        k = self.num_kept(generated)
        ids = list(generated)[:k]
        appended = self.marker not in self.tokenizer.decode(ids, skip_special_tokens=False)
        if appended:
            ids = ids + self.marker_ids
        return Chain(ids, self.tokenizer.decode(ids, skip_special_tokens=False), appended_marker=appended)


class DualHeadModel:
    """A causal LM plus its rec_head. Holds no item table itself: callers pass ``h_items`` explicitly."""

    def __init__(self, model, tokenizer, tau: float = 0.02, marker: str = "<answer>"):
        self.model = model
        self.tokenizer = tokenizer
        self.tau = tau
        self.marker = marker
        self.marker_ids: list[int] = tokenizer.encode(marker, add_special_tokens=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self.finisher = ChainFinisher(tokenizer, marker, self.eos_ids, self.pad_id)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> DualHeadModel:
        """Build from ``ModelConfig``: a hub id, a local folder or ``asset://name``; LoRA via peft if enabled."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from r2ec.assets import resolve

        path = resolve(cfg.name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype),
                                                     attn_implementation=attention_for(path))
        if cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
        model.to(device).eval()
        return cls(model, tokenizer, tau=cfg.tau, marker=cfg.answer_marker)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _decoder(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder()

    # ------------------------------------------------------------------------------------------ hidden states
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states after the final norm: (B, L, d)."""
        out = self._decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
        return out.last_hidden_state

    def last_hidden(self, seqs: Sequence[Sequence[int]], padding_side: str = "right") -> torch.Tensor:
        """Final hidden state at the last token of each sequence: (B, d), in the model's dtype."""
        ids, mask, pos = pad_batch(seqs, self.pad_id, padding_side, self.device)
        h = self.hidden_states(ids, mask, pos)
        return h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]

    def chain_forward(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass over prompt + chain giving both heads' inputs for the RecPO step.

        Returns logp (B, L-1): log-prob of token t+1 given tokens <= t, 0 where token t+1 is not a chain token;
        mask (B, L-1) float, 1 where token t+1 belongs to the chain; h_T (B, d) at the chain's last token. The LM
        head runs only on the hidden states that predict chain tokens: the (B, L, vocab) fp32 logits of the whole
        sequence, prompt included, would be most of the step's memory for long prompts and a large vocabulary.
        """
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, chains, strict=True)]
        ids, attn, pos = pad_batch(seqs, self.pad_id, "right", self.device)
        h = self.hidden_states(ids, attn, pos)
        h_T = h[torch.arange(h.shape[0], device=h.device), last_token_index(attn)]
        mask = self._chain_mask(prompt_ids, chains, ids.shape[1], h.device)
        at = mask.bool()
        chain_logp = self._token_logp(h[:, :-1][at], ids[:, 1:][at])
        logp = torch.zeros(mask.shape, dtype=chain_logp.dtype, device=h.device).masked_scatter(at, chain_logp)
        return logp, mask, h_T

    def chain_forward_packed(self, prompt_ids: Sequence[Sequence[int]],
                             chains: Sequence[Sequence[Sequence[int]]], padding_side: str = "right"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``chain_forward`` of every chain of the groups ``chains[g]`` (sampled from ``prompt_ids[g]``), computed
        with each prompt once (r2ec/packing.py): one row [prompt, chain_1, ..., chain_G] per group behind a block
        attention mask. Returns what ``chain_forward`` returns for the flattened chains (group by group), on its
        (N, L-1) grid of prompt + chain: logp, mask, h_T."""
        rows, h = self._packed_hidden(prompt_ids, chains, padding_side)
        h_T = h[rows.last]
        flat_prompts = [p for p, g in zip(prompt_ids, chains, strict=True) for _ in g]
        flat_chains = [c for g in chains for c in g]
        width = max(len(p) + len(c) for p, c in zip(flat_prompts, flat_chains, strict=True))
        mask = self._chain_mask(flat_prompts, flat_chains, width, h.device)
        chain_logp = self._token_logp(h[rows.pred], rows.targets)  # chain by chain: the grid's row-major order
        logp = torch.zeros(mask.shape, dtype=chain_logp.dtype, device=h.device).masked_scatter(mask.bool(),
                                                                                                 chain_logp)
        return logp, mask, h_T

    def last_hidden_packed(self, prefixes: Sequence[Sequence[int]], tails: Sequence[Sequence[Sequence[int]]],
                           padding_side: str = "right") -> torch.Tensor:
        """``last_hidden`` of every prefixes[g] + tails[g][j], each prefix computed once (one packed row per g):
        (N, d) in the flattened order. The learner's item re-encoding packs the step's targets behind the prefix
        every item prompt shares (r2ec/packing.py ``shared_prefix``)."""
        rows, h = self._packed_hidden(prefixes, tails, padding_side)
        return h[rows.last]

    def _packed_hidden(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[Sequence[int]]],
                       padding_side: str):
        """The packed rows of the groups and their final hidden states (R, L, d)."""
        from r2ec.packing import pack_groups

        window = self._sliding_window()
        longest = max(len(p) + len(c) for p, g in zip(prompt_ids, chains, strict=True) for c in g)
        if window is not None and longest > window:
            # the block mask stands in for every layer's mask, so a binding sliding window would be lost
            raise ValueError(f"packed sequences need prefix + rest <= the model's sliding window ({window} tokens), "
                             f"got {longest}: set learner.pack_prompts false")
        rows = pack_groups(prompt_ids, chains, self.pad_id, padding_side, self.device)
        return rows, self.hidden_states(rows.input_ids, rows.attention_bias(self.model.dtype), rows.position_ids)

    def _sliding_window(self) -> int | None:
        """The window of the model's sliding-window attention layers (Gemma-2's every other layer), else None."""
        config = self.model.config
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            return int(config.sliding_window)
        return None

    @staticmethod
    def _chain_mask(prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]], width: int,
                    device: torch.device) -> torch.Tensor:
        """(B, width-1) float: 1 where position t predicts a chain token (``learner.policy.chain_positions``)."""
        mask = torch.zeros(len(chains), width - 1, device=device)
        for i, (p, c) in enumerate(zip(prompt_ids, chains, strict=True)):
            mask[i, len(p) - 1: len(p) - 1 + len(c)] = 1.0
        return mask

    def _token_logp(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target | hidden state) for (T, d) hidden states: the LM head on these rows only, in float32."""
        logits = self.model.get_output_embeddings()(h).float()  # (T, vocab)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:  # Gemma-2 caps its logits inside the causal-LM forward, which we bypass here
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    @torch.no_grad()
    def encode_items(self, item_prompt_ids: Sequence[Sequence[int]], batch_size: int = 32,
                     progress=None, packed: bool = True) -> torch.Tensor:
        """The item table H_V: (V, d) float32, rows in the order given, ``batch_size`` prompts per forward, formed
        from length-sorted prompts to waste little compute on padding.

        ``packed``: the prefix every item prompt shares (chat template + instruction, r2ec/packing.py
        ``shared_prefix``; 45 of ~71 tokens on MovieLens) is computed once per packed row of a batch, and each
        item's own tokens attend to it, as the learner's re-encoding does: the same rows within float rounding at
        about half the cost (bench/item_encoding.py, part ``table``). Unpacked where the prompts share nothing or a
        sliding window would bind."""
        from r2ec.packing import shared_prefix, tail_groups

        P = shared_prefix(item_prompt_ids) if packed else 0
        window = self._sliding_window()
        if window is not None and max(map(len, item_prompt_ids), default=0) > window:
            P = 0
        order = sorted(range(len(item_prompt_ids)), key=lambda i: len(item_prompt_ids[i]))
        table: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if P:
                h = self.last_hidden_packed(*tail_groups([item_prompt_ids[i] for i in idx], P))
            else:
                h = self.last_hidden([item_prompt_ids[i] for i in idx])
            if table is None:
                table = torch.empty((len(order), h.shape[1]), dtype=torch.float32, device=h.device)
            table[torch.as_tensor(idx, device=h.device)] = h.float()
            if progress is not None:
                progress(len(idx))
        if table is None:
            raise ValueError("no item prompts to encode")
        return table

    def user_hidden(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]) -> torch.Tensor:
        """h_T for prompt + chain (each chain already ending with the marker): (B, d)."""
        return self.last_hidden([list(p) + list(c) for p, c in zip(prompt_ids, chains, strict=True)])

    # ------------------------------------------------------------------------------------------ rec_head
    def item_scores(self, h_user: torch.Tensor, h_items: torch.Tensor, history_idx: torch.Tensor | None = None,
                    target_idx: torch.Tensor | None = None, items_unit: bool = False) -> torch.Tensor:
        """rec_head: cos(h_user, H_V) / tau over the full catalogue, (B, V) float32, with the history (B, H),
        padded with -1, masked to -inf (the target itself is never masked). ``items_unit``: H_V already holds unit
        rows (``r2ec.algo.recpo.unit_rows``), as a fixed inference table should."""
        scores = cosine_scores(h_user, h_items, self.tau, items_unit)
        if history_idx is not None:
            scores = mask_history(scores, history_idx.to(scores.device), target_idx)
        return scores

    # ------------------------------------------------------------------------------------------ reasoning
    def finish_chain(self, generated: Sequence[int]) -> Chain:
        """Cut a generated completion at EOS or right after the marker; append the marker when it is missing."""
        return self.finisher(generated)

    @torch.no_grad()
    def generate_raw(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, **generate_kwargs
                     ) -> list[list[int]]:
        """Completions exactly as transformers ``generate`` returns them (left padding, stopping at the marker),
        not yet cut or completed: the rollout engine finishes them itself. ``generate_kwargs`` go to ``generate``
        (e.g. ``synced_gpus`` under ZeRO-3). ``max_new_tokens`` 0 means no reasoning: empty completions (every rank
        skips generation alike, so ZeRO-3 stays in step)."""
        if max_new_tokens == 0:
            return [[] for _ in prompt_ids]
        ids, mask, _ = pad_batch(prompt_ids, self.pad_id, "left", self.device)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                      stop_strings=[self.marker], tokenizer=self.tokenizer, **generate_kwargs)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k if top_k > 0 else None, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return [row[ids.shape[1]:].tolist() for row in out]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, **generate_kwargs) -> list[Chain]:
        """Reasoning chains with transformers ``generate`` (left padding), stopping at the marker."""
        return [self.finish_chain(c) for c in self.generate_raw(prompt_ids, max_new_tokens, do_sample, temperature,
                                                                top_k, top_p, **generate_kwargs)]

    @torch.no_grad()
    def recommend(self, prompt_ids: Sequence[Sequence[int]], h_items: torch.Tensor, k: int,
                  history_idx: torch.Tensor | None = None, max_new_tokens: int = 640,
                  target_idx: torch.Tensor | None = None, items_unit: bool = False
                  ) -> tuple[list[Chain], torch.Tensor, torch.Tensor]:
        """End to end: greedy reasoning, h_T, full-catalogue scores with the history masked, top-k.
        ``target_idx`` (evaluation only) keeps a repeat of the target unmasked; ``items_unit`` as in
        ``item_scores``.

        Returns (chains, item_scores (B, V), top-k item indices (B, k))."""
        chains = self.generate(prompt_ids, max_new_tokens=max_new_tokens)
        h_user = self.user_hidden(prompt_ids, [c.token_ids for c in chains])
        scores = self.item_scores(h_user, h_items, history_idx, target_idx, items_unit)
        return chains, scores, topk_items(scores, min(k, scores.shape[1]))
