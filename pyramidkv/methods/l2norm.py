"""L2Norm / KnormPress — Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression" (EMNLP 2024, arXiv:2406.11430).

Keeps, per KV head, the prefix tokens whose keys have the LOWEST L2 norm (they draw the most attention),
plus the recent window. Like the paper and KVCache-Factory, the first `skip_layers` layers (default 2)
are not compressed; set skip_layers=0 to compress every layer.
"""

from dataclasses import dataclass

from .base import KVMethod, PrefillInputs


@dataclass
class L2Norm(KVMethod):
    name = "L2Norm"
    needs_queries = False  # key-only
    has_decode_form = True  # the prefill rule re-applied to the cache (methods/decode.py)
    skip_layers: int = 2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.skip_layers, bool) or not isinstance(self.skip_layers, int) or self.skip_layers < 0:
            raise ValueError(
                f"skip_layers={self.skip_layers!r} is invalid: it must be a non-negative integer (0 = compress every layer)"
            )

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        kept = min(self.capacity(seq_len), seq_len)
        return [seq_len if layer < self.skip_layers else kept for layer in range(num_layers)]

    def score(self, x: PrefillInputs, window: int):
        return -x.keys[:, :, : x.seq_len - window].float().norm(dim=-1)
