#!/usr/bin/env python
"""Train the project's embedded default model: a 2-layer Llama that answers RULER needle questions.

Recipe (DESIGN §5, found by two probes on a 2-core CPU): untied input/output embeddings frozen at random
init, plus one shared random vector in every input embedding (lets a head attend by position alone);
answer needles at every depth; answer-only loss; attention supervision toward the needle in both layers
(scripts/tiny_model/packing.py); an accuracy-gated length curriculum. Training data come from the
project's RULER generator (pyramidkv.ruler) with seeds >= 10_000; evaluation uses seed 42, indices 0..99
(validation during training: seed 7). Resumable: rerun the same command and it continues from run_dir/state.pt.
Trains on the CPU by default (the committed checkpoint); `--device cuda` runs the same recipe on a GPU.

The committed checkpoint is two invocations on one run_dir (MODEL_CARD.md): 3 600 steps with the defaults,
then a resume to 5 400 steps adding a second copy head in the other KV group and a final lr decay:
  python scripts/train_tiny_model.py --compile --max_steps 3600 --run_dir R --out R/phase1
  python scripts/train_tiny_model.py --compile --max_steps 5400 --copy_heads 0,4 --decay_steps 600 --run_dir R

Background: Olsson et al. 2022, "In-context Learning and Induction Heads" (the copy circuit supervised
here); Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.tiny_model import supervision  # noqa: E402
from scripts.tiny_model.evaluate import evaluate  # noqa: E402
from scripts.tiny_model.grow import grow_kv_heads  # noqa: E402
from scripts.tiny_model.packing import pack_sample  # noqa: E402
from scripts.tiny_model.sampler import FAILURES, get_sampler  # noqa: E402
from scripts.tiny_model.tokenizer import build_tokenizer  # noqa: E402

TARGET_TASKS = ["niah_single_1", "niah_multikey_1", "niah_multikey_2"]
TASK_MIX = {"niah_single_1": 0.15, "niah_multikey_1": 0.25, "niah_multikey_2": 0.35,
            "niah_multiquery": 0.10, "niah_multivalue": 0.05, "niah_multikey_3": 0.10}
# (min length, max length, learning rate): lengths as RULER counts them (prompt + 128 generated tokens)
STAGES = [(256, 512, 2e-3), (384, 1024, 5e-4), (640, 1664, 5e-4), (1024, 2176, 3e-4)]
TRAIN_SEED_BASE, VALID_SEED = 10_000, 7


def parse_mix(text: str) -> dict:
    try:
        mix = {task: float(weight) for task, weight in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TASK=WEIGHT,...") from None
    if not mix or sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative weights, at least one positive")
    unknown = sorted(set(mix) - set(TASK_MIX))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; valid: {', '.join(TASK_MIX)}")
    return mix


def _heads(text: str) -> list[int]:
    try:
        heads = [int(h) for h in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected head indices like 0,4") from None
    if not heads or min(heads) < 0 or max(heads) > 7:
        raise argparse.ArgumentTypeError(f"{text!r}: head indices must be in 0..7")
    return heads


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="ckpt/pyramidkv-tiny-llama", help="final save_pretrained directory")
    ap.add_argument("--run_dir", default="/tmp/train_run", help="log, resumable state, latest export")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="torch device to train on, e.g. cuda (the committed checkpoint was trained on cpu)")
    ap.add_argument("--tokens_per_step", type=int, default=8192)
    ap.add_argument("--max_steps", type=int, default=20000)
    ap.add_argument("--max_minutes", type=float, default=240.0,
                    help="stop (and export) after this much training wall time, counted across resumes (default 240)")
    ap.add_argument("--task_mix", type=parse_mix, default=None,
                    help="TASK=WEIGHT,... sampling weights of the training tasks (default: the recipe's TASK_MIX)")
    ap.add_argument("--whole_key_words", action="store_true",
                    help="make every RULER key word one token (measured worse: see MODEL_CARD.md)")
    ap.add_argument("--digits_per_token", type=int, default=2, choices=[1, 2, 3],
                    help="digits per number token, grouped from the left (3 = Llama-3's rule; default 2, the "
                         "committed checkpoint's; 1 = the earlier checkpoints')")
    ap.add_argument("--shared_embedding", type=float, default=1.0,
                    help="std of one shared random vector added to every frozen input embedding (0 = none)")
    ap.add_argument("--rope_theta", type=float, default=10000.0,
                    help="RoPE base (500 000, Llama-3's, learned much slower: see MODEL_CARD.md)")
    ap.add_argument("--decay_steps", type=int, default=0,
                    help="decay the learning rate linearly to 10%% over the last N steps before --max_steps")
    ap.add_argument("--kv_heads", type=int, default=2, choices=[1, 2, 4, 8],
                    help="KV heads per layer (8 query heads); resuming a run saved with fewer grows it")
    ap.add_argument("--head_dim", type=int, default=32,
                    help="per-head width; hidden = 8 x head_dim, MLP = 2 x hidden (wider keys tell more needles apart)")
    ap.add_argument("--layers", type=int, default=2,
                    help="decoder layers (>= 2; supervision stays on layers 0 and 1)")
    ap.add_argument("--copy_heads", type=_heads, default=[0],
                    help="layer-1 heads supervised to copy the queried needle's value, e.g. 0,4 (default 0)")
    ap.add_argument("--bind_heads", type=_heads, default=[0, 1],
                    help="layer-0 head pairs (first word, last word) supervised to bind a needle's key to its "
                         "value, e.g. 0,1,4,5 (default 0,1)")
    ap.add_argument("--copy_weight", type=float, default=0.3,
                    help="weight of the layer-1 copy supervision loss (default 0.3)")
    ap.add_argument("--prev_heads", type=_heads, default=[],
                    help="layer-0 heads supervised to attend from each needle value token to the token before "
                         "it (the digit group an answer has just emitted), e.g. 4 (default none)")
    ap.add_argument("--gate", type=float, default=0.8, help="first-answer accuracy on all target tasks to advance")
    ap.add_argument("--min_stage_steps", type=int, default=150)
    ap.add_argument("--save_every", type=int, default=100)
    ap.add_argument("--valid_every", type=int, default=300)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (faster per step on CPU)")
    ap.add_argument("--init_only", action="store_true", help="save tokenizer + untrained model and exit")
    args = ap.parse_args(argv)
    if args.layers < 2 or args.head_dim < 2 or args.head_dim % 2:
        ap.error(f"--layers {args.layers} --head_dim {args.head_dim}: need layers >= 2 (supervision uses layers 0 "
                 "and 1) and an even head_dim (RoPE pairs)")
    if len(args.bind_heads) % 2:
        ap.error(f"--bind_heads {args.bind_heads}: give pairs (first-word head, last-word head), e.g. 0,1,4,5")
    return args


def build_model(tok, seed: int, shared_embedding: float, rope_theta: float, kv_heads: int = 2,
                head_dim: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    hidden = 8 * head_dim  # 8 query heads
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=8192,
                      rope_theta=rope_theta, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    # Frozen random embeddings: trained digit embeddings collapsed together in the probe; frozen they stay
    # distinct, and copying forms (DESIGN §5).
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        # A component common to all tokens gives q/k a content-independent part, so a layer-0 head can
        # attend by relative (RoPE) position alone, e.g. to the key a fixed number of tokens back.
        if shared_embedding:  # guarded: with 0 the init's random stream is the pre-shared-embedding one
            model.model.embed_tokens.weight.add_(torch.randn(cfg.hidden_size) * shared_embedding)
        model.lm_head.weight.normal_(0.0, 0.06)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def export(model, tok, path: str, card_extra: dict | None = None):
    os.makedirs(path, exist_ok=True)
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    model.save_pretrained(path)
    model.set_attn_implementation(impl)
    # in-training evaluation pads batches, which leaves padding switched on in the backend tokenizer and
    # would be written into tokenizer.json; the saved file must not depend on whether an eval ran
    tok.backend_tokenizer.no_padding()
    tok.save_pretrained(path)
    if card_extra is not None:
        json.dump(card_extra, open(os.path.join(path, "training_state.json"), "w"), indent=1)


def make_batch(tok, sampler, step: int, stage, rng: random.Random, tokens_per_step: int, mix=None):
    lo, hi, _ = stage
    length = rng.randint(lo, hi)
    n = max(1, tokens_per_step // length)
    mix = mix or TASK_MIX
    tasks = rng.choices(list(mix), weights=list(mix.values()), k=n)
    # The generator sets the answer needle's depth from index % 40; drawing the index (not 0..n-1) covers
    # every depth — with 0..n-1 the stages from 640 tokens (n = 3..12) only saw answers in the first 28%.
    packed = [pack_sample(sampler(t, tok, length, rng.randrange(1 << 20), TRAIN_SEED_BASE + step), tok, rng)
              for t in tasks]
    L = max(len(p["ids"]) for p in packed)
    ids = torch.full((n, L), tok.pad_token_id, dtype=torch.long)
    for b, p in enumerate(packed):
        ids[b, : len(p["ids"])] = torch.tensor(p["ids"])
    return tasks, packed, ids


def learning_rate(st: dict, stage_lr: float, max_steps: int, decay_steps: int) -> float:
    """The stage's rate after a 30-step warm-up; linear decay to 10% over the last decay_steps steps."""
    warm = min(1.0, (st["step"] - st["stage_start"] + 1) / 30)
    into_decay = max(0, st["step"] - (max_steps - decay_steps)) / max(1, decay_steps)
    return stage_lr * warm * (1.0 - 0.9 * min(1.0, into_decay))


