"""CommonKV's cross-layer merge after prefill (Wang et al. 2025, arXiv:2508.16134; merge=True).

Per batch row, group and eligible position: the mean pairwise cosine similarity of the group's latents;
over all (group, position) pairs of the row the least similar no_merge_ratio stay per layer, the rest
become the mean latent (uniform weights, or method.merge_weights per layer of the group) stored once for
the group. The first SINKS and last RECENT real positions of a row are never merged.
With evict_method the merge runs after the last layer's eviction (evict first, then merge), and the
candidates of a group are the positions that every layer of the group kept (without eviction: all).

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


def _real_slots(layer, row: int, real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot indices, true positions) of the slots of `layer` holding row `row`'s real tokens: its last
    min(kept, real) slots (before them: left pads, or an eviction's hidden fillers)."""
    slots = layer.latents.shape[1]
    kept = min(layer.kept_per_row[row], real)
    index = torch.arange(slots - kept, slots)
    return index, layer.positions[row].cpu()[index]


def _row_plan(layers, groups, row: int, real: int) -> list[tuple[torch.Tensor, dict]]:
    """Per group: (merged true positions, {layer: their slot indices}) of row `row`. Candidates: the
    positions every layer of the group holds (all of them without eviction), SINKS <= p < real - RECENT."""
    method = layers[0].method
    candidates, sims = [], []
    for group in groups:
        present = torch.ones(real, dtype=torch.bool)
        present[: SINKS] = False
        present[max(SINKS, real - RECENT):] = False
        slot_of = {}
        for l in group:
            index, positions = _real_slots(layers[l], row, real)
            held = torch.zeros(real, dtype=torch.bool)
            held[positions] = True
            present &= held
            slot_of[l] = torch.full((real,), -1, dtype=torch.long)
            slot_of[l][positions] = index
        chosen = present.nonzero().flatten()
        slots = {l: slot_of[l][chosen] for l in group}
        candidates.append((chosen, slots))
        sims.append(_similarities([layers[l].latents[row, slots[l].to(layers[l].latents.device)].cpu() for l in group])
                    if len(chosen) else torch.zeros(0))
    flat = torch.cat(sims)
    keep = int(math.ceil(method.no_merge_ratio * flat.numel() - 1e-9))
    merged = torch.ones(flat.numel(), dtype=torch.bool)
    merged[flat.argsort(stable=True)[:keep]] = False
    plan = []
    for (chosen, slots), mask in zip(candidates, merged.split([len(c) for c, _ in candidates])):
        plan.append((chosen[mask], {l: index[mask] for l, index in slots.items()}))
    return plan


def merge_groups(layers) -> dict:
    """Merge every group of more than one layer (see the module docstring). Returns {group first layer:
    merged count of each row}."""
    method = layers[0].method
    batch, length = layers[0].latents.shape[0], layers[0].cumulative_length
    groups = [g for g in groups_of(len(layers), method.layer_step) if len(g) > 1]
    mask = method.current_padding_mask()
    real = [length] * batch if mask is None else [int(n) for n in mask[:, -length:].sum(-1).tolist()]
    plans = [_row_plan(layers, groups, row, real[row]) for row in range(batch)]  # [row][group]
    counts = {}
    for index, group in enumerate(groups):
        per_row = [plan[index] for plan in plans]
        counts[group[0]] = [len(positions) for positions, _ in per_row]
        if not any(counts[group[0]]):
            continue  # nothing merged in this group: its layers stay dense
        weights = torch.tensor(method.merge_weights or [1.0] * len(group), dtype=torch.float32)
        weights = weights / weights.sum()
        shared = {"latents": [], "positions": [], "owner": group[0]}
        owns = {l: [] for l in group}
        for row, (positions, slots) in enumerate(per_row):
            device = layers[group[0]].latents.device
            stack = torch.stack([layers[l].latents[row, slots[l].to(device)] for l in group])  # [L, M_b, r]
            shared["latents"].append((stack * weights.to(stack)[:, None, None]).sum(0))
            shared["positions"].append(positions.to(layers[group[0]].positions))
            for l in group:
                layer, merged = layers[l], slots[l].to(device)
                own_mask = torch.ones(layer.latents.shape[1], dtype=torch.bool, device=device)
                own_mask[merged] = False
                order = torch.cat([torch.arange(len(own_mask), device=device)[own_mask], merged]).argsort()
                owns[l].append({"latents": layer.latents[row, own_mask].clone(),
                                "positions": layer.positions[row, own_mask].clone(), "order": order})
        for l in group:
            layer = layers[l]
            layer.shared, layer.own = shared, owns[l]
            layer.latents, layer.positions = layer.latents[:, :0].clone(), layer.positions[:, :0].clone()
    return counts
