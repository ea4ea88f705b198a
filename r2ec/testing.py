"""Tiny models built in code, for tests and examples: no download, a few MB, seconds to build.

The tokenizer is a byte-level BPE trained on a small built-in corpus, wrapped as a fast HF tokenizer with a
ChatML template, so prompts, generation and the answer marker behave as with a real instruct model. The model is
a randomly initialised Llama-type decoder (head_dim 32, the smallest that vLLM's CPU kernels accept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not (loop.last and message['role'] == 'assistant' and continue_final_message is defined "
    "and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Analyze in depth and finally recommend next movie I might purchase inside <answer> and </answer>.",
    "For example, <answer>a product</answer>. Below is my historical movies purchases and ratings (out of 5):",
    "Summarize key attributes of the following movie inside <answer> and </answer>.",
    "Title: Toy Story (1995) Categories: Animation, Comedy User Rating: 4.5 Number of Buyers: 120",
    "3d 4.5h ago: [GoldenEye (1995)] (3.0) 2h 15.0min ago 35.0min ago 0123456789",
    "The user likes action and comedy, so the next movie should be a fun adventure. <answer>",
]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     tie_word_embeddings: bool = True, arch: Literal["llama", "gemma2"] = "llama") -> Path:
    """Save a random tiny Llama (or Gemma-2, whose attention and final logits are soft-capped, here with caps small
    enough to bind on random weights) + tokenizer as a normal HF folder and return its path."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, GenerationConfig, LlamaConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=hidden_size // 32,
        head_dim=32, max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gemma2":
        config = Gemma2Config(**shape, attn_logit_softcapping=0.5, final_logit_softcapping=5.0,
                              query_pre_attn_scalar=32, sliding_window=16,
                              initializer_range=0.2)  # attention scores large enough for the cap to bind
    else:
        config = LlamaConfig(**shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_dataset(root: str | Path, users: int = 10, items_per_user: int = 5) -> Path:
    """A 30-item catalogue (``items.csv``) and interactions (``inter.csv``) in the ``files`` data format: every user
    watches i00 first (the most popular train target), then ``items_per_user`` others, one minute apart."""
    root = Path(root)
    items = ["item_id,title,description,categories"]
    items += [f"i{k:02d},Title {k},A short description of item {k},Comedy|Drama" for k in range(30)]
    (root / "items.csv").write_text("\n".join(items) + "\n")
    rows = ["user_id,item_id,timestamp,rating"]
    t = 1_000_000
    for u in range(users):
        seq = [0] + [(u * 3 + j) % 29 + 1 for j in range(items_per_user)]
        for k, it in enumerate(seq):
            t += 60
            rows.append(f"u{u},i{it:02d},{t + k},{4 if k % 2 else 3}")
    (root / "inter.csv").write_text("\n".join(rows) + "\n")
    return root
