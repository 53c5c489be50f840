"""TOVA — Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs" (EMNLP 2024,
arXiv:2401.06104): Token Omission Via Attention.

While decoding, when the cache is full, evict the token the CURRENT query attends to least. Scores
are the new query's softmax attention averaged over all heads of the layer (the paper's layer-wide
choice), so every KV head of a layer keeps the same tokens. At prefill the last prompt query plays
the current query (window_size 1: the last token is always kept). Use it with `max_cache_size`
(the paper's multi-state size): one eviction per generated token.
"""

from dataclasses import dataclass

from .base import KVMethod, PrefillInputs, keep_top_prefix_and_window, window_attention


@dataclass
class TOVA(KVMethod):
    name = "TOVA"
    has_decode_form = True
    window_size: int = 1

    def score(self, x: PrefillInputs, window: int):
        attention = window_attention(x, 1)[:, :, -1, : x.seq_len - window]  # [B, Hq, prefix]
        return attention.mean(dim=1, keepdim=True).expand(-1, self.stored_states(x)[0].shape[1], -1)

    def decode_select(self, d, budgets):
        window = min(self.window_size, *budgets)
        last_query = d.attention[:, :, -1, :]  # [B, Hq, P]
        scores = last_query.mean(dim=1, keepdim=True).expand(-1, d.keys.shape[1], -1)[..., : d.slots - window]
        return keep_top_prefix_and_window(scores, budgets, d.slots, None if not bool(d.hidden.any()) else ~d.hidden)
