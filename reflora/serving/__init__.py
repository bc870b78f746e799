"""reflora.serving: the oracle for multi-adapter serving kernels (vLLM, punica, S-LoRA, LoRAX).

Legend: N rows, I in, O out, R rank (padded), L adapters, V vocabulary, X extra
tokens per adapter, D embedding dim, T tensor-parallel ranks.

* ``multi``: batched multi-adapter forward/backward, per-row adapter index (-1 = none),
  and the segment form of the engines' SGMV kernels.
* ``shrink_expand``: the engines' two halves (shrink, expand with a column
  offset) and fused outputs of several unequal slices (qkv, gate_up).
* ``embedding``: embedding and lm_head (logits) LoRA, with per-adapter extra vocabulary.
* ``tp``: tensor-parallel shards (column, row, fully sharded) with a fixed reduction order.
* ``bounds``: the a-priori rounding-error bounds the serving checks use.

The kit for candidate kernels is ``reflora.testing.serving``.
"""

from .embedding import (EmbeddingCache, EmbeddingGrads, LogitsCache, LogitsGrads, lora_embedding_backward,
                        lora_embedding_forward, lora_logits_backward, lora_logits_forward)
from .multi import MultiLoraCache, MultiLoraGrads, multi_lora_backward, multi_lora_forward, segments_to_indices
from .shrink_expand import lora_expand, lora_shrink, sliced_lora_forward
from .tp import TPResult, gather_columns, tp_forward

__all__ = ["EmbeddingCache", "EmbeddingGrads", "LogitsCache", "LogitsGrads", "MultiLoraCache", "MultiLoraGrads",
           "TPResult", "gather_columns", "lora_embedding_backward", "lora_embedding_forward", "lora_expand",
           "lora_logits_backward", "lora_logits_forward", "lora_shrink", "multi_lora_backward", "multi_lora_forward",
           "segments_to_indices", "sliced_lora_forward", "tp_forward"]
