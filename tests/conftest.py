"""Shared fixtures: tiny random-init models for plumbing tests (never for quality claims)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    """A 2-layer random-init LlamaForCausalLM (hidden 64, vocab 128), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()
