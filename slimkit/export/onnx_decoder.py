"""Causal LMs as one ONNX decoder-with-past graph, and an ONNX Runtime generation loop over it.

``export_decoder_onnx(model, path)`` writes a transformers causal LM (Llama, Qwen2/3,
Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, Falcon, Bloom: every architecture of
``tests/llm_archs.py``) in the layout optimum and ONNX Runtime GenAI use:

| name | shape | type |
|---|---|---|
| input ``input_ids`` | (batch_size, sequence_length) | int64 |
| input ``attention_mask`` | (batch_size, total_sequence_length) — past + new tokens | int64 |
| input ``position_ids`` (when the model's ``forward`` takes them) | (batch_size, sequence_length) | int64 |
| inputs ``past_key_values.{i}.key`` / ``.value`` | (batch_size, kv_heads, past_sequence_length, head_dim) | float32 |
| output ``logits`` | (batch_size, sequence_length, vocab) | float32 |
| outputs ``present.{i}.key`` / ``.value`` | (batch_size, kv_heads, total_sequence_length, head_dim) | float32 |

One graph serves the prefill (past_sequence_length 0: empty past tensors) and every decode
step. It is traced through a wrapper that takes the past as flat tensors, builds a
transformers ``DynamicCache`` from them inside ``forward`` and returns the updated cache's
tensors flat. The cache is built without the model's config, so every layer keeps its whole
past (a sliding-window model still masks what its window excludes): ``present`` is always
past + new tokens long.

Quantized layers become the same kernels as in ``slimkit.export.onnx.export_onnx``, with
one difference: per-channel 8-bit weight-only layers are written as MatMulNBits bits=8
too (not DequantizeLinear -> MatMul), at the requested ``accuracy_level``. ONNX Runtime
1.32 rewrites DequantizeLinear -> MatMul into that very node at session creation anyway, at
the level the *session* asks for (``ort_session(exact=True)``: float, 40-100x slower than the
int8-input kernel at M=1 and 20-30x slower than fp32; timings in ``slimkit.export.nbits``):
writing it puts the choice in the file, so a decoder exported at level 4 decodes fast in any session.

What a generation loop needs is recorded as JSON in ``metadata_props["slimkit.decoder"]``
(``DecoderInfo``): layers, kv heads, head_dim, vocabulary, whether ``position_ids`` is an
input, the context length (``max_position_embeddings``), eos/bos ids.

``OrtDecoder(path)`` opens such a file (or any file with this layout) and generates through
the shared loop ``slimkit.tasks.generation.decode_loop``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import ConfigError, UnsupportedError
from slimkit.export.nbits import DEFAULT_ACCURACY_LEVEL, check_accuracy_level
from slimkit.export.onnx import (
    EXPORT_OPTIONS_KEY,
    OnnxExport,
    _checked_target,
    _decoder_eligible,
    _export_copy,
    _quantized_attention,
    _run_exporter,
    _save,
    _session_config,
    check_onnx,
    example_inputs,
)
from slimkit.export.ort import PAST_PREFIX, ort_session, recorded_metadata
from slimkit.tasks.generation import GREEDY, GenerationResult, Sampling, decode_loop

DECODER_KEY = "slimkit.decoder"  # metadata_props entry holding DecoderInfo as JSON
FORMAT = "decoder-with-past"
PAST_KEY, PAST_VALUE = PAST_PREFIX + "{}.key", PAST_PREFIX + "{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
# Axis names (ONNX Runtime GenAI's builder uses the same).
BATCH, SEQ, PAST_LEN, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 4  # sizes of the traced example: none 0 or 1 (torch.export specializes those)


@dataclass(frozen=True)
class DecoderInfo:
    """What a generation loop needs to know about a decoder-with-past graph.

    ``max_positions``: the context the model was built for (``max_position_embeddings``),
    None when unknown (ALiBi models, files from elsewhere). ``eos_token_ids``: every end
    id the model's generation config names (empty when none).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    position_ids: bool
    vocab_size: int | None = None
    max_positions: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        """Plain data for the file's metadata."""
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_json(cls, data: Any) -> DecoderInfo | None:
        """The recorded info, or None when ``data`` is not a readable record."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(num_layers=int(data["num_layers"]), kv_heads=int(data["kv_heads"]),
                       head_dim=int(data["head_dim"]), position_ids=bool(data["position_ids"]),
                       vocab_size=_opt_int(data.get("vocab_size")), max_positions=_opt_int(data.get("max_positions")),
                       eos_token_ids=tuple(int(i) for i in data.get("eos_token_ids") or ()),
                       bos_token_id=_opt_int(data.get("bos_token_id")), format=str(data.get("format", FORMAT)))
        except (KeyError, TypeError, ValueError):
            return None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


# -- the traced wrapper -------------------------------------------------------------------
def _cache_argument(model: nn.Module) -> str:
    """The keyword a transformers model takes its cache by: ``cache`` (5.x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _flat_cache(cache: Any) -> list[torch.Tensor]:
    """A DynamicCache's tensors as key0, value0, key1, value1, ..."""
    flat = []
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None:
            raise UnsupportedError(f"cache layer {i} holds no keys/values (layers sharing another layer's cache "
                                   "are not supported by the decoder-with-past export)")
        flat += [layer.keys, layer.values]
    return flat


class _DecoderEntry(nn.Module):
    """A causal LM with its KV cache as flat tensors: (ids, mask, positions, [k0, v0, ...]) -> (logits, k0', v0', ...)."""

    def __init__(self, model: nn.Module, num_layers: int, position_ids: bool) -> None:
        super().__init__()
        self.model, self.num_layers, self.position_ids = model, num_layers, position_ids
        self.cache_arg = _cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                past_key_values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # No config: plain full-length layers, so present = past + new tokens for every architecture.
        cache = DynamicCache([(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)])
        extra = {"position_ids": position_ids} if self.position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_arg: cache}, **extra)
        return (out.logits, *_flat_cache(_returned_cache(out)))


