"""Generate text with a PyTorch causal LM and a KV cache, and measure generation speed and memory.

``generate`` is the verb behind ``sk.generate`` and ``slimkit generate``: the prompt goes
through the model once (prefill), then one token per step reads the cache (decode), via the
shared loop of ``slimkit.tasks.generation``. It takes the same path as transformers'
``generate`` (``model(ids, past_key_values=cache, use_cache=True)``), so greedy tokens are
the same; timing each phase apart is why the loop is ours.

``measure_generation`` is what an LM report prints: prefill latency at batch 1 × 256, decode
tokens/s with a KV cache (batch 1, 128 new tokens after a 128-token prompt, median of runs)
and the memory the generation needs (the model's tensors plus the peak RSS growth while
generating: cache, activations and any dequantized temporaries).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.io import tokenizer_of
from slimkit.core.machine import cpu_isa
from slimkit.quantization.kernels import decode_timings, kernel_summary, prepare_kernels
from slimkit.tasks import task_of
from slimkit.tasks.generation import GREEDY, GenerationResult, Sampling, cache_keyword, decode_loop, returned_cache

PROMPT_TOKENS = 128  # the protocol of BENCHMARKS.md: 128 new tokens after a 128-token prompt
NEW_TOKENS = 128
PREFILL_SHAPE = (1, 256)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (``max_position_embeddings`` or ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _require_causal_lm(model: nn.Module) -> None:
    task = task_of(model)
    if not task.generates:
        raise ConfigError(f"generate needs a causal language model; {type(model).__name__} is a {task.kind!r} "
                          "model (give a ...ForCausalLM checkpoint)")


def prompt_ids(model: nn.Module, prompt: str | torch.Tensor | list[int]) -> torch.Tensor:
    """The prompt as (1, n) int64 token ids: a string is tokenized with the model's tokenizer."""
    if isinstance(prompt, str):
        tokenizer = tokenizer_of(model)
        if tokenizer is None:
            raise DataError(f"{type(model).__name__} has no tokenizer attached: load it from a folder with tokenizer "
                            "files, or give the prompt as token ids")
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise DataError(f"the prompt must be one non-empty sequence, got token ids of shape {tuple(ids.shape)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise DataError(f"prompt token ids must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")
    return ids


def _eos_id(model: nn.Module) -> int | None:
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None


def torch_step(model: nn.Module):
    """A ``StepFn`` running ``model`` with a transformers cache (the state; None makes a DynamicCache)."""
    from transformers import DynamicCache

    keyword = cache_keyword(model)

    def step(ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        if cache is None:
            cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{keyword: cache})
        return out.logits, returned_cache(out)

    return step


@torch.inference_mode()
def generate(model: nn.Module, prompt: str | torch.Tensor | list[int], *, max_new_tokens: int = 64,
             sampling: Sampling = GREEDY, kv_cache: str | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` with a KV cache; text, tokens and speed in the result.

    ``sampling``: greedy by default (``Sampling(temperature=0.8, top_p=0.95, seed=1)`` to
    sample; ``stop_at_eos=False`` to always produce ``max_new_tokens``). ``kv_cache``: None
    (float cache), "int8" or "int4" (``slimkit.quantization.kv_cache``). A prompt longer
    than the model's context is refused naming both lengths; a prompt that fits but leaves
    fewer than ``max_new_tokens`` positions generates what fits and says so in ``notes``.
    """
    _require_causal_lm(model)
    ids = prompt_ids(model, prompt)
    notes: list[str] = []
    context = context_length(model)
    if context is not None and ids.shape[1] > context:
        raise ConfigError(f"the prompt has {ids.shape[1]} tokens but the model's context is {context} tokens: "
                          "shorten the prompt")
    if context is not None and ids.shape[1] + max_new_tokens > context:
        notes.append(f"generated {context - ids.shape[1]} tokens, not {max_new_tokens}: the {ids.shape[1]}-token "
                     f"prompt leaves only that many of the model's {context} positions")
        max_new_tokens = context - ids.shape[1]
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model.eval()
    cache = None
    if kv_cache is not None:
        from slimkit.quantization.kv_cache import make_kv_cache

        cache = make_kv_cache(kv_cache, model)
    result = decode_loop(torch_step(model), ids, max_new_tokens, state=cache, sampling=sampling,
                         eos_token_id=_eos_id(model) if sampling.stop_at_eos else None,
                         runtime="pytorch eager" + (f", {kv_cache} KV cache" if cache is not None else ""))
    result.notes.extend(notes)
    tokenizer = tokenizer_of(model)
    if tokenizer is not None:
        result.text = tokenizer.decode(result.new_ids[0].tolist())
    return result


# --- measuring ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationStats:
    """What an LM report prints about generation, all measured in this process."""

    prefill_ms: float  # median latency of one batch-1 × 256 prefill
    decode_tokens_per_s: float  # median over runs, batch 1, KV cache
    prompt_tokens: int
    new_tokens: int
    memory_mb: float | None  # model tensors + peak RSS growth while generating (None where RSS can't be read)
    threads: int
    isa: str
    kernels: list[str] = dataclasses.field(default_factory=list)  # "N layers: path" lines
    layer_timings: list[str] = dataclasses.field(default_factory=list)  # per shape: decode path vs fp32, measured
    prefill_timings: list[str] = dataclasses.field(default_factory=list)  # the same at the probe's prefill rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationStats:
        """Rebuild from ``to_dict`` output."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise DataError(f"GenerationStats: unknown keys {sorted(unknown)}")
        return cls(**data)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS growth counts only new memory."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, plus any tensors its kernels prepared (e.g. repacked int4)."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        bound = m.__dict__.get("_kernel_bound")
        if bound is not None:
            tensors.extend(t for k in (bound.decode, bound.prefill) if k is not None for t in vars(k).values()
                           if isinstance(t, torch.Tensor))
    for t in tensors:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


@torch.inference_mode()
def measure_generation(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int = NEW_TOKENS,
                       runs: int = 3) -> GenerationStats:
    """Prefill latency (1 × 256), decode tokens/s (``new_tokens`` after ``prompt``, median of ``runs``) and memory.

    ``prompt``: (1, n) token ids (the task's held-out text, so the tokens are realistic).
    Kernels are chosen before timing (``prepare_kernels``) so no probe lands in a timed run.
    """
    _require_causal_lm(model)
    model.eval()
    plans = prepare_kernels(model)
    vocab = int(getattr(model.config, "vocab_size", 2))
    context = context_length(model) or PREFILL_SHAPE[1]
    prefill_ids = torch.randint(0, vocab, (1, min(PREFILL_SHAPE[1], context)), generator=torch.Generator().manual_seed(0))
    new_tokens = max(2, min(new_tokens, context - prompt.shape[1]))
    sampling = Sampling(stop_at_eos=False)
    step = torch_step(model)
    prefill_times = []
    for i in range(4):
        start = time.perf_counter()
        step(prefill_ids, None)
        if i:  # the first is a warm-up
            prefill_times.append(time.perf_counter() - start)
    decode_loop(step, prompt, min(8, new_tokens), sampling=sampling)  # warm-up
    # Memory: one generation after the heap's free pages went back to the OS, so the peak RSS
    # growth is what generating needs on top of the model's tensors (cache, activations, temporaries).
    gc.collect()
    _release_free_heap()
    base_kb = _status_kb("VmRSS")
    can_peak = _reset_peak_rss() and base_kb is not None
    rates = [decode_loop(step, prompt, new_tokens, sampling=sampling).decode_tokens_per_s]
    memory = None
    if can_peak:
        peak_kb = _status_kb("VmHWM") or base_kb
        memory = (tensor_bytes(model) + max(0, peak_kb - base_kb) * 1024) / 1e6
    for _ in range(runs - 1):
        rates.append(decode_loop(step, prompt, new_tokens, sampling=sampling).decode_tokens_per_s)
    kernels = [f"{n} layer{'s' if n > 1 else ''}: {label}" for label, n in kernel_summary(plans)]
    return GenerationStats(prefill_ms=statistics.median(prefill_times) * 1e3,
                           decode_tokens_per_s=statistics.median(rates), prompt_tokens=int(prompt.shape[1]),
                           new_tokens=new_tokens, memory_mb=memory, threads=torch.get_num_threads(), isa=cpu_isa(),
                           kernels=kernels, layer_timings=decode_timings(plans),
                           prefill_timings=decode_timings(plans, "prefill"))
