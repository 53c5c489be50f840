#!/usr/bin/env python
"""Are two checkpoints the same model? Compares every tensor of two save_pretrained directories (or
.safetensors files) bit for bit — how a from-scratch rerun of scripts/train_tiny_model.py is checked
against the committed checkpoint. Exit status 0 when every tensor is identical, 1 otherwise.

  python scripts/tiny_model/same_weights.py ckpt/pyramidkv-tiny-llama /tmp/rerun
"""
from __future__ import annotations

import argparse
import os
import sys


def load(path: str) -> dict:
    from safetensors.torch import load_file
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        sys.exit(f"error: no weights at {file!r} (give a save_pretrained directory or a .safetensors file)")
    return load_file(file)


def compare(a: dict, b: dict) -> tuple[list[str], float]:
    """Names of the tensors that differ (or exist on one side only) and the largest absolute difference."""
    differ = sorted(set(a) ^ set(b))
    max_diff = 0.0
    for name in sorted(set(a) & set(b)):
        if a[name].shape != b[name].shape:
            differ.append(name)
        elif not a[name].equal(b[name]):
            differ.append(name)
            max_diff = max(max_diff, (a[name].double() - b[name].double()).abs().max().item())
    return differ, max_diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first")
    ap.add_argument("second")
    args = ap.parse_args(argv)
    a, b = load(args.first), load(args.second)
    differ, max_diff = compare(a, b)
    print(f"{len(set(a) | set(b)) - len(differ)}/{len(set(a) | set(b))} tensors bit-identical"
          + (f"; differ: {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}; max |diff| {max_diff:.3g}"
             if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
