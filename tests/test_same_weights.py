"""scripts/tiny_model/same_weights.py: the check behind the claim that a rerun reproduces the checkpoint."""
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.tiny_model import same_weights  # noqa: E402

CKPT = os.path.join(ROOT, "ckpt", "pyramidkv-tiny-llama")


def test_identical_and_nudged_checkpoints(tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(CKPT, copy)
    assert same_weights.main([CKPT, str(copy)]) == 0
    assert "21/21 tensors bit-identical" in capsys.readouterr().out
    weights = load_file(str(copy / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, 0] = torch.nextafter(weights[name][0, 0], torch.tensor(1e9))  # one ulp
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert same_weights.main([CKPT, str(copy)]) == 1
    out = capsys.readouterr().out
    assert "20/21" in out and name in out


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(SystemExit, match="no weights at"):
        same_weights.main([CKPT, str(tmp_path)])
