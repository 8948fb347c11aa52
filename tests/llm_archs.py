"""Tiny random-init decoder LMs of several architectures, for plumbing tests of the LLM methods.

Never used for quality claims. Every model is small enough that a whole GPTQ/AWQ run
takes well under a second, and has widths divisible by 32 so group sizes 16/32 apply.
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS = ("llama", "qwen2", "mistral", "opt")
# Every architecture ``tiny_causal_lm`` builds; ``ARCHS`` stays the quick subset older tests use.
ALL_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "bloom")


def tiny_causal_lm(arch: str = "llama", seed: int = 0, layers: int = 2, width: int = 64,
                   vocab: int = 128, positions: int = 128) -> torch.nn.Module:
    """A seeded random-init causal LM of ``arch`` (hidden ``width``, 4 heads of ``width / 4``, MLP
    ``2 * width``, vocabulary ``vocab``, ``positions`` positions) in eval mode. ``width=128`` lets the shipped recipes' group
    size 128 divide every layer's inputs.

    Every width (hidden, heads × head_dim, MLP) is a multiple of 32. Notable layouts:
    phi3 fuses q/k/v and gate/up into one Linear each; gpt2 uses transformers' ``Conv1D``
    (weight stored (in, out)); falcon's layers are ``FalconLinear`` (an nn.Linear subclass)
    with multi-query attention and a parallel MLP; gemma scales its embedding
    (``GemmaTextScaledWordEmbedding``) and ties it to lm_head; bloom uses ALiBi.
    """
    import transformers as tf

    torch.manual_seed(seed)
    head_dim, ffn = width // 4, 2 * width
    common = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=positions)
    # Special-token ids inside the tiny vocabulary (some configs default to ids of a real vocabulary).
    tokens = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=ffn, num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(intermediate_size=ffn, num_key_value_heads=2, **common))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(intermediate_size=ffn, num_key_value_heads=2, head_dim=head_dim,
                                                   **common, **tokens))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(intermediate_size=ffn, num_key_value_heads=4,
                                                       sliding_window=None, **common))
    elif arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(intermediate_size=ffn, num_key_value_heads=2, head_dim=head_dim,
                                                   **common, **tokens))
    elif arch == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(intermediate_size=ffn, num_key_value_heads=2, **common, **tokens))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4,
                                                 n_positions=positions, n_inner=ffn, **tokens))
    elif arch == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=ffn, **common, **tokens))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                               num_attention_heads=4, ffn_dim=ffn, max_position_embeddings=positions,
                                               word_embed_proj_dim=width, enable_bias=True))
    elif arch == "falcon":
        model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                                     num_attention_heads=4, ffn_hidden_size=ffn, **tokens))
    elif arch == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=vocab, hidden_size=width, n_layer=layers, n_head=4,
                                                   **tokens))
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ALL_ARCHS)}")
    return model.eval()


def linear_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every transformers ``Conv1D`` turned into the nn.Linear it computes."""
    import copy

    from transformers.pytorch_utils import Conv1D

    from slimkit.core.linear_like import as_linear

    linear = copy.deepcopy(model)
    for name, m in list(linear.named_modules()):
        if isinstance(m, Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(linear.get_submodule(parent), child, as_linear(m))
    return linear


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
