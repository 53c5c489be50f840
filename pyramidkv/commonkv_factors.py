"""CommonKV factorizations of a group's stacked K/V projection weights (used by commonkv.compute_factors).

factorization="weights" (default, the paper's training-free form): the fp32 SVD of the stacked weights
W = [W_1; ...; W_L] (W_l = [W_k; W_v] of layer l, [2 kv_dim, n], n = hidden) = P diag(s) Q^T gives
A = Q^T[:r] (orthonormal rows) and U = (P diag(s))[:, :r]; it minimises sum_l ||W_l - U_l A||_F, the
error on the weights, whatever the inputs h are.

factorization="whitened" (activation-aware, the SVD-LLM idea, arXiv:2403.07378; Palu, arXiv:2407.21118,
calibrates low-rank K/V projections this way): minimise the error on the activations instead,
    E = sum_l ||(W_l - U_l A) X_l||_F^2,   X_l = [n, T] the attention inputs of layer l (after
input_layernorm, what k_proj / v_proj see) on the calibration text, run through the unpatched model.
With G_l = X_l X_l^T / T, E/T = sum_l tr((W_l - U_l A) G_l (W_l - U_l A)^T). With a shared A and
different G_l there is no closed form, so:
 1. A from the pooled statistics G = (sum_l G_l) / L (every layer of the group scored on the inputs of
    all of them; exact when the G_l are equal). Factor G = S S^T (eigen: S = V diag(sqrt(lam)), lam
    clamped to >= RIDGE x mean(lam), so a singular Gram is fine). Then
    sum_l tr((W_l - U_l A) G (...)^T) = ||W S - U (A S)||_F^2, and by Eckart-Young its minimum over
    rank-r products is the truncated SVD W S = P diag(s) Q^T: U = (P diag(s))[:, :r], A S = Q^T[:r],
    i.e. A = Q^T[:r] S^-1, S^-1 = diag(1/sqrt(lam)) V^T. On the calibration tokens the latents z = A h
    are then whitened: their second moment, averaged over the group's layers, is the identity.
 2. U_l refit per layer, for that layer's own inputs (the exact minimiser of E_l given A_l = A[:r_l]):
    U_l = W_l G_l' A_l^T (A_l G_l' A_l^T)^-1, G_l' = G_l + RIDGE x mean(diag G_l) I. Up to the ridge
    this never increases layer l's calibration error over step 1's U_l (a least-squares optimum).
Full rank stays exact: S is invertible, so r = rank(W S) = rank(W) reproduces W S and W = U A exactly;
the refit then returns the same U_l (W_l = U_l A_l, A_l G_l' A_l^T invertible). A layer with its own rank
(rank file) uses the first r_l rows of A (the SVD orders them by whitened energy), as in "weights".
Step 2 only changes U, so the cache's latent is unchanged; all linear algebra runs in float64.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

FACTORIZATIONS = ("weights", "whitened")
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "ppl" / "lear.txt"
RIDGE = 1e-6  # relative to the mean eigenvalue / diagonal of a Gram (a singular Gram stays invertible)
_TOKENIZED: dict[tuple, torch.Tensor] = {}


def calibration_path(method) -> Path:
    return Path(method.calibration_file) if method.calibration_file is not None else DEFAULT_CALIBRATION


def check_calibration(method) -> None:
    """One-line ValueErrors for the calibration settings (at method build time)."""
    if method.factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization={method.factorization!r} is unknown; "
                         f"valid choices: {', '.join(FACTORIZATIONS)}")
    tokens = method.calibration_tokens
    if isinstance(tokens, float) and tokens.is_integer():
        method.calibration_tokens = tokens = int(tokens)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"calibration_tokens={tokens!r} is invalid: it must be a positive integer "
                         f"(tokens of calibration_file)")
    path = calibration_path(method)
    if (method.calibration_file is not None or method.factorization == "whitened") and not path.is_file():
        raise ValueError(f"calibration_file={str(path)!r} is not a file; valid choices: a text file, or None "
                         f"(the bundled {DEFAULT_CALIBRATION.name})")


def _tokenizer(config):
    """The model's tokenizer from its name_or_path; None for a model built from a config (no name)."""
    name = getattr(config, "_name_or_path", "") or ""
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes the one-line error below
        raise ValueError(f"CommonKV factorization='whitened' cannot load the tokenizer of {name!r} for its "
                         f"calibration text ({type(err).__name__}); valid choices: a model saved with its "
                         f"tokenizer, or factorization='weights'") from None


