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


def _head_loss(model, ids, layer, head, rows, scaling) -> float:
    """One head's supervision loss on `rows`, without training (a forward pass fills the captured q/k)."""
    with torch.no_grad():
        model.model(input_ids=ids)
        loss = supervision.head_loss(layer, head, rows, scaling).item()
    supervision.CAPTURED.clear()
    return loss


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

    copy_rows = [(b, q, t) for b, p in enumerate(batch[1]) for q, t in p["l1"]]
    before = _head_loss(model, batch[2], 1, 4, copy_rows, scaling)
    # trained without head 4 in copy_heads: its loss is not a target; with it, it must fall
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(15):
        loss, parts, _ = recipe.train_step(model, batch, scaling, copy_heads=[0, 4], bind_heads=[0, 1, 4, 5])
        assert torch.isfinite(loss) and set(parts) == {"ce", "l0", "l1"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _head_loss(model, batch[2], 1, 4, copy_rows, scaling)
    assert after < 0.7 * before, (before, after)


def test_growing_kv_heads_keeps_the_outputs():
    """--kv_heads 4 on a 2-KV-head state: same logits after the grow, and the AdamW moments follow."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scripts.tiny_model.grow import grow_kv_heads
    tok = AutoTokenizer.from_pretrained(CKPT)
    old = AutoModelForCausalLM.from_pretrained(CKPT).eval()
    new = recipe.build_model(tok, seed=1, shared_embedding=1.0, rope_theta=10000.0, kv_heads=4).eval()
    state = {k: v.clone() for k, v in old.state_dict().items()}
    trainable = [n for n, p in old.named_parameters() if p.requires_grad]
    opt_state = {"state": {i: {"exp_avg": torch.randn_like(dict(old.named_parameters())[n]),
                               "exp_avg_sq": torch.rand_like(dict(old.named_parameters())[n])}
                           for i, n in enumerate(trainable)}}
    k_name = "model.layers.1.self_attn.k_proj.weight"
    k_moment = opt_state["state"][trainable.index(k_name)]["exp_avg"].clone()
    assert grow_kv_heads(state, opt_state, new)
    new.load_state_dict(state)
    text = "One of the special magic numbers for tall-crab is: 7260424. What is it? 7260"
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(new(**ids).logits, old(**ids).logits, atol=1e-4, rtol=1e-4)
    grown = opt_state["state"][trainable.index(k_name)]["exp_avg"]
    assert grown.shape == new.get_parameter(k_name).shape
    torch.testing.assert_close(grown[32:64], k_moment[:32])  # new KV head 1 is a copy of old head 0
    torch.testing.assert_close(grown[64:96], k_moment[32:64])
    with pytest.raises(ValueError, match="multiple"):
        grow_kv_heads({**old.state_dict()}, {"state": {}},
                      recipe.build_model(tok, 1, 1.0, 10000.0, kv_heads=1))


def test_learning_rate_warms_up_then_decays_at_the_end():
    st = {"step": 0, "stage_start": 0}
    assert recipe.learning_rate(st, 1e-3, 1000, 0) == pytest.approx(1e-3 / 30)
    for step, expected in [(500, 1e-3), (800, 1e-3), (900, 0.55e-3), (999, 0.1045e-3)]:
        st["step"] = step
        assert recipe.learning_rate(st, 1e-3, 1000, 200) == pytest.approx(expected, rel=1e-6), step
    st["step"] = 999
    assert recipe.learning_rate(st, 1e-3, 1000, 0) == pytest.approx(1e-3)  # no decay by default


def _log(run_dir):
    import json
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [{k: r[k] for k in ("step", "loss", "ce", "l0", "l1", "len")} for r in map(json.loads, f)]


def test_a_resumed_run_continues_the_same_trajectory(tmp_path):
    """The committed checkpoint was made by resuming runs: stopping and rerunning must change nothing."""
    common = ["--device", "cpu", "--threads", "1", "--tokens_per_step", "700", "--save_every", "2",
              "--valid_every", "1000", "--copy_heads", "0,4"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    recipe.main(common + ["--max_steps", "4", "--run_dir", straight, "--out", straight + "/out"])
    recipe.main(common + ["--max_steps", "2", "--run_dir", resumed, "--out", resumed + "/out2"])
    recipe.main(common + ["--max_steps", "4", "--run_dir", resumed, "--out", resumed + "/out"])
    assert [r["step"] for r in _log(resumed)] == [1, 2, 3, 4]
    assert _log(resumed) == _log(straight)
    a = torch.load(os.path.join(straight, "state.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(resumed, "state.pt"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           recipe.build_model(recipe.build_tokenizer(seed=0), 0, 1.0, 1e4).state_dict()[
                               "model.layers.0.self_attn.q_proj.weight"])  # it did train


def test_a_wider_deeper_model_trains_with_the_same_supervision(capsys):
    tok = recipe.build_tokenizer(seed=0)
    model = recipe.build_model(tok, 0, 1.0, 1e4, head_dim=16, layers=3)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.head_dim) == (128, 3, 16)
    supervision.install(model)
    sampler, _ = get_sampler()
    batch = recipe.make_batch(tok, sampler, 0, (300, 300, 0), random.Random(0), 600, {"niah_multikey_2": 1.0})
    model.train()
    loss, parts, _ = recipe.train_step(model, batch, model.config.head_dim ** -0.5, copy_heads=[0, 4])
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(SystemExit):
        recipe.parse_args(["--layers", "1"])
    assert "--layers 1" in capsys.readouterr().err


def test_the_saved_tokenizer_does_not_depend_on_use(tmp_path):
    """Padding a batch before export must not change the exported tokenizer files."""
    tok = recipe.build_tokenizer(seed=0)
    model = recipe.build_model(tok, 0, 1.0, 1e4)
    recipe.export(model, tok, str(tmp_path / "fresh"))
    tok(["a b", "a b c d e"], padding=True)
    recipe.export(model, tok, str(tmp_path / "used"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "fresh" / name).read_bytes() == (tmp_path / "used" / name).read_bytes(), name
    with open(os.path.join(CKPT, "tokenizer.json"), "rb") as f:
        assert f.read() == (tmp_path / "fresh" / "tokenizer.json").read_bytes()  # same as the committed one


def test_previous_token_supervision_trains_the_named_head():
    """--prev_heads: from every needle value digit to the token before it (the digit an answer just emitted)."""
    torch.manual_seed(0)
    tok = recipe.build_tokenizer(seed=0)
    model = recipe.build_model(tok, seed=0, shared_embedding=1.0, rope_theta=10000.0)
    supervision.install(model)
    sampler, _ = get_sampler()
    batch = recipe.make_batch(tok, sampler, 0, (300, 300, 0), random.Random(0), 600, {"niah_multikey_2": 1.0})
    ids, packed = batch[2], batch[1]
    value_tokens = tok.convert_ids_to_tokens([int(ids[0, q]) for q in packed[0]["val_pos"]])
    assert value_tokens and all(t.isdigit() for t in value_tokens)
    rows = recipe.prev_token_rows(packed)
    assert rows and all(t == [q - 1] for _, q, t in rows)
    scaling = model.config.head_dim ** -0.5
    model.train()
    before = _head_loss(model, ids, 0, 6, rows, scaling)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(10):
        loss, parts, _ = recipe.train_step(model, batch, scaling, copy_heads=[0], prev_heads=[6])
        assert set(parts) == {"ce", "l0", "l1", "lp"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _head_loss(model, ids, 0, 6, rows, scaling) < 0.5 * before, before
