"""`slimkit export gguf` (``slimkit.export.gguf``): GGUF files llama.cpp loads and runs like transformers.

The file is read back with the ``gguf`` package's reader and checked against the model
independently of the writer: tensor names and shapes from a table written here, metadata
from the config, weights mapped back to transformers' names (Llama's q/k rows un-permuted by
another formula than the writer's, Gemma's norms minus one) and compared. Where
llama-cpp-python is installed (CI does not build it), llama.cpp loads each file and its
logits and tokenization are compared with transformers'.

Tokenizers are trained here on a few stdlib modules (no download): SentencePiece-style
(BPE with byte fallback, Metaspace) and byte-level BPE with the Llama-3 and Qwen2 split
regexes.
"""

from __future__ import annotations

import collections
import copy
import difflib
import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from slimkit.core.errors import ConfigError
from slimkit.core.io import attach_info
from slimkit.export.gguf import _LLAMA3_REGEX, _QWEN2_REGEX, export_gguf
from slimkit.export.gguf_blocks import GGUF_TYPES
from tests.llm_archs import tiny_causal_lm
from tests.test_cli import slimkit_cli

ARCH_LIST = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                  "phi3": "phi3"}
QUANT_TYPES = tuple(t for t in GGUF_TYPES if t not in ("f32", "f16"))
CORPUS = [inspect.getsource(m) for m in (collections, difflib, textwrap)]
TEXT = ("The quick brown fox can't jump 12345 times!\n  héllo wörld 🚀 déjà vu, naïve café 3.14159\n"
        "\tdef f(x): return x**2  # ok\n\n\n    I'VE been 'told he's there")


# -- helpers -------------------------------------------------------------------------------
def llama_cpp():
    try:
        import llama_cpp as module
    except ImportError:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed: CI does not build it")
    return module


