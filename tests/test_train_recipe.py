"""The embedded model's training step: head-selection flags are validated, and the attention supervision
they name reaches the heads it names (its loss falls when we train on it)."""
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts import train_tiny_model as recipe  # noqa: E402
from scripts.tiny_model import supervision  # noqa: E402
from scripts.tiny_model.sampler import get_sampler  # noqa: E402

CKPT = os.path.join(ROOT, "ckpt", "pyramidkv-tiny-llama")


@pytest.mark.parametrize("flag, value", [("--copy_heads", "0,8"), ("--bind_heads", "0,1,4"),
                                         ("--bind_heads", "a,b")])
def test_bad_head_flags_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args([flag, value])
    assert value.split(",")[-1] in capsys.readouterr().err


def test_supervision_trains_the_named_heads():
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(CKPT)
    model = recipe.build_model(tok, seed=0, shared_embedding=1.0, rope_theta=10000.0)
    supervision.install(model)
    sampler, _ = get_sampler()
    batch = recipe.make_batch(tok, sampler, 0, (300, 300, 0), random.Random(0), 600,
                              {"niah_multikey_2": 1.0})
    scaling = model.config.head_dim ** -0.5
    model.train()

    def head4_copy_loss():
        rows = [(b, q, t) for b, p in enumerate(batch[1]) for q, t in p["l1"]]
        with torch.no_grad():
            model.model(input_ids=batch[2])  # fills the captured q/k
            loss = supervision.head_loss(1, 4, rows, scaling).item()
        supervision.CAPTURED.clear()
        return loss

    before = head4_copy_loss()
    # trained without head 4 in copy_heads: its loss is not a target; with it, it must fall
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(15):
        loss, parts, _ = recipe.train_step(model, batch, scaling, copy_heads=[0, 4], bind_heads=[0, 1, 4, 5])
        assert torch.isfinite(loss) and set(parts) == {"ce", "l0", "l1"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = head4_copy_loss()
    assert after < 0.7 * before, (before, after)
