"""Shared fixtures: tiny random-init models for plumbing tests (never for quality claims)."""

import os

import pytest
import torch

torch.set_num_threads(1)
# Tests compare quantized layers with exact maths: they run the dequantize reference unless a test
# asks for the integer kernels (tests/quantization/test_kernels.py does, with kernel_policy), so a
# result never depends on which kernel a probe picked on the machine running the tests.
os.environ.setdefault("SLIMKIT_KERNELS", "reference")


@pytest.fixture
def tiny_llama():
    """A 2-layer random-init LlamaForCausalLM (hidden 64, vocab 128), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A folder with a tiny random-init Llama and a small byte-level BPE tokenizer trained here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimkit.zoo.stdlib_coder import train_tokenizer, wrap_tokenizer

    texts = ["def add(a, b):\n    return a + b\n" * 20, "class Point:\n    x: int = 0\n" * 20]
    tokenizer = wrap_tokenizer(train_tokenizer(texts, vocab_size=300))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=0, bos_token_id=0, pad_token_id=1)
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