def prev_token_rows(packed) -> list:
    """Supervision rows (batch, value-token position, [the position before it]) for --prev_heads."""
    return [(b, q, [q - 1]) for b, p in enumerate(packed) for q in p["val_pos"]]


def train_step(model, batch, scaling: float, copy_heads=(0,), bind_heads=(0, 1), prev_heads=(), copy_weight=0.3):
    tasks, packed, ids = batch
    device = model.lm_head.weight.device
    hidden = model.model(input_ids=ids.to(device)).last_hidden_state
    rows = [(b, pos, tgt) for b, p in enumerate(packed) for pos, tgt in p["targets"]]
    b_idx = torch.tensor([r[0] for r in rows], device=device)
    p_idx = torch.tensor([r[1] for r in rows], device=device)
    logits = model.lm_head(hidden[b_idx, p_idx]).float()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([r[2] for r in rows], device=device))
    first_rows = [(b, q, t) for b, p in enumerate(packed) for q, t, _ in p["l0"]]
    last_rows = [(b, q, t) for b, p in enumerate(packed) for q, _, t in p["l0"]]
    pairs = list(zip(bind_heads[::2], bind_heads[1::2]))
    l0 = sum(supervision.head_loss(0, hf, first_rows, scaling) + supervision.head_loss(0, hl, last_rows, scaling)
             for hf, hl in pairs) / len(pairs)
    l1_rows = [(b, q, t) for b, p in enumerate(packed) for q, t in p["l1"]]
    l1 = (sum(supervision.head_loss(1, h, l1_rows, scaling) for h in copy_heads) / len(copy_heads)
          if l1_rows else torch.zeros(()))
    loss = ce + 1.0 * l0 + copy_weight * l1
    parts = {"ce": ce.item(), "l0": l0.item(), "l1": float(l1.detach())}
    if prev_heads:
        lp = sum(supervision.head_loss(0, h, prev_token_rows(packed), scaling) for h in prev_heads) / len(prev_heads)
        loss = loss + 1.0 * lp
        parts["lp"] = lp.item()
    # first-time accuracy: the eval-format question, all value tokens argmax-correct (teacher forced ==
    # greedy exact match of the answer)
    with torch.no_grad():
        pred = logits.argmax(-1).cpu()
        correct, k = [], 0
        for p in packed:
            ok = bool((pred[k: k + len(p["first"])] == torch.tensor([t for _, t in p["first"]])).all())
            correct.append(ok)
            k += len(p["targets"])
    supervision.CAPTURED.clear()
    return loss, parts, correct


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    os.makedirs(args.run_dir, exist_ok=True)
    tok = build_tokenizer(seed=args.seed, whole_key_words=args.whole_key_words,
                          digits_per_token=args.digits_per_token)
    model = build_model(tok, args.seed, args.shared_embedding, args.rope_theta, args.kv_heads,
                        args.head_dim, args.layers).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    if args.init_only:
        export(model, tok, args.out)
        print(f"saved untrained model ({n_params/1e6:.2f}M params) to {args.out}")
        return
    supervision.install(model)
    sampler, source = get_sampler()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=STAGES[0][2], betas=(0.9, 0.95), weight_decay=0.01)
    state_path = os.path.join(args.run_dir, "state.pt")
    st = {"step": 0, "stage": 0, "stage_start": 0, "elapsed": 0.0, "acc": {}, "history": []}
    if os.path.exists(state_path):
        ck = torch.load(state_path, weights_only=False, map_location="cpu")  # loads into the model's device
        if grow_kv_heads(ck["model"], ck["opt"], model):
            print(f"grew the checkpoint to {args.kv_heads} KV heads (same outputs; copies train apart)", flush=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        st = ck["st"]
        print(f"resumed from {state_path} at step {st['step']} (stage {st['stage']})", flush=True)
    fwd = torch.compile(model.model, dynamic=True) if args.compile else model.model
    compiled = type("M", (), {"model": fwd, "lm_head": model.lm_head})  # same weights, compiled body
    log = open(os.path.join(args.run_dir, "train_log.jsonl"), "a")
    print(f"params {n_params/1e6:.2f}M (trainable {sum(p.numel() for p in trainable)/1e6:.2f}M); "
          f"data source: {source}", flush=True)
    scaling = model.config.head_dim ** -0.5
    t_start = time.time() - st["elapsed"]
    model.train()
    while st["step"] < args.max_steps and (time.time() - t_start) / 60 < args.max_minutes:
        if source == "fallback" and st["step"] % 50 == 0:
            sampler, source = get_sampler()  # switch to the project's generator as soon as it lands
            if source != "fallback":
                print(f"step {st['step']}: switched data source to {source}", flush=True)
        stage = STAGES[st["stage"]]
        rng = random.Random(f"{args.seed}-{st['step']}")
        batch = make_batch(tok, sampler, st["step"], stage, rng, args.tokens_per_step, args.task_mix)
        for g in opt.param_groups:
            g["lr"] = learning_rate(st, stage[2], args.max_steps, args.decay_steps)
        loss, parts, correct = train_step(compiled, batch, scaling, args.copy_heads, args.bind_heads,
                                          args.prev_heads, args.copy_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        st["step"] += 1
        for t, ok in zip(batch[0], correct):  # running accuracy per task (EMA over ~50 samples)
            st["acc"][t] = 0.98 * st["acc"].get(t, 0.0) + 0.02 * float(ok)
        rec = {"step": st["step"], "stage": st["stage"], "len": batch[2].shape[1], "loss": round(loss.item(), 4),
               **{k: round(v, 4) for k, v in parts.items()}, "min": round((time.time() - t_start) / 60, 2),
               "acc": {k: round(v, 3) for k, v in st["acc"].items()}, "source": source,
               "generator_failures": FAILURES["count"]}
        log.write(json.dumps(rec) + "\n")
        if st["step"] % 10 == 0:
            log.flush()
            print(json.dumps(rec), flush=True)
        stage_steps = st["step"] - st["stage_start"]
        gate_ok = all(st["acc"].get(t, 0.0) >= args.gate for t in TARGET_TASKS)
        if gate_ok and stage_steps >= args.min_stage_steps and st["stage"] + 1 < len(STAGES):
            st["stage"] += 1
            st["stage_start"] = st["step"]
            st["acc"] = {}
            print(f"step {st['step']}: gate passed, stage -> {STAGES[st['stage']]}", flush=True)
        if st["step"] % args.valid_every == 0:
            model.eval()
            hi = STAGES[st["stage"]][1]
            val = {t: evaluate(model, tok, sampler, t, hi, n=16, seed=VALID_SEED) for t in TARGET_TASKS}
            model.train()
            st["history"].append({"step": st["step"], "len": hi, "valid": val})
            print(f"step {st['step']}: validation at {hi} tokens (seed {VALID_SEED}, 16 each): {val}", flush=True)
        if st["step"] % args.save_every == 0:
            st["elapsed"] = time.time() - t_start
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "st": st}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            export(model, tok, os.path.join(args.run_dir, "hf_latest"), {**st, "source": source})
    st["elapsed"] = time.time() - t_start
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "st": st}, state_path)
    export(model, tok, args.out, None)
    export(model, tok, os.path.join(args.run_dir, "hf_latest"), {**st, "source": source})
    print(f"done: step {st['step']}, {st['elapsed']/60:.1f} min, saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
