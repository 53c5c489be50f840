"""Prompts and KV budgets for run_summarization.py: truncation to the prefill budget, per-sample budget."""
from __future__ import annotations

import math

from .predict import CLIError
from .summarization import DatasetSpec


def kv_budget(prompt_tokens: int, compress_ratio: float, window_size: int) -> int:
    """Tokens kept per layer and KV head: the ratio removes that fraction of the prompt, but the budget
    keeps at least the observation window plus one token (the methods need budget > window)."""
    # 1e-9: (1 - 0.7) * 10 is 3.0000000000000004 in floats, and must keep 3 tokens, not 4 (the library's
    # KVMethod.capacity rounds the same way)
    return max(window_size + 1, math.ceil((1.0 - compress_ratio) * prompt_tokens - 1e-9))


def _encode(tokenizer, text: str) -> list[int]:
    # chat templates insert the BOS token themselves; do not add a second one
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def build_prompt(tokenizer, spec: DatasetSpec, document: str, max_prompt_tokens: int,
                 chat_mode: str = "auto", complete_prompt: bool = False) -> tuple[list[int], bool]:
    """(prompt token ids, document truncated?). The document is cut from its end (news put the key
    facts first) so that instruction + chat template + document fit in max_prompt_tokens. A complete
    prompt (HELM files: article, then the instruction) loses its middle instead, keeping both ends."""
    from .predict import apply_chat_template

    template = "{document}" if complete_prompt else spec.prompt

    def wrap(text: str) -> str:
        return apply_chat_template(tokenizer, template.replace("{document}", text), chat_mode)

    if complete_prompt:
        ids = _encode(tokenizer, wrap(document))
        if len(ids) <= max_prompt_tokens:
            return ids, False
        body = tokenizer(document, add_special_tokens=False)["input_ids"]
        room = max(2, len(body) - (len(ids) - max_prompt_tokens))
        while True:
            text = tokenizer.decode(body[: room // 2]) + tokenizer.decode(body[len(body) - (room - room // 2):])
            ids = _encode(tokenizer, wrap(text))
            if len(ids) <= max_prompt_tokens or room <= 2:
                return ids, True
            room -= max(1, len(ids) - max_prompt_tokens)

    ids = _encode(tokenizer, wrap(document))
    if len(ids) <= max_prompt_tokens:
        return ids, False
    room = max_prompt_tokens - len(_encode(tokenizer, wrap("")))
    if room < 1:
        raise CLIError(f"--max_prompt_tokens {max_prompt_tokens} leaves no room for the document (the "
                       f"instruction and chat template alone take {max_prompt_tokens - room} tokens)")
    document_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    while True:  # decode/encode at the cut can merge tokens differently; shrink until it fits
        ids = _encode(tokenizer, wrap(tokenizer.decode(document_ids[:room])))
        if len(ids) <= max_prompt_tokens or room <= 1:
            return ids, True
        room -= max(1, len(ids) - max_prompt_tokens)
