"""Text generation with a KV cache, shared by every runtime (PyTorch eager, ONNX Runtime).

A runtime supplies one *step function*: given the new token ids (batch 1, ``n`` tokens)
and its opaque cache state, it returns the logits of those positions and the new state.
``decode_loop`` calls it once on the whole prompt (prefill) and once per generated token
(decode), picks each next token (greedy or sampled, ``next_token``) and times both phases
apart, so tokens/s is measured the same way for every runtime:

- prefill seconds: the one step over the prompt, up to the first new token's logits;
- decode seconds: every later step (``new_tokens − 1`` of them), each over one token.

Nothing here knows a model class: PyTorch's step lives in ``slimkit.evaluation.generation``,
ONNX Runtime's in ``slimkit.export.onnx_decoder``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slimkit.core.errors import ConfigError

# step(new_ids (1, n) int64, state) -> (logits (1, n, vocab) float tensor, new state)
StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature == 0``, else sampled.

    ``top_k`` keeps the k most likely tokens (0: all), ``top_p`` the smallest set whose
    probability reaches p (1.0: all); ``seed`` makes sampling repeatable; ``stop_at_eos=False``
    always produces the number of tokens asked for (benchmarks).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0


GREEDY = Sampling()


def cache_keyword(model: Any) -> str:
    """The forward keyword that takes a transformers KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a transformers forward returned (``cache`` in newer releases, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """The next token id from one position's ``logits`` (vocab,): argmax, or a draw after temperature/top-k/top-p."""
    logits = logits.float()
    if sampling.greedy:
        return int(torch.argmax(logits))
    scores = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        order = torch.argsort(scores, descending=True)
        probs = torch.softmax(scores[order], dim=-1)
        # Drop a token once the tokens before it already reach top_p (the first one always stays).
        drop = torch.cumsum(probs, dim=-1) - probs >= sampling.top_p
        scores[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


@dataclass
class GenerationResult:
    """The tokens a run produced and how fast, measured (seconds of wall time, one process)."""

    prompt_ids: torch.Tensor  # (1, prompt_tokens) int64
    new_ids: torch.Tensor  # (1, new_tokens) int64
    prefill_s: float
    decode_s: float
    runtime: str  # e.g. "pytorch eager", "onnxruntime"
    threads: int
    text: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return int(self.prompt_ids.shape[-1])

    @property
    def new_tokens(self) -> int:
        """Number of generated tokens."""
        return int(self.new_ids.shape[-1])

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens processed per second in the prefill step."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second after the first (each a one-token step with the cache)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "runtime": self.runtime, "threads": self.threads, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
            "new_ids": self.new_ids[0].tolist(), "text": self.text, "notes": list(self.notes),
        }


def decode_loop(step: StepFn, prompt_ids: torch.Tensor, max_new_tokens: int, *, state: Any = None,
                sampling: Sampling = GREEDY, eos_token_id: int | None = None, runtime: str = "",
                threads: int | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (1, n) with ``step``; stops early at ``eos_token_id``.

    Prefill and decode are timed apart (``time.perf_counter``); ``state`` is the step's
    initial cache (None: the step makes its own).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] == 0:
        raise ConfigError(f"generation takes one non-empty prompt of shape (1, n), got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
    new: list[int] = []
    start = time.perf_counter()
    logits, state = step(prompt_ids, state)
    new.append(next_token(logits[0, -1], sampling, generator))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] != eos_token_id:
        logits, state = step(torch.tensor([[new[-1]]], dtype=torch.long), state)
        new.append(next_token(logits[0, -1], sampling, generator))
    decode_s = time.perf_counter() - start
    return GenerationResult(prompt_ids=prompt_ids, new_ids=torch.tensor([new], dtype=torch.long),
                            prefill_s=prefill_s, decode_s=decode_s, runtime=runtime,
                            threads=threads if threads is not None else torch.get_num_threads())
