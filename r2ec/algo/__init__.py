"""Pure algorithm core of r2ec: ranking metrics and the RecPO losses.

Everything in this package imports ``torch`` (and the standard library) only: no model code, no
tokenizer, no distributed runtime, no numpy. Global normalisers are always arguments, so a
data-parallel shard can compute its own share and the shares sum to the global value.
"""