def _takes_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def decoder_info(model: nn.Module) -> DecoderInfo:
    """The ``DecoderInfo`` of a transformers causal LM, its cache shapes measured on one tiny forward."""
    from transformers import DynamicCache

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                        **{_cache_argument(model): DynamicCache()})
    finally:
        model.train(was_training)
    flat = _flat_cache(_returned_cache(out))
    shapes = {tuple(t.shape[i] for i in (1, 3)) for t in flat}
    if len(shapes) != 1:
        raise UnsupportedError(f"{type(model).__name__}'s cache layers differ in shape ({sorted(shapes)}): "
                               "the decoder-with-past export needs one (kv_heads, head_dim) for every layer")
    kv_heads, head_dim = shapes.pop()
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None)
    bos = getattr(config, "bos_token_id", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    return DecoderInfo(num_layers=len(flat) // 2, kv_heads=int(kv_heads), head_dim=int(head_dim),
                       position_ids=_takes_position_ids(model), vocab_size=getattr(config, "vocab_size", None),
                       max_positions=int(max_positions) if isinstance(max_positions, int) else None,
                       eos_token_ids=eos_ids, bos_token_id=bos if isinstance(bos, int) else None)


def _trace_inputs(info: DecoderInfo, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    vocab = info.vocab_size or 2
    ids = torch.randint(0, vocab, (TRACE_BATCH, TRACE_SEQ), generator=g)
    past = [torch.randn(TRACE_BATCH, info.kv_heads, TRACE_PAST, info.head_dim, generator=g) * 0.1
            for _ in range(2 * info.num_layers)]
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQ).expand(TRACE_BATCH, TRACE_SEQ).contiguous()
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQ,
                                                                      dtype=torch.long, device=device),
            "position_ids": positions.to(device) if info.position_ids else None,
            "past_key_values": [t.to(device) for t in past]}


def _io_names(info: DecoderInfo) -> tuple[list[str], list[str]]:
    past = [name.format(i) for i in range(info.num_layers) for name in (PAST_KEY, PAST_VALUE)]
    present = [name.format(i) for i in range(info.num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if info.position_ids else []) + past
    return inputs, ["logits"] + present


def _name_axes(program: Any, info: DecoderInfo) -> None:
    """Give the graph's inputs and outputs the layout's axis names (the exporter's own are s0, s1, ...)."""
    from onnxscript import ir

    def shape(*dims: Any) -> Any:
        return ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])

    kv = (info.kv_heads, info.head_dim)
    graph = program.model.graph
    for value in graph.inputs:
        if value.name in ("input_ids", "position_ids"):
            value.shape = shape(BATCH, SEQ)
        elif value.name == "attention_mask":
            value.shape = shape(BATCH, TOTAL)
        elif value.name.startswith(PAST_PREFIX):
            value.shape = shape(BATCH, kv[0], PAST_LEN, kv[1])
    for value in graph.outputs:
        if value.name == "logits" and value.shape is not None and len(value.shape) == 3:
            value.shape = shape(BATCH, SEQ, value.shape[2])
        elif value.name.startswith("present."):
            value.shape = shape(BATCH, kv[0], TOTAL, kv[1])


