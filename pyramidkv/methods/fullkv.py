"""FullKV: no compression (the baseline every method is compared with)."""

from dataclasses import dataclass

from .base import KVMethod


@dataclass
class FullKV(KVMethod):
    """Keeps the whole prompt. Budget settings are accepted (so sweeps can pass them) but unused."""

    name = "FullKV"
    needs_queries = False  # key-only

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        return [seq_len] * num_layers
