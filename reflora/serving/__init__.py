"""reflora.serving: the oracle for multi-adapter serving kernels (vLLM, punica, S-LoRA, LoRAX).

Legend: N rows, I in, O out, R rank (padded), L adapters, V vocabulary, D embedding dim.

* ``multi``: batched multi-adapter forward/backward, per-row adapter index (-1 = none),
  and the segment form of the engines' SGMV kernels.
* ``shrink_expand``: the engines' two halves (shrink, expand with a column
  offset) and fused outputs of several unequal slices (qkv, gate_up).
* ``embedding``: embedding and lm_head (logits) LoRA, with per-adapter extra vocabulary.
* ``tp``: tensor-parallel shards (column, row, fully sharded) with fixed reduction order.
* ``bounds``: the a-priori rounding-error bounds the checks use.
"""

from .multi import MultiLoraCache, MultiLoraGrads, multi_lora_backward, multi_lora_forward, segments_to_indices

__all__ = ["MultiLoraCache", "MultiLoraGrads", "multi_lora_backward", "multi_lora_forward", "segments_to_indices"]
