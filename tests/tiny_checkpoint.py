"""Builds a tiny random Llama checkpoint + byte-level BPE tokenizer on disk (no hub) for runner tests."""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paragraph 1 and Paragraph 2 were read.",
    "Answer the question based on the given passages. Question: who wrote it? Answer: Mary.",
    "def add(a, b):\n    return a + b\n# comment\nprint(add(1, 2))",
    "Summary: the meeting was about budgets. Dialogue: Tom: hi! Ann: hello.",
    "0 1 2 3 4 5 6 7 8 9 Location Number Description Entity Person",
]


def build_tiny_checkpoint(directory: str, chat_template: str | None = None, seed: int = 0) -> str:
    import torch

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 5, trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                            special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(fast), max_position_embeddings=4096,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random weights give flat logits; scale them so greedy picks are well separated
        model.lm_head.weight.mul_(8.0)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def one_torch_thread():
    """Generator for an autouse fixture: tiny models decode far faster (up to 20x on a busy 2-core
    machine) with one intra-op thread; the previous setting is restored afterwards."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