# -- export -------------------------------------------------------------------------------
def export_decoder_onnx(model: nn.Module, path: str | os.PathLike, *,
                        accuracy_level: int = DEFAULT_ACCURACY_LEVEL, opset: int | None = None,
                        check: bool = False, example: Any = None) -> OnnxExport:
    """Export a transformers causal LM as one decoder-with-past ONNX graph (atomically); returns an ``OnnxExport``.

    The layout is in the module docstring. ``accuracy_level``: that of every MatMulNBits
    node (weight-only 2/4/8-bit layers; 4: int8 inputs, the fast CPU decode path; 0/1:
    float32). ``opset``: as ``export_onnx``. ``check=True`` runs ``check_onnx`` (a prefill
    from an empty cache, and a prefill followed by a two-token step with the cache) on
    ``example`` (input ids, or a dict with ``input_ids``/``attention_mask``; None: random
    ids, batch 3, 11 tokens) and fills ``max_abs_diff``. The user's model is not modified.
    """
    check_accuracy_level(accuracy_level)
    if not _decoder_eligible(model):
        raise UnsupportedError(f"the decoder-with-past export takes a transformers causal LM; {type(model).__name__} "
                               "is not one (export_onnx writes other models)")
    path, opset = _checked_target(model, path, opset)
    info = decoder_info(model)
    was_training = model.training
    export_model, notes, table = _export_copy(model, opset, accuracy_level=accuracy_level, int8_per_channel=True)
    entry = _DecoderEntry(export_model, info.num_layers, info.position_ids).eval()
    inputs = _trace_inputs(info, next(model.parameters()).device)
    batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQ)
    # The mask's length is past + seq; the exporter takes it as its own axis (Dim arithmetic on two Dims is refused).
    past, total = torch.export.Dim(PAST_LEN), torch.export.Dim(TOTAL)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq} if info.position_ids else None,
               "past_key_values": [{0: batch, 2: past} for _ in inputs["past_key_values"]]}
    input_names, output_names = _io_names(info)
    program = _run_exporter(model, entry, was_training, args=(), kwargs=inputs, input_names=input_names,
                            output_names=output_names, dynamic_shapes=dynamic, opset=opset, table=table)
    _name_axes(program, info)
    attention = " (slimkit int8 attention)" if _quantized_attention(model) else ""
    notes.append(f"decoder-with-past graph{attention}: {info.num_layers} layers, {info.kv_heads} kv heads of "
                 f"{info.head_dim}; inputs input_ids, attention_mask (past + new tokens)"
                 f"{', position_ids' if info.position_ids else ''}, past_key_values.N.key/value; "
                 "outputs logits, present.N.key/value")
    if accuracy_level < 2 and any("MatMulNBits bits=8" in n for n in notes):
        notes.append(f"accuracy_level {accuracy_level}: ONNX Runtime 1.32 has no fast float kernel for 8-bit "
                     "MatMulNBits on CPU (measured 20-50x slower than fp32 MatMul at one token); accuracy_level 4 "
                     "runs them 2-4x faster than fp32")
    options = {"int8_per_channel_nbits": True, "accuracy_level": accuracy_level}
    files = _save(program, path, notes, _session_config(model, notes),
                  {DECODER_KEY: info.to_json(), EXPORT_OPTIONS_KEY: options})
    result = OnnxExport(path=path, notes=tuple(notes), files=files)
    if check:
        feed = example_inputs(model, example, **({"batch": 3, "seq": 11, "seed": 1} if example is None else {}))
        result = replace(result, max_abs_diff=check_onnx(model, path, feed))
    return result


# -- running ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderState:
    """An ``OrtDecoder``'s cache between steps: the present tensors (key0, value0, ...) and their length."""

    past: tuple[np.ndarray, ...]
    length: int


