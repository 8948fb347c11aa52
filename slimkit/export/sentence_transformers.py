"""sentence-transformers in and out: compressed encoders that ``SentenceTransformer(folder)`` runs as they are.

In: ``slimkit.load(st_folder)`` loads a sentence-transformers folder's Transformer module and
records the rest of its pipeline (``core.io``, under ``defaults["sentence_transformers"]``).
Out: ``slimkit.save`` of such a model writes, beside the slimkit checkpoint, a ``modules.json``
whose Transformer module folder ``<idx>_SlimkitEncoder/`` holds a transformers config of model
type ``slimkit_encoder`` pointing back at the checkpoint, plus the Pooling / Normalize folders
as recorded. Then::

    import slimkit.export.sentence_transformers  # registers model type "slimkit_encoder"
    SentenceTransformer(folder).encode(texts)     # slimkit's compressed layers, real stored weights

Why a registered model type rather than a slimkit module class in ``modules.json``:
sentence-transformers 6 imports a module ``type`` outside the ``sentence_transformers.*``
namespace only when the caller trusts remote code (``util.misc.import_module_class``; since 6.0
even for local folders and installed packages), and trusting it would also let a folder's own
Python files run. The first module therefore stays sentence-transformers' own ``Transformer``,
which loads its model through ``AutoConfig`` / ``AutoModel``; transformers' documented way to
plug in locally installed model code is ``AutoConfig.register`` / ``AutoModel.register``, which
this module calls on import. Nothing from the folder is ever executed: ``SlimkitEncoderModel``
reads the checkpoint with ``slimkit.load`` (safetensors and JSON only). Without the import,
transformers refuses the folder ("model type `slimkit_encoder` ... does not recognize").

``encode`` computes the same embeddings in slimkit (batches formed as sentence-transformers
forms them, so dynamically quantized activations see the same batches); ``export_sentence_onnx``
writes an ONNX file whose output is the pooled (and normalized) sentence embedding.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from slimkit.core.errors import ConfigError, DataError, ModelLoadError, UnsupportedError
from slimkit.core.io import (
    META_FILE,
    ST_ENCODER_TYPE,
    ST_INFO_KEY,
    is_transformers_model,
    load,
    model_info,
    save,
    tokenizer_of,
)
from slimkit.tasks.encoder import EncoderTask
from slimkit.tasks.metrics import mean_pool

CHECKPOINT_DIR = "slimkit"  # where SlimkitEncoderModel.save_pretrained puts the slimkit checkpoint
ST_BATCH_SIZE = 32  # SentenceTransformer.encode's default batch size
# sentence-transformers' legacy Pooling flags, in its order
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


# -- the transformers model type sentence-transformers' Transformer module loads --------------
class SlimkitEncoderConfig(PretrainedConfig):
    """Config of a ``slimkit_encoder`` folder: ``checkpoint`` is the slimkit checkpoint, relative to the folder.

    Dimensions (``hidden_size``, ``max_position_embeddings``, ...) are copies of the encoder's,
    for sentence-transformers' embedding size and tokenizer length checks.
    """

    model_type = ST_ENCODER_TYPE

    def __init__(self, checkpoint: str = "..", **kwargs: Any) -> None:
        self.checkpoint = checkpoint
        super().__init__(**kwargs)


class SlimkitEncoderModel(PreTrainedModel):
    """A slimkit checkpoint of a transformers encoder, seen by transformers as one model.

    Only ``from_pretrained`` builds it (there are no weights of its own to initialise): it
    loads the checkpoint with ``slimkit.load`` and calls it with the encoder's inputs.
    ``save_pretrained`` writes the checkpoint into ``<folder>/slimkit`` and a config pointing
    there, so re-saving a loaded ``SentenceTransformer`` keeps the compressed weights.
    """

    config_class = SlimkitEncoderConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: SlimkitEncoderConfig, encoder: nn.Module | None = None) -> None:
        super().__init__(config)
        if encoder is None:
            raise ConfigError("SlimkitEncoderModel wraps a slimkit checkpoint: build it with from_pretrained(folder)")
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        config: SlimkitEncoderConfig | None = None, subfolder: str = "",
                        **kwargs: Any) -> SlimkitEncoderModel:
        """Load the slimkit checkpoint the folder's config names (always float32, from local files only)."""
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype not in (None, "auto", torch.float32):
            raise UnsupportedError(f"a slimkit checkpoint runs in float32 with its own stored layers; dtype={dtype} "
                                   "is not supported")
        folder = Path(pretrained_model_name_or_path) / subfolder
        if not folder.is_dir():
            raise ModelLoadError(f"{folder} is not a local folder; slimkit encoders load from disk only")
        if config is None:
            config = SlimkitEncoderConfig.from_pretrained(folder)
        root, checkpoint = Path(pretrained_model_name_or_path).resolve(), (folder / str(config.checkpoint)).resolve()
        if root not in (checkpoint, *checkpoint.parents) or not (checkpoint / META_FILE).exists():
            raise ModelLoadError(f"{folder / 'config.json'} names checkpoint {config.checkpoint!r}, which is not a "
                                 f"slimkit checkpoint inside {root}")
        encoder = load(checkpoint)
        if not is_transformers_model(encoder):
            raise ModelLoadError(f"{checkpoint} holds a {type(encoder).__name__}, not a transformers encoder")
        return cls(config, encoder).eval()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, output_hidden_states: bool | None = None) -> Any:
        """The encoder's output (``last_hidden_state`` first) for the inputs given."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "inputs_embeds": inputs_embeds, "output_hidden_states": output_hidden_states}
        return self.encoder(**{k: v for k, v in given.items() if v is not None}, return_dict=True)

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's token embedding."""
        return self.encoder.get_input_embeddings()

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Write the slimkit checkpoint to ``save_directory/slimkit`` and a config naming it."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save(self.encoder, folder / CHECKPOINT_DIR)
        config = copy.deepcopy(self.config)
        config.checkpoint = CHECKPOINT_DIR
        config.save_pretrained(folder)


