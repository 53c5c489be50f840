"""PyramidInfer as the SimCalKV authors' baseline implements it (github.com/William-kaihhu/SimCalKV,
task_evaluation/*/eviction_pyramid.py, pyramid_qwen.py; after Yang et al., "PyramidInfer: Pyramid KV
Cache Compression for High-throughput LLM Inference", ACL Findings 2024).

Eviction only, by accumulated attention (H2O's column sums), with a ratio that grows with depth: layer l
removes the fraction r + layer_step * l of each row's tokens (r = compress_ratio, or 1 - keep_ratio;
layer_step 0.01 as released). With a token budget C, layer l keeps C - floor(layer_step * l * n). A
layer keeps at least one token. The observation window is kept (the released code keeps none).
"""

import math
from dataclasses import dataclass

from .base import check_finite_number
from .h2o import H2O


@dataclass
class PyramidInfer(H2O):
    name = "PyramidInfer"
    has_decode_form = False  # H2O's decode rule does not apply to its prefill form
    layer_step: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        check_finite_number("layer_step", self.layer_step, minimum=0)

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        budgets = []
        for layer in range(num_layers):
            if self.max_capacity_prompt is not None:
                kept = self.max_capacity_prompt - math.floor(self.layer_step * layer * seq_len + 1e-9)
            else:
                removed = (self.compress_ratio if self.compress_ratio is not None else 1 - self.keep_ratio)
                kept = math.ceil((1 - removed - self.layer_step * layer) * seq_len - 1e-9)
            budgets.append(min(seq_len, max(1, kept)))
        return budgets
