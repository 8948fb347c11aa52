"""Static 8-bit inputs for the two matmuls inside attention: scores = Q·Kᵀ and context = P·V.

Linear layers are not the only matmuls of a transformer: each attention block multiplies two
*activations* twice. ``StaticQuant(attention=True)`` gives the four operands (query, key,
softmax probabilities, value) one frozen uint8 scale/zero point each, found by the same
observer as the Linear inputs, so that ONNX Runtime can run both products as int8 GEMMs.

How it reaches inside a transformers model without copying its modelling code: transformers
dispatches attention through ``AttentionInterface`` by ``config._attn_implementation``. This
module registers one more implementation, ``"slimkit_int8"`` (eager attention, the same maths
as transformers' ``eager_attention_forward``: repeat_kv for grouped-query attention, scaled
scores, additive mask, float32 softmax, dropout, context), that passes each operand through
the ``QuantAttentionInputs`` child the attention module carries. Models whose eager
attention does more than that (soft-capping, sinks, ALiBi...) are not in ``SUPPORTED_MODEL_TYPES``
and keep float attention (noted).

A checkpoint records each ``QuantAttentionInputs`` like any other slimkit module;
``slimkit.load`` attaches them again and switches the model to ``"slimkit_int8"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.modules import SlimkitModule, register_module_type
from slimkit.quantization.primitives import fake_quantize

IMPLEMENTATION = "slimkit_int8"
CHILD = "slimkit_matmul_inputs"  # the attribute name of the quantizer on each attention module
ROLES = ("query", "key", "probs", "value")  # operands of Q·Kᵀ, then of P·V
QUERY, KEY, PROBS, VALUE = range(4)
# transformers model types whose eager attention is exactly the standard one reproduced here.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "llama", "mistral", "qwen2")
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "alibi")


@register_module_type
class QuantAttentionInputs(SlimkitModule):
    """Per-tensor static uint8 grids for the query, key, probabilities and value of one attention block.

    ``forward(x, role)`` returns ``x`` fake-quantized on the grid of ``ROLES[role]``. While
    ``observers`` is set (calibration) it feeds ``x`` to ``observers[role]`` and returns it
    unchanged; with ``enabled`` False it is the identity (the fallback's float attention).
    """

    attached = True  # a new child of an existing module, not a replacement of one

    def __init__(self, bits: int = 8, enabled: bool = True) -> None:
        super().__init__()
        if bits != 8:
            raise ValueError(f"attention inputs are quantized to 8 bits, got {bits}")
        self.bits, self.enabled = bits, bool(enabled)
        self.register_buffer("scale", torch.ones(len(ROLES)))
        self.register_buffer("zero", torch.zeros(len(ROLES), dtype=torch.int32))
        self.observers: list[Any] | None = None

    def slimkit_spec(self) -> dict[str, Any]:
        """Constructor arguments for a checkpoint."""
        return {"bits": self.bits, "enabled": self.enabled}

    @classmethod
    def from_slimkit_spec(cls, spec: dict[str, Any]) -> QuantAttentionInputs:
        """An empty module for ``load_state_dict``."""
        return cls(bits=int(spec.get("bits", 8)), enabled=bool(spec.get("enabled", True)))

    @classmethod
    def after_load(cls, model: nn.Module) -> None:
        """Switch a reloaded model to the attention implementation that calls these modules."""
        use_quantized_attention(model)

    def freeze(self) -> list[str]:
        """Take each role's scale/zero from its observer, end calibration; returns the roles never observed."""
        unseen = []
        for i, obs in enumerate(self.observers or []):
            if obs.batches == 0:
                unseen.append(ROLES[i])
                continue
            scale, zero = obs.qparams()
            self.scale[i] = scale.reshape(())
            self.zero[i] = zero.reshape(()).to(torch.int32)
        self.observers = None
        return unseen

    def disabled_copy(self) -> QuantAttentionInputs:
        """The same grids, switched off (what the accuracy fallback swaps in)."""
        twin = QuantAttentionInputs(self.bits, enabled=False)
        twin.load_state_dict(self.state_dict())
        return twin

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"

    def forward(self, x: torch.Tensor, role: int) -> torch.Tensor:
        if self.observers is not None:
            self.observers[role].update(x.detach())
            return x
        if not self.enabled:
            return x
        return fake_quantize(x, self.scale[role], self.zero[role], self.bits, symmetric=False)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads·groups, seq, dim): each kv head serves its query group."""
    if groups == 1:
        return x
    b, heads, seq, dim = x.shape
    return x[:, :, None].expand(b, heads, groups, seq, dim).reshape(b, heads * groups, seq, dim)


def quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose two matmuls take fake-quantized operands (transformers' attention signature).

    Shapes: query (b, heads, q_len, d); key/value (b, kv_heads, k_len, d); returns the
    context (b, q_len, heads, d) and the probabilities (b, heads, q_len, k_len).
    """
    bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if bad:
        raise NotImplementedError(f"slimkit's int8 attention does not implement {bad[0]!r}")
    quant = getattr(module, CHILD, None)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if quant is not None:
        query, key = quant(query, QUERY), quant(key, KEY)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (b, heads, q_len, k_len)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if quant is not None:
        probs, value = quant(probs, PROBS), quant(value, VALUE)
    context = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (b, q_len, heads, d)
    return context, probs


def register_implementation() -> None:
    """Make ``"slimkit_int8"`` a transformers attention implementation (with eager-style masks); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, quantized_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention blocks of a transformers model that dispatch through AttentionInterface."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "scaling") and hasattr(m, "config")]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s attention cannot take quantized inputs, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return f"{type(model).__name__} is not a transformers model (attention is reached through its AttentionInterface)"
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose eager attention slimkit reproduces "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    if not attention_modules(model):
        return "no attention module with a `scaling` attribute was found"
    return None


def use_quantized_attention(model: nn.Module) -> None:
    """Dispatch ``model``'s attention to ``quantized_attention`` (after registering it)."""
    register_implementation()
    model.set_attn_implementation(IMPLEMENTATION)
