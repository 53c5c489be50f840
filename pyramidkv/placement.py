"""Where a runner's model lives: one device (`--device`), one GPU per process of a sharded run, or
split over devices by accelerate's big-model inference (`--device_map auto --max_memory 0=20GiB,...`).

With a device map transformers places each layer (GPU, CPU or disk offload) and accelerate's hooks move
activations between them; the model is never moved as a whole (`model.to` would undo the map). The
compressed cache takes every layer's K/V as that layer's attention produces them, so each layer's kept
tokens stay (and are selected) on the layer's own device.
"""
from __future__ import annotations

import re

from .predict import CLIError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


def add_placement_args(group) -> None:
    group.add_argument("--device_map", default=None, choices=DEVICE_MAPS,
                       help="split the model over the GPUs (then CPU, then disk) with accelerate's big-model "
                            "inference instead of moving it to --device (default: off, one device)")
    group.add_argument("--max_memory", default=None,
                       help="with --device_map: memory per device as accelerate takes it, e.g. "
                            "0=20GiB,1=40GiB,cpu=64GiB (GPU index or cpu; default: what accelerate measures)")
    group.add_argument("--offload_folder", default=None,
                       help="with --device_map: folder for layers offloaded to disk (needed when the map "
                            "puts any there) (default: none)")


def parse_max_memory(text: str | None) -> dict | None:
    """{0: "20GiB", "cpu": "64GiB"} from "0=20GiB,cpu=64GiB" (None for None); one-line errors."""
    if text is None:
        return None
    memory = {}
    for item in text.split(","):
        device, sep, amount = (part.strip() for part in item.partition("="))
        if not sep or not device or not MEMORY_RE.match(amount):
            raise CLIError(f"--max_memory {text!r}: {item.strip()!r} is not DEVICE=AMOUNT; give e.g. "
                           "0=20GiB,1=40GiB,cpu=64GiB (device: a GPU index, cpu or disk)")
        if not (device.isdigit() or device in ("cpu", "disk")):
            raise CLIError(f"--max_memory {text!r}: device {device!r} is not a GPU index, cpu or disk")
        memory[int(device) if device.isdigit() else device] = amount.replace(" ", "")
    return memory


def validate_placement(args, shard) -> None:
    """Check --device_map / --max_memory / --offload_folder before any model loads."""
    device_map = getattr(args, "device_map", None)
    memory = parse_max_memory(getattr(args, "max_memory", None))
    if device_map is None:
        for flag in ("max_memory", "offload_folder"):
            if getattr(args, flag, None) is not None:
                raise CLIError(f"--{flag} only applies with --device_map (one of {', '.join(DEVICE_MAPS)})")
        return
    if args.device == "cpu":
        raise CLIError("--device_map places the model itself, so --device cpu conflicts with it; use --device "
                       "auto, or keep GPUs out with --max_memory cpu=...")
    if shard.sharded and shard.local_world > 1:
        raise CLIError(f"--device_map {device_map} with {shard.local_world} processes on one machine: each would "
                       "spread over all its GPUs; run one process per machine, or drop --device_map")
    if memory is not None:
        import torch
        gpus = torch.cuda.device_count()
        bad = [d for d in memory if isinstance(d, int) and d >= gpus]
        if bad:
            raise CLIError(f"--max_memory names GPU {bad[0]} but torch sees {gpus} GPU(s); valid: "
                           f"{', '.join(map(str, range(gpus))) or 'none'}, cpu, disk")


def load_kwargs(args) -> dict:
    """from_pretrained arguments for the placement (empty without --device_map)."""
    device_map = getattr(args, "device_map", None)
    if device_map is None:
        return {}
    kwargs = {"device_map": device_map}
    memory = parse_max_memory(getattr(args, "max_memory", None))
    if memory is not None:
        kwargs["max_memory"] = memory
    if getattr(args, "offload_folder", None):
        kwargs["offload_folder"] = args.offload_folder
    return kwargs


def process_device(device: str, shard) -> str:
    """The device one process uses: its own GPU (LOCAL_RANK) in a sharded run on a multi-GPU machine."""
    if device != "cuda" or shard.local_world <= 1:
        return device
    import torch
    return f"cuda:{shard.local_rank % max(1, torch.cuda.device_count())}"


def input_device(model):
    """Where a placed model takes its input ids: the device its embedding layer runs on (accelerate
    keeps an offloaded layer's weights on `meta` and runs it on the main device, so `model.device` is
    not that device then)."""
    import torch
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return model.device
    placed = [d for d in device_map.values() if d not in ("cpu", "disk")]
    if placed:  # GPUs in the map: accelerate runs offloaded layers on the first one
        first = placed[0]
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return torch.device("cpu")


def placement_record(model, args, shard) -> dict:
    """run_meta.json's record of where the model ran and how the samples were split."""
    device_map = getattr(model, "hf_device_map", None) if getattr(args, "device_map", None) else None
    return {
        "processes": shard.world,
        "sharding": "sample i by process i % processes" if shard.sharded else None,
        "device_map": getattr(args, "device_map", None),
        "max_memory": getattr(args, "max_memory", None),
        "offload_folder": getattr(args, "offload_folder", None),
        "layer_devices": {name: str(device) for name, device in device_map.items()} if device_map else None,
        "model_device": str(input_device(model)),
    }