def register() -> None:
    """Register ``slimkit_encoder`` with transformers' AutoConfig / AutoModel (done on import; idempotent)."""
    AutoConfig.register(ST_ENCODER_TYPE, SlimkitEncoderConfig, exist_ok=True)
    AutoModel.register(SlimkitEncoderConfig, SlimkitEncoderModel, exist_ok=True)


register()


# -- the pipeline, computed by slimkit -----------------------------------------------------------
def _pooling_mode(config: dict) -> Any:
    """The mode of a recorded Pooling config: ``pooling_mode``, or the legacy ``pooling_mode_*`` flags' one(s)."""
    mode = config.get("pooling_mode")
    if mode is None:
        active = [m for key, m in _LEGACY_POOLING.items() if config.get(key)]
        mode = tuple(active) if len(active) > 1 else (active[0] if active else "mean")
    return mode[0] if isinstance(mode, (list, tuple)) and len(mode) == 1 else mode


def pipeline_of(model: nn.Module) -> dict[str, Any]:
    """The sentence-transformers pipeline recorded for ``model``: max_seq_length, normalize, do_lower_case.

    Raises UnsupportedError for a pipeline slimkit does not compute itself (pooling other than
    the mean, modules other than Pooling / Normalize, a default prompt); a model with none
    recorded is a plain mean-pooling encoder (no normalisation, the tokenizer's length).
    """
    st = model_info(model).get("defaults", {}).get(ST_INFO_KEY) or {}
    normalize = False
    for entry in st.get("modules", [])[1:]:
        kind = entry["type"].rsplit(".", 1)[-1]
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            mode = _pooling_mode(st.get("files", {}).get(entry["path"], {}).get("config.json", {}))
            if mode != "mean":
                raise UnsupportedError(f"slimkit computes mean pooling only; this model pools with {mode!r} "
                                       "(SentenceTransformer(folder) still runs it)")
        else:
            raise UnsupportedError(f"slimkit computes Pooling and Normalize only; this pipeline has {entry['type']} "
                                   "(SentenceTransformer(folder) still runs it)")
    if (st.get("config_sentence_transformers") or {}).get("default_prompt_name"):
        raise UnsupportedError("this model prepends a default prompt, which slimkit's encode does not "
                               "(SentenceTransformer(folder) still does)")
    bert_config = st.get("sentence_bert_config") or {}
    return {"max_seq_length": bert_config.get("max_seq_length"), "normalize": normalize,
            "do_lower_case": bool(bert_config.get("do_lower_case", False))}