def calibration_ids(model, method) -> tuple[torch.Tensor, str]:
    """([1, T] token ids of the first calibration_tokens tokens of the calibration text, sha1 of the text).
    The model's tokenizer; a model without a name (built from a config, the tests' tiny ones) reads the
    text's UTF-8 bytes modulo its vocabulary size."""
    data = calibration_path(method).read_bytes()
    text_sha1 = hashlib.sha1(data).hexdigest()
    config = model.config
    key = (getattr(config, "_name_or_path", ""), config.vocab_size, text_sha1, method.calibration_tokens)
    if key not in _TOKENIZED:
        tokenizer = _tokenizer(config)
        if tokenizer is None:
            ids = [byte % config.vocab_size for byte in data[: method.calibration_tokens]]
        else:
            ids = tokenizer(data.decode("utf-8")).input_ids[: method.calibration_tokens]
        _TOKENIZED[key] = torch.tensor([ids], dtype=torch.long)
    return _TOKENIZED[key], text_sha1


def fingerprint_extra(model, method) -> dict | None:
    """What the factors of a non-default factorization depend on besides the weights (None for "weights",
    so its cache entries keep their old keys)."""
    if method.factorization == "weights":
        return None
    ids, text_sha1 = calibration_ids(model, method)
    return {"factorization": method.factorization, "calibration_tokens": method.calibration_tokens,
            "calibration_sha1": text_sha1, "calibration_ids_sha1": hashlib.sha1(ids.numpy().tobytes()).hexdigest(),
            "ridge": RIDGE, "refit": True}


def attention_grams(model, method, attns) -> list[torch.Tensor]:
    """Per layer G_l = X_l X_l^T / T (float64, [n, n]) of the k_proj inputs on the calibration text, from
    the model's own forward (no cache: CommonKV's projections are inactive, so K/V are the exact ones)."""
    from .cache import ACTIVE_CACHE

    ids, _ = calibration_ids(model, method)
    n = attns[0].k_proj.in_features
    grams = [torch.zeros(n, n, dtype=torch.float64) for _ in attns]
    counts = [0] * len(attns)

    def hook(index):
        def collect(module, inputs):
            x = inputs[0].detach().reshape(-1, n).to("cpu", torch.float64)
            grams[index].add_(x.T @ x)
            counts[index] += x.shape[0]
        return collect

    handles = [attn.k_proj.register_forward_pre_hook(hook(i)) for i, attn in enumerate(attns)]
    token = ACTIVE_CACHE.set(None)
    try:
        with torch.no_grad():
            model(input_ids=ids.to(model.get_input_embeddings().weight.device), use_cache=False)
    finally:
        ACTIVE_CACHE.reset(token)
        for handle in handles:
            handle.remove()
    return [gram / max(1, count) for gram, count in zip(grams, counts)]


def _ridged(gram: torch.Tensor) -> torch.Tensor:
    scale = gram.diagonal().mean().clamp(min=1e-30)
    return gram + RIDGE * scale * torch.eye(gram.shape[0], dtype=gram.dtype)


def factor_group(weights: list[torch.Tensor], ranks: list[int], grams: list[torch.Tensor] | None, refit=True):
    """weights: per layer of the group [2 kv_dim, n] ([W_k; W_v]); grams: per layer G_l (None = "weights").
    -> per layer (A_l [r_l, n], U_l [2 kv_dim, r_l]), fp32. refit=False: step 1's U_l (tests, ablations)."""
    stacked = torch.cat([w.float().cpu() for w in weights])
    rows = [w.shape[0] for w in weights]
    if grams is None:  # today's form, bit for bit
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        up, out, start = u * s, [], 0
        for r, d in zip(ranks, rows):
            out.append((vh[:r].contiguous(), up[start : start + d, :r].contiguous()))
            start += d
        return out
    w64 = stacked.double()
    pooled = sum(grams) / len(grams)
    lam, vecs = torch.linalg.eigh((pooled + pooled.T) / 2)
    lam = lam.clamp(min=RIDGE * lam.clamp(min=0).mean().clamp(min=1e-30).item())
    s_half, s_inv = vecs * lam.sqrt(), (vecs / lam.sqrt()).T  # S = V diag(sqrt lam), S^-1 = diag(1/sqrt lam) V^T
    u, s, vh = torch.linalg.svd(w64 @ s_half, full_matrices=False)  # step 1
    a_full, pooled_up = vh @ s_inv, u * s  # [min(d, n), n], [sum d, min(d, n)]
    out, start = [], 0
    for r, d, gram in zip(ranks, rows, grams):
        a = a_full[:r]
        g = _ridged(gram)
        w_l = w64[start : start + d]
        if refit:  # step 2: U_l = W_l G A^T (A G A^T)^-1
            up = torch.linalg.solve(a @ g @ a.T, a @ g @ w_l.T).T
        else:
            up = pooled_up[start : start + d, :r]
        out.append((a.float().contiguous(), up.float().contiguous()))
        start += d
    return out


def activation_error(weight: torch.Tensor, a: torch.Tensor, up: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - U A) X||_F^2 / T = tr(D G D^T), D = W - U A (float64): the calibration error of one layer."""
    d = weight.detach().double() - up.detach().double() @ a.detach().double()
    return float(torch.einsum("ij,jk,ik->", d, gram.double(), d))

