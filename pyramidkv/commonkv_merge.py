"""CommonKV's cross-layer merge after prefill (Wang et al. 2025, arXiv:2508.16134; merge=True).

Per batch row, group and eligible position: the mean pairwise cosine similarity of the group's latents;
over all (group, position) pairs of the row the least similar no_merge_ratio stay per layer, the rest
become the mean latent (uniform weights, or method.merge_weights per layer of the group) stored once for
the group. The first SINKS and last RECENT real positions of a row are never merged.

Batches: each row is merged on its own, from its own real tokens (left pads are never eligible, and
the eligible range starts at the row's first real token), so a padded row merges exactly the positions
of its single run; rows then hold different numbers of own and merged slots, so both are stored per
row (LatentLayer.own / .shared), and every row still rebuilds all its prompt slots in prompt order.
"""

from __future__ import annotations

import math

import torch

from .commonkv import groups_of

SINKS, RECENT = 4, 128  # positions never merged: the first 4 and the last 128 real positions of a row


def _similarities(latents: list[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise cosine similarity per position of a group's latents [E, r] each -> [E]."""
    z = torch.nn.functional.normalize(torch.stack(latents).float(), dim=-1)  # [L, E, r]
    count = len(latents)
    return (torch.einsum("led,ked->lke", z, z).sum((0, 1)) - count) / (count * (count - 1))


def _merged_positions(layers, groups, row: int, real: int) -> list[torch.Tensor]:
    """Per group: the slot indices of row `row` whose latents are merged (ascending)."""
    method = layers[0].method
    length = layers[0].latents.shape[1]
    start = length - real  # the row's first real slot
    eligible = torch.arange(start + SINKS, max(start + SINKS, length - RECENT))
    if len(eligible) == 0:
        return [eligible for _ in groups]
    sims = torch.stack([_similarities([layers[l].latents[row, eligible.to(layers[l].latents.device)].cpu()
                                       for l in group]) for group in groups])  # [G, E]
    keep = int(math.ceil(method.no_merge_ratio * sims.numel() - 1e-9))
    merged = torch.ones(sims.numel(), dtype=torch.bool)
    merged[sims.flatten().argsort(stable=True)[:keep]] = False
    return [eligible[mask] for mask in merged.view_as(sims)]


def merge_groups(layers) -> dict:
    """Merge every group of more than one layer (see the module docstring). Returns {group first layer:
    merged count of each row}."""
    method = layers[0].method
    batch, length = layers[0].latents.shape[:2]
    groups = [g for g in groups_of(len(layers), method.layer_step) if len(g) > 1]
    mask = method.current_padding_mask()
    real = [length] * batch if mask is None else [int(n) for n in mask[:, -length:].sum(-1).tolist()]
    plans = [_merged_positions(layers, groups, row, real[row]) for row in range(batch)]  # [row][group]
    counts = {}
    for index, group in enumerate(groups):
        per_row = [plan[index] for plan in plans]
        counts[group[0]] = [len(positions) for positions in per_row]
        if not any(counts[group[0]]):
            continue  # nothing merged in this group: its layers stay dense
        weights = torch.tensor(method.merge_weights or [1.0] * len(group), dtype=torch.float32)
        weights = weights / weights.sum()
        shared = {"latents": [], "positions": [], "owner": group[0]}
        owns = {l: [] for l in group}
        for row, positions in enumerate(per_row):
            device = layers[group[0]].latents.device
            positions = positions.to(device)
            stack = torch.stack([layers[l].latents[row, positions] for l in group])  # [L, M_b, r]
            shared["latents"].append((stack * weights.to(stack)[:, None, None]).sum(0))
            shared["positions"].append(layers[group[0]].positions[row, positions].clone())
            own_mask = torch.ones(length, dtype=torch.bool, device=device)
            own_mask[positions] = False
            order = torch.cat([torch.arange(length, device=device)[own_mask], positions]).argsort()
            for l in group:
                owns[l].append({"latents": layers[l].latents[row, own_mask].clone(),
                                "positions": layers[l].positions[row, own_mask].clone(), "order": order})
        for l in group:
            layer = layers[l]
            layer.shared, layer.own = shared, owns[l]
            layer.latents, layer.positions = layer.latents[:, :0].clone(), layer.positions[:, :0].clone()
    return counts