class SentenceEmbedding(nn.Module):
    """``encoder`` followed by mean pooling over non-padding tokens (and L2 normalisation when ``normalize``).

    ``forward(input_ids, attention_mask)`` returns the (batch, hidden) sentence embeddings.
    """

    def __init__(self, encoder: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.encoder, self.normalize = encoder, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = mean_pool(hidden, attention_mask)
        # F.normalize (eps 1e-12), as sentence-transformers' Normalize module
        return nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def set_attn_implementation(self, implementation: str) -> None:
        """Forwarded to the encoder (``export_onnx`` exports eager attention)."""
        self.encoder.set_attn_implementation(implementation)


def _max_length(model: nn.Module, tokenizer: Any, recorded: int | None) -> int:
    """sentence-transformers' sequence length: the recorded max_seq_length, else the tokenizer's, capped by the
    model's positions."""
    if recorded:
        return int(recorded)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(int(tokenizer.model_max_length), int(limit)) if limit else int(tokenizer.model_max_length)


@torch.no_grad()
def encode(model: nn.Module, texts: list[str], batch_size: int = ST_BATCH_SIZE) -> torch.Tensor:
    """Sentence embeddings (N, hidden) of ``texts`` as ``SentenceTransformer(saved folder).encode`` gives them.

    Texts are batched as sentence-transformers batches them (longest first, ``batch_size`` a
    batch: a dynamically quantized layer's input range depends on the batch), tokenized to the
    recorded ``max_seq_length``, mean-pooled over non-padding tokens and normalized when the
    pipeline had a Normalize module.
    """
    if isinstance(texts, str) or not texts:
        raise DataError("encode needs a non-empty list of texts")
    tokenizer = tokenizer_of(model)
    if tokenizer is None:
        raise DataError(f"{type(model).__name__} has no tokenizer attached: load it from a folder with tokenizer files")
    pipeline = pipeline_of(model)
    max_length = _max_length(model, tokenizer, pipeline["max_seq_length"])
    order = np.argsort([-len(t) for t in texts])  # sentence-transformers' own ordering (numpy's default sort)
    texts = [t.lower() for t in texts] if pipeline["do_lower_case"] else list(texts)
    head = SentenceEmbedding(model, pipeline["normalize"])
    was_training = model.training
    model.eval()
    try:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True,
                              truncation="longest_first", max_length=max_length, return_tensors="pt")
            rows.append(head(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")))
    finally:
        model.train(was_training)
    embeddings = torch.cat(rows)
    return embeddings[torch.as_tensor(np.argsort(order))]


# -- ONNX -----------------------------------------------------------------------------------
class _SentenceTask(EncoderTask):
    """Export a ``SentenceEmbedding``: token inputs (batch and sequence dynamic), one pooled output."""

    output_name = "sentence_embedding"

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder

    def example_inputs(self, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """The encoder's token example (random ids below its vocabulary, all-ones mask)."""
        return EncoderTask.example_inputs(self, self.encoder, batch, seq, seed)


def export_sentence_onnx(model: nn.Module, path: str | os.PathLike, *, example: Any = None,
                         opset: int | None = None, check: bool = False) -> Any:
    """Export ``model`` with its pooling (and normalisation, when recorded) to the ONNX file ``path``.

    Inputs ``input_ids`` and ``attention_mask`` (int64, batch and sequence dynamic), output
    ``sentence_embedding`` (batch, hidden): what ``SentenceTransformer(folder).encode`` returns.
    Quantized layers are exported as ``export_onnx`` exports them. Returns its ``OnnxExport``.
    """
    from slimkit.export.onnx import export_onnx
    from slimkit.tasks import set_task

    if not is_transformers_model(model):
        raise UnsupportedError(f"export_sentence_onnx exports a transformers encoder, got {type(model).__name__}")
    head = SentenceEmbedding(model, pipeline_of(model)["normalize"])
    set_task(head, _SentenceTask(model))
    return export_onnx(head, path, example=example, opset=opset, check=check)