class OrtDecoder:
    """Greedy or sampled generation from a decoder-with-past ONNX file in ONNX Runtime (CPU).

    ``path``: a file ``export_decoder_onnx`` (or ``slimkit export onnx`` of a causal LM)
    wrote, or any file with that layout (optimum's, for one: then the shapes are read from
    the graph and the context length is unknown). A file without past inputs and present
    outputs is refused with a ``ConfigError``. ``threads``: ORT intra-op threads.
    ``exact``: as ``ort_session`` (it only concerns DequantizeLinear -> MatMul patterns ORT
    rewrites; MatMulNBits nodes keep the accuracy level written in the file).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2, *, exact: bool = True) -> None:
        self.path = Path(path)
        self.threads = int(threads)
        self.session = ort_session(self.path, threads=self.threads, exact=exact)
        self.info = self._read_info()
        self._output_names = [o.name for o in self.session.get_outputs()]

    def _read_info(self) -> DecoderInfo:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        layers = 0
        while PAST_KEY.format(layers) in inputs:
            layers += 1
        expected_in = [name.format(i) for i in range(layers) for name in (PAST_KEY, PAST_VALUE)]
        expected_out = ["logits"] + [name.format(i) for i in range(layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
        missing = [n for n in ["input_ids", "attention_mask"] + expected_in if n not in inputs]
        missing += [n for n in expected_out if n not in outputs]
        if layers == 0 or missing:
            what = "no past_key_values.N.key/value inputs" if layers == 0 else f"no {', '.join(missing[:4])}"
            raise ConfigError(f"{self.path} is not a KV-cache ONNX graph ({what}): export it with the KV-cache graph "
                              "(slimkit.export.onnx_decoder.export_decoder_onnx, or `slimkit export onnx` of the "
                              "causal LM)")
        recorded = DecoderInfo.from_json(recorded_metadata(self.path, DECODER_KEY))
        if recorded is not None and recorded.num_layers == layers:
            return recorded
        shape = inputs[PAST_KEY.format(0)].shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise ConfigError(f"{self.path}: past_key_values.0.key has shape {shape}; a KV-cache graph's past is "
                              "(batch, kv_heads, past_len, head_dim) with fixed kv_heads and head_dim")
        return DecoderInfo(num_layers=layers, kv_heads=shape[1], head_dim=shape[3],
                           position_ids="position_ids" in inputs)

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id recorded at export (None when none was), for ``generate``."""
        return self.info.eos_token_ids[0] if self.info.eos_token_ids else None

    def empty_state(self, batch: int = 1) -> DecoderState:
        """An empty cache (past length 0) for ``batch`` rows."""
        shape = (batch, self.info.kv_heads, 0, self.info.head_dim)
        return DecoderState(tuple(np.zeros(shape, dtype=np.float32) for _ in range(2 * self.info.num_layers)), 0)

    def step(self, new_ids: torch.Tensor, state: DecoderState | None) -> tuple[torch.Tensor, DecoderState]:
        """Logits (batch, n, vocab) of ``new_ids`` (batch, n) after the cached tokens, and the grown cache.

        ``state`` None: an empty cache. Matches ``slimkit.tasks.generation.StepFn``. Every row
        is taken as unpadded (an all-ones attention mask, positions counted from the cache's length).
        """
        ids = np.asarray(new_ids.detach().cpu() if isinstance(new_ids, torch.Tensor) else new_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ConfigError(f"step takes new token ids of shape (batch, n) with n >= 1, got {tuple(ids.shape)}")
        batch, n = ids.shape
        state = self.empty_state(batch) if state is None else state
        total = state.length + n
        limit = self.info.max_positions
        if limit is not None and total > limit:
            raise ConfigError(f"{total} tokens exceed the model's context of {limit} positions "
                              f"(max_position_embeddings recorded in {self.path})")
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, total), dtype=np.int64)}
        if self.info.position_ids:
            feed["position_ids"] = np.broadcast_to(np.arange(state.length, total, dtype=np.int64), (batch, n)).copy()
        for i in range(self.info.num_layers):
            feed[PAST_KEY.format(i)] = state.past[2 * i]
            feed[PAST_VALUE.format(i)] = state.past[2 * i + 1]
        outputs = self.session.run(self._output_names, feed)
        return torch.from_numpy(outputs[0]), DecoderState(tuple(outputs[1:]), total)

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling = GREEDY,
                 eos_token_id: int | None = None) -> GenerationResult:
        """Up to ``max_new_tokens`` tokens after ``prompt_ids`` ((1, n) or (n,) int64), through ``decode_loop``.

        ``eos_token_id``: stop after generating it; None: the id recorded at export
        (``self.eos_token_id``; none recorded: never stop early). A ``sampling`` whose
        ``stop_at_eos`` is False never stops early. A prompt longer than the recorded context
        raises ``ConfigError`` naming both lengths; one that leaves fewer than
        ``max_new_tokens`` positions generates what fits and says so in ``notes`` (as
        ``slimkit.evaluation.generation.generate`` does in PyTorch).
        """
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        limit = self.info.max_positions
        n = int(prompt.shape[-1])
        if limit is not None and n > limit:
            raise ConfigError(f"the prompt has {n} tokens, more than the model's context of {limit} positions "
                              f"(max_position_embeddings recorded in {self.path}): shorten the prompt")
        notes = []
        if limit is not None and isinstance(max_new_tokens, int) and n + max_new_tokens > limit:
            if n >= limit:
                raise ConfigError(f"the prompt has {n} tokens and fills the model's context of {limit} positions: "
                                  "no room for a new token; shorten the prompt")
            notes.append(f"generated at most {limit - n} tokens, not {max_new_tokens}: the {n}-token prompt leaves "
                         f"only that many of the model's {limit} positions")
            max_new_tokens = limit - n
        if eos_token_id is None:
            eos_token_id = self.eos_token_id
        if not getattr(sampling, "stop_at_eos", True):
            eos_token_id = None
        result = decode_loop(self.step, prompt, max_new_tokens, sampling=sampling, eos_token_id=eos_token_id,
                             runtime="onnxruntime", threads=self.threads)
        result.notes.extend(notes)
        return result


__all__ = ["DECODER_KEY", "DecoderInfo", "DecoderState", "OrtDecoder", "decoder_info", "export_decoder_onnx"]
