"""Tiny random-init decoder LMs of several architectures, for plumbing tests of the LLM methods.

Never used for quality claims. Every model is small enough that a whole GPTQ/AWQ run
takes well under a second, and has widths divisible by 32 so group sizes 16/32 apply.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = ("llama", "qwen2", "mistral", "opt")


def tiny_causal_lm(arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A seeded random-init causal LM of ``arch`` (hidden 64, vocab 128) in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=128)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(intermediate_size=128, num_key_value_heads=4,
                                                       sliding_window=None, **common))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers,
                                               num_attention_heads=4, ffn_dim=128, max_position_embeddings=128,
                                               word_embed_proj_dim=64, enable_bias=True))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return model.eval()


def token_batches(n: int = 4, seq_len: int = 32, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """(n, seq_len) random token ids, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


# --- a toy decoder whose blocks hold a Linear no token reaches (for the fallback paths) -------


class Block(nn.Module):
    """A toy decoder block whose ``spare`` Linear is never called."""

    def __init__(self, width=32):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.spare = nn.Linear(32, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class ToyLM(nn.Module):
    """Embedding, two toy ``Block``s and a head (seeded): the unused ``spare`` layers exercise fallbacks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def toy_data(n: int = 32):
    """``n`` seeded token rows of 16 for ToyLM, in batches of 8."""
    from slimkit.core.calibration import CalibrationData

    return CalibrationData.from_tensors(torch.randint(0, 50, (n, 16), generator=torch.Generator().manual_seed(0)),
                                        batch_size=8, key="input_ids")


def indefinite_hessian(H, n, x):
    """A stand-in for ``accumulate_hessian`` whose result is strongly indefinite whatever the dampening."""
    H = torch.zeros(x.shape[-1], x.shape[-1]) if H is None else H
    H[0, 0] = H[1, 1] = 1.0
    H[0, 1] = H[1, 0] = 1e4
    return H, n + x.shape[0]