def run_llama_cpp(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (f32 KV cache, so f32 files compare tightly)."""
    lc = llama_cpp()
    llm = lc.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    lc = llama_cpp()
    llm = lc.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)  # add_bos: the file's own add-special flags
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def spm_vocab_file() -> Path:
    from benchmarks.peers_generate import llama_cpp_dir

    folder = llama_cpp_dir()
    path = None if folder is None else folder / "models" / "ggml-vocab-llama-spm.gguf"
    if path is None or not path.is_file():
        pytest.skip("llama.cpp's models/ggml-vocab-llama-spm.gguf is not on this machine")
    return path


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: (f.contents() if f.types else None) for k, f in reader.fields.items()}


def raw_kv(path: Path) -> dict:
    """The metadata of a GGUF v3 file parsed with ``struct`` (strings as bytes): a second reader, and one fast enough
    for 32000-token vocabularies (``GGUFReader`` builds a numpy view per string)."""
    import struct

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    buf = path.read_bytes()
    magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    assert magic == b"GGUF" and version == 3
    pos = 24

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n:pos]
        if vtype == 9:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub in scalar and sub != 7:
                fmt = f"<{n}{scalar[sub]}"
                items = list(struct.unpack_from(fmt, buf, pos))
                pos += struct.calcsize(fmt)
                return items
            return [value(sub) for _ in range(n)]
        fmt = "<" + scalar[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    out = {}
    for _ in range(n_kv):
        key = value(8).decode()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        out[key] = (vtype, value(vtype))
    return out


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def dequantized(t) -> torch.Tensor:
    """A tensor read back as float32 in transformers' (rows, cols) order."""
    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(list(reversed([int(n) for n in t.shape])))


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved RoPE rows (2i, 2i+1) back to transformers' halves (i, i + d/2), per head."""
    heads = w.reshape(n_head, w.shape[0] // n_head, -1)
    return torch.cat([heads[:, 0::2], heads[:, 1::2]], dim=1).reshape(w.shape)


def back_to_hf(path: Path, model) -> dict[str, torch.Tensor]:
    """The file's weights under transformers' names, with the writer's layout changes undone."""
    cfg = model.config
    arch = fields(path)["general.architecture"]
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(key, cfg.num_hidden_layers)
    hf_names = set(model.state_dict()) | {f"{n}.weight" for n, m in model.named_modules() if hasattr(m, "dense_weight")}
    hf_of = {names.get_name(n, try_suffixes=(".weight", ".bias")): n for n in hf_names}
    out = {}
    for name, t in tensors(path).items():
        hf = hf_of[name]
        w = dequantized(t)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads
            w = unpermute(w, heads)
        if cfg.model_type == "gemma" and hf.endswith("norm.weight"):
            w = w - 1.0
        out[hf] = w
    return out


def expected_tensors(arch: str, cfg) -> dict[str, tuple[int, ...]]:
    """GGUF name -> GGUF shape (ne0 = columns first) of every tensor llama.cpp's graph for ``arch`` reads."""
    E, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or E // H
    shapes = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (E, V)
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (E,), b + "ffn_norm.weight": (E,), b + "attn_output.weight": (H * D, E),
                   b + "ffn_down.weight": (F, E)}
        if arch == "phi3":
            shapes |= {b + "attn_qkv.weight": (E, (H + 2 * KV) * D), b + "ffn_up.weight": (E, 2 * F)}
        else:
            shapes |= {b + "attn_q.weight": (E, H * D), b + "attn_k.weight": (E, KV * D),
                       b + "attn_v.weight": (E, KV * D), b + "ffn_gate.weight": (E, F), b + "ffn_up.weight": (E, F)}
        if arch == "qwen2":
            shapes |= {b + "attn_q.bias": (H * D,), b + "attn_k.bias": (KV * D,), b + "attn_v.bias": (KV * D,)}
        if arch == "qwen3":
            shapes |= {b + "attn_q_norm.weight": (D,), b + "attn_k_norm.weight": (D,)}
    return shapes


# -- tokenizers trained here ---------------------------------------------------------------
def spm_tokenizer():
    """A SentencePiece-style tokenizer.json (Llama-2 layout): <unk> <s> </s>, 256 byte tokens, learned BPE pieces."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, show_progress=False, limit_alphabet=120))
    spec = json.loads(trainer.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for text, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def split_bpe_tokenizer(regex: str):
    """A byte-level BPE tokenizer pre-split by ``regex`` (Llama-3 / Qwen2 layout), <|endoftext|> special."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def toks():
    return {"spm": spm_tokenizer(), "llama-bpe": split_bpe_tokenizer(_LLAMA3_REGEX),
            "qwen2": split_bpe_tokenizer(_QWEN2_REGEX)}


def tiny(arch: str, tok, **kw):
    model = tiny_causal_lm(arch, vocab=len(tok), **kw)
    return attach_info(model, tokenizer=tok)


# -- layout and metadata -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCH_LIST)
def test_tensors_metadata_and_weights_round_trip(arch, toks, tmp_path):
    model = tiny(arch, toks["llama-bpe"])
    cfg = model.config
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype="f32")
    assert result.path == out and out.is_file() and not Path(f"{out}.part").exists()
    assert result.size_bytes == out.stat().st_size and result.arch == LLAMA_CPP_ARCH[arch]

    found = tensors(out)
    assert {n: tuple(int(x) for x in t.shape) for n, t in found.items()} == expected_tensors(arch, cfg)
    assert {t.tensor_type for t in found.values()} == {gguf.GGMLQuantizationType.F32}
    assert result.tensor_types == {"f32": len(found)}

    f = fields(out)
    a = LLAMA_CPP_ARCH[arch]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert f["general.architecture"] == a
    assert f[f"{a}.context_length"] == cfg.max_position_embeddings
    assert f[f"{a}.embedding_length"] == cfg.hidden_size
    assert f[f"{a}.block_count"] == cfg.num_hidden_layers
    assert f[f"{a}.feed_forward_length"] == cfg.intermediate_size
    assert f[f"{a}.attention.head_count"] == cfg.num_attention_heads
    assert f[f"{a}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f[f"{a}.attention.key_length"] == f[f"{a}.attention.value_length"] == head_dim
    assert f[f"{a}.rope.dimension_count"] == head_dim
    assert f[f"{a}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f[f"{a}.vocab_size"] == cfg.vocab_size == len(f["tokenizer.ggml.tokens"])
    assert f["general.file_type"] == 0 and f["general.quantization_version"] == gguf.GGML_QUANT_VERSION

    # Every weight comes back as it was (lm_head only when untied).
    back = back_to_hf(out, model)
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert torch.equal(back[name], value.float()), name


def test_llama_q_k_rows_are_permuted_for_llama_cpp_rope(toks, tmp_path):
    """Not just a round trip: the stored q rows are the HF rows in interleaved order (checked on one head)."""
    model = tiny("llama", toks["llama-bpe"])
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32")
    q = dequantized(tensors(out)["blk.0.attn_q.weight"])
    hf = model.model.layers[0].self_attn.q_proj.weight.detach()
    d = hf.shape[0] // model.config.num_attention_heads
    assert torch.equal(q[0], hf[0]) and torch.equal(q[1], hf[d // 2]) and torch.equal(q[2], hf[1])
    assert not torch.equal(q, hf)
    k = dequantized(tensors(out)["blk.0.attn_k.weight"])  # GQA: k is permuted per kv head
    kh = model.model.layers[0].self_attn.k_proj.weight.detach()
    assert torch.equal(k[d + 1], kh[d + d // 2])


def test_tied_embeddings_write_no_output_tensor(toks, tmp_path):
    model = tiny("llama", toks["llama-bpe"])
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32")
    assert "output.weight" not in tensors(out) and "token_embd.weight" in tensors(out)


def test_phi3_rope_dimensions_follow_the_partial_rotary_factor(toks, tmp_path):
    model = tiny("phi3", toks["llama-bpe"])
    model.config.rope_parameters["partial_rotary_factor"] = 0.5
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32")
    assert fields(out)["phi3.rope.dimension_count"] == int(0.5 * model.config.hidden_size) // 4


# -- llama.cpp runs the file -------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCH_LIST)
def test_llama_cpp_logits_match_transformers_f32(arch, toks, tmp_path):
    model = tiny(arch, toks["qwen2"])
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32")
    ids = toks["qwen2"](TEXT)["input_ids"][:24]
    ref, got = hf_logits(model, ids), run_llama_cpp(out, ids)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_llama_cpp_logits_match_transformers_f16(arch, toks, tmp_path):
    model = tiny(arch, toks["qwen2"])
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype="f16")
    assert result.tensor_types["f16"] == sum(p.dim() == 2 for p in model.parameters())
    ids = toks["qwen2"](TEXT)["input_ids"][:24]
    ref, got = hf_logits(model, ids), run_llama_cpp(out, ids)
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()


def test_llama3_rope_scaling_runs_like_transformers(toks, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = toks["llama-bpe"]
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, rope_parameters=rope)).eval()
    attach_info(model, tokenizer=tok)
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32")
    factors = dequantized(tensors(out)["rope_freqs.weight"])
    # head size 16 over an original context of 64: unscaled, smoothed and fully scaled frequencies all occur
    assert factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).any()
    ids = tok(TEXT)["input_ids"][:40]
    ref, got = hf_logits(model, ids), run_llama_cpp(out, ids)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


def llama_with_vocab(n: int):
    """A tiny Llama with an ``n``-row embedding and lm_head (set directly: transformers' init of 32000 rows is slow)."""
    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(1)
    width = model.config.hidden_size
    model.model.embed_tokens = torch.nn.Embedding(n, width, _weight=torch.randn(n, width, generator=g) * 0.02)
    model.lm_head = torch.nn.Linear(width, n, bias=False)
    model.lm_head.weight.data = torch.randn(n, width, generator=g) * 0.02
    model.config.vocab_size = n
    return model


def test_vocab_from_copies_llama_cpp_vocabulary(tmp_path):
    """A model without a tokenizer takes llama.cpp's Llama SentencePiece vocabulary (32000 tokens)."""
    src = spm_vocab_file()
    model = llama_with_vocab(32000)
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32", vocab_from=src)
    theirs, ours = raw_kv(src), raw_kv(out)
    keys = sorted(k for k in theirs if k.startswith("tokenizer."))
    assert len(keys) >= 8 and sorted(k for k in ours if k.startswith("tokenizer.")) == keys
    assert all(ours[k] == theirs[k] for k in keys)  # same types, same values, strings byte for byte
    assert ours["llama.vocab_size"][1] == 32000 == len(ours["tokenizer.ggml.tokens"][1])
    ids = [1, 450, 4996, 17354, 1701, 29916, 432, 3427, 975, 278]
    ref, got = hf_logits(model, ids), run_llama_cpp(out, ids)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert llama_cpp_tokens(out, "Hello world")[:1] == [1]  # the copied add_bos flag


# -- tokenizers ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ("spm", "llama-bpe", "qwen2"))
def test_tokenizer_metadata_and_llama_cpp_tokenization(kind, toks, tmp_path):
    tok = copy.deepcopy(toks[kind])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = tiny("llama" if kind != "qwen2" else "qwen2", tok)
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype="f32")
    assert result.notes == []
    f = fields(out)
    types = f["tokenizer.ggml.token_type"]
    assert f["tokenizer.chat_template"] == tok.chat_template
    if kind == "spm":
        assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
        assert types[0] == 2 and types[1] == types[2] == 3 and set(types[3:259]) == {6} and set(types[259:]) == {1}
        assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.add_bos_token"] is True
        assert len(f["tokenizer.ggml.scores"]) == len(tok)
    else:
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == kind
        assert types[0] == 3 and set(types[1:]) == {1}
        assert f["tokenizer.ggml.add_bos_token"] is False
        assert len(f["tokenizer.ggml.merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert f["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    for text in (TEXT, CORPUS[2][:3000]):
        assert llama_cpp_tokens(out, text) == tok(text)["input_ids"]


def test_unknown_pre_tokenizer_is_written_as_default_with_a_note(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS[:1], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    out = tmp_path / "m.gguf"
    result = export_gguf(tiny("llama", tok), out, qtype="f32")
    assert fields(out)["tokenizer.ggml.pre"] == "default"
    assert any("pre-tokenizer" in n and "Digits" in n for n in result.notes)


@pytest.fixture(scope="module")
def coder():
    from slimkit.core.io import load

    return load("stdlib-coder")


def test_stdlib_coder_f16_tokenizes_and_runs_like_transformers(coder, tmp_path):
    from slimkit.core.io import tokenizer_of

    tok = tokenizer_of(coder)
    out = tmp_path / "coder.gguf"
    result = export_gguf(coder, out, qtype="f16")
    f = fields(out)
    assert f["general.name"] == "stdlib-coder" and f["tokenizer.ggml.pre"] == "gpt-2" and result.notes == []
    assert len(f["tokenizer.ggml.tokens"]) == 4096
    text = inspect.getsource(json.dumps)[:800] + "\n\tx = 'héllo' + \"3.14159\"  # ünïcödé 🚀\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert llama_cpp_tokens(out, text) == ids
    ref, got = hf_logits(coder, ids[:48]), run_llama_cpp(out, ids[:48])
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


# -- quantized block types -------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantized_types_load_and_run_in_llama_cpp(qtype, toks, tmp_path):
    """Width 256, so k-quant rows split into whole 256-wide super-blocks. llama.cpp is compared with transformers
    running the file's own (dequantized) weights; its activations are quantized too, hence the tolerance."""
    tok = toks["qwen2"]
    model = tiny("llama", tok, width=256)
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype=qtype)
    found = tensors(out)
    two_d = {n: t for n, t in found.items() if len(t.shape) == 2}
    assert {t.tensor_type.name.lower() for t in two_d.values()} == {qtype}
    assert result.tensor_types == {qtype: len(two_d), "f32": len(found) - len(two_d)}
    back = back_to_hf(out, model)
    bound = {"q8_0": 0.01, "q6_k": 0.03, "q5_0": 0.06, "q4_k": 0.12, "q4_1": 0.12, "q4_0": 0.15}[qtype]
    for name, w in model.state_dict().items():
        if w.dim() == 2:
            rel = (back[name] - w).norm() / w.norm()
            assert rel < bound, (name, float(rel))
    twin = copy.deepcopy(model)
    twin.load_state_dict(back, strict=False)
    ids = tok(TEXT)["input_ids"][:24]
    ref, got = hf_logits(twin, ids), run_llama_cpp(out, ids)
    assert np.abs(got - ref).max() < 5e-2 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_slimkit_codes_on_the_block_grid_are_copied(qtype, toks, tmp_path):
    import slimkit as sk
    from slimkit.quantization.modules import QuantLinear

    model = tiny("llama", toks["qwen2"], width=256)
    sk.quantize_(model, sk.RTN(grid=qtype, ignore=("lm_head",)))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype=qtype)
    assert result.copied == len(layers) and result.requantized == 0
    back = back_to_hf(out, model)
    for name, layer in layers.items():
        dense = layer.dense_weight(torch.float32)
        assert torch.allclose(back[f"{name}.weight"], dense, rtol=0, atol=1e-6 * float(dense.abs().max())), name


def test_type_overrides_requantize_and_the_rounding_note(toks, tmp_path):
    import slimkit as sk

    model = tiny("llama", toks["qwen2"], width=256)
    sk.quantize_(model, sk.RTN(bits=4, group_size=16, ignore=("lm_head",)))  # groups of 16: no q4_0 block holds them
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="group size 16.*--requantize"):
        export_gguf(model, out, qtype="q4_0")
    assert nothing_written(out)
    result = export_gguf(model, out, qtype="q4_0", requantize=True, output_type="q6_k", embedding_type="q8_0")
    found = tensors(out)
    assert found["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    assert found["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert found["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert result.requantized > 0 and result.copied == 0
    assert any("re-quantized onto q4_0" in n for n in result.notes)
    assert any("rounded onto their type at export" in n and "output.weight" in n for n in result.notes)
    with pytest.raises(ConfigError, match="output_type"):
        export_gguf(model, tmp_path / "n.gguf", qtype="q4_0", output_type="q2_k")


# -- bad input -----------------------------------------------------------------------------
def nothing_written(out: Path) -> bool:
    return not out.exists() and not Path(f"{out}.part").exists()


@pytest.mark.parametrize("arch", ("gpt2", "opt"))
def test_unsupported_architecture_is_refused_by_name(arch, tmp_path):
    out = tmp_path / "m.gguf"
    supported = "supported: gemma, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(ConfigError, match=rf"model_type '{arch}'.*{supported}"):
        export_gguf(tiny_causal_lm(arch), out, qtype="f32")
    assert nothing_written(out)


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import (
        BertConfig,
        BertModel,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    out = tmp_path / "m.gguf"
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        export_gguf(BertModel(BertConfig(**small)), out)
    with pytest.raises(ConfigError, match="causal LM.*Qwen2ForSequenceClassification"):
        export_gguf(Qwen2ForSequenceClassification(Qwen2Config(**small)), out)
    with pytest.raises(ConfigError, match="causal LM"):
        export_gguf(torch.nn.Linear(2, 2), out)
    assert nothing_written(out)


def test_rope_scaling_llama_cpp_cannot_express_is_refused(toks, tmp_path):
    model = tiny("phi3", toks["qwen2"])
    model.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                                    "short_factor": [1.0] * 8}
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="rope type 'longrope'.*supported: default, linear, llama3"):
        export_gguf(model, out)
    assert nothing_written(out)


def test_no_tokenizer_and_vocab_mismatch_are_refused(tmp_path):
    out = tmp_path / "m.gguf"
    model = tiny_causal_lm("llama")  # 128 tokens, no tokenizer
    with pytest.raises(ConfigError, match="no tokenizer; pass --vocab-from FILE.gguf"):
        export_gguf(model, out, qtype="f32")
    with pytest.raises(ConfigError, match="no such file"):
        export_gguf(model, out, qtype="f32", vocab_from=tmp_path / "none.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="junk.gguf is not a readable GGUF file"):
        export_gguf(model, out, qtype="f32", vocab_from=junk)
    tokenless = tmp_path / "tokenless.gguf"
    writer = gguf.GGUFWriter(tokenless, "llama")
    writer.add_name("no vocabulary")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="tokenless.gguf has no tokenizer"):
        export_gguf(model, out, qtype="f32", vocab_from=tokenless)
    with pytest.raises(ConfigError, match="has 32000 tokens but the model's embedding has 128 rows"):
        export_gguf(model, out, qtype="f32", vocab_from=spm_vocab_file())
    with pytest.raises(ConfigError, match="unknown GGUF type 'q3_k'"):
        export_gguf(model, out, qtype="q3_k")
    assert nothing_written(out)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_part(toks, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny("llama", toks["qwen2"]), out, qtype="f32")
    assert out.read_bytes() == b"previous export" and not Path(f"{out}.part").exists()


# -- the command ---------------------------------------------------------------------------
def test_cli_writes_the_file_and_reports_it(tiny_lm_dir, tmp_path):
    out = tmp_path / "m.gguf"
    r = slimkit_cli("export", "gguf", tiny_lm_dir, out, "--type", "f16", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["path"] == str(out) and summary["size_bytes"] == out.stat().st_size
    assert summary["arch"] == "llama" and summary["copied"] == summary["requantized"] == 0
    assert summary["tensor_types"] == {"f16": 16, "f32": 5}  # 2 layers x 7 matrices, embedding, lm_head; norms
    r = slimkit_cli("export", "gguf", tiny_lm_dir, out, "--type", "f32")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} ({out.stat().st_size:,} bytes" in r.stdout and "tensors: f32 21" in r.stdout
    assert "quantized layers: 0 codes copied, 0 re-quantized" in r.stdout


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(gpt2)
    bare = tmp_path / "bare"
    tiny_causal_lm("llama").save_pretrained(bare)  # no tokenizer files
    out = tmp_path / "m.gguf"
    cases = [((gpt2, out), "model_type 'gpt2'"),
             ((bare, out), "no tokenizer; pass --vocab-from"),
             ((bare, out, "--type", "q3_k"), "unknown --type 'q3_k'")]
    src = spm_vocab_file()
    cases.append(((bare, out, "--vocab-from", src), "has 32000 tokens but the model's embedding has 128 rows"))
    for args, message in cases:
        r = slimkit_cli("export", "gguf", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
        assert nothing_written(out)


def test_cli_group_size_the_blocks_cannot_hold_exits_2_naming_types(tiny_lm_dir, tmp_path):
    import slimkit as sk

    model = sk.load(str(tiny_lm_dir))
    sk.quantize_(model, sk.RTN(bits=4, group_size=16, ignore=("lm_head",)))
    sk.save(model, tmp_path / "g16")
    out = tmp_path / "m.gguf"
    r = slimkit_cli("export", "gguf", tmp_path / "g16", out, "--type", "q4_0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    message = " ".join(r.stderr.split())
    assert "group size 16 is not a multiple of q4_0's 32" in message and "Types that hold them" in message
    assert nothing_written(out)
    r = slimkit_cli("export", "gguf", tmp_path / "g16", out, "--type", "q4_0", "--requantize")
    assert r.returncode == 0, r.stderr
    assert "0 codes copied, 14 re-quantized" in r.stdout and "re-quantized onto q4_0" in " ".join(r.stdout.split())


def test_cli_writes_an_importance_matrix_from_calibration_text(tiny_lm_dir, tmp_path):
    from slimkit.export.imatrix import read_imatrix

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"def f{i}(a, b):\n    return a * {i} + b\n" for i in range(40)))
    out, imat = tmp_path / "m.gguf", tmp_path / "m.imatrix.gguf"
    r = slimkit_cli("export", "gguf", tiny_lm_dir, out, "--type", "f16", "--imatrix", imat,
                    "--calib", f"{text}?n=4&seq_len=16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["imatrix"] == str(imat)
    read = read_imatrix(imat)
    assert read["kv"]["general.type"] == "imatrix"
    assert sorted(read["sums"]) == sorted(f"blk.{i}.{w}.weight" for i in range(2) for w in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    assert read["sums"]["blk.0.ffn_down.weight"].shape == (64,) and read["counts"]["blk.0.attn_q.weight"] == 64
    assert all(bool((v >= 0).all()) and float(v.sum()) > 0 for v in read["sums"].values())
    r = slimkit_cli("export", "gguf", tiny_lm_dir, tmp_path / "n.gguf", "--calib", str(text))
    assert r.returncode == 2 and "--calib is read for --imatrix only" in " ".join(r.stderr.split())


def test_quantized_embedding_tied_to_the_lm_head_is_written_once(toks, tmp_path):
    """Gemma with a QuantEmbedding and the TiedQuantLinear lm_head reading it: one token_embd, no output.weight."""
    import slimkit as sk
    from slimkit.quantization.modules import (
        QuantEmbedding,
        QuantLinear,
        TiedQuantLinear,
    )

    model = tiny("gemma", toks["qwen2"])
    sk.quantize_(model, sk.RTN(bits=8, group_size=32, embeddings=True))
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedQuantLinear)
    out = tmp_path / "m.gguf"
    result = export_gguf(model, out, qtype="f32")
    found = tensors(out)
    assert "output.weight" not in found
    assert torch.equal(dequantized(found["token_embd.weight"]), model.model.embed_tokens.dense_weight(torch.float32))
    n_quant = sum(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    assert result.copied == result.requantized == 0
    assert f"{n_quant} quantized layer(s) written dequantized as f32" in result.notes


def test_a_kept_pruning_mask_is_written_applied(toks, tmp_path):
    """A parametrized weight (slimkit's WeightMask kept through fine-tuning) is written as the masked value."""
    from torch.nn.utils import parametrize

    class HalfZero(torch.nn.Module):
        def forward(self, w):
            return torch.cat([torch.zeros_like(w[:, : w.shape[1] // 2]), w[:, w.shape[1] // 2:]], dim=1)

    model = tiny("qwen2", toks["qwen2"])
    down = model.model.layers[1].mlp.down_proj
    parametrize.register_parametrization(down, "weight", HalfZero())
    out = tmp_path / "m.gguf"
    export_gguf(model, out, qtype="f32")
    written = dequantized(tensors(out)["blk.1.ffn_down.weight"])
    assert torch.equal(written, down.weight.detach()) and (written[:, :64] == 0).all()
