"""stdlib-coder: a small Llama-architecture causal LM trained on the Python stdlib corpus.

Architecture (``coder_config``): 6 decoder layers, hidden 256, 8 query heads of
dim 32 sharing 4 key/value heads (grouped-query attention), SwiGLU MLP of 640
(5 x 128, so group-128 quantization divides every input dimension), RoPE,
untied 4096-token embedding and head: about 6.2M parameters, 24 MiB in fp32.

Tokenizer: byte-level BPE (``tokenizers``), 4096 tokens, trained on the train
split only; ``<|endoftext|>`` separates files.

Training (``train``): next-token prediction on random 256-token windows of the
concatenated train split, AdamW with warm-up and cosine decay, a wall-clock
budget; it stops early when calibration-split perplexity stops improving by
at least 1% between checks. The eval split is never looked at while training.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimkit.tasks.causal_lm import windowed_loss  # noqa: F401  (also the training script's check)
from slimkit.zoo import corpus

_logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 4096
SEQ_LEN = 256


def coder_config(student: bool = False):
    """The transformers LlamaConfig of stdlib-coder (or of its 2-layer, narrower student)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=192 if student else 256,
        intermediate_size=512 if student else 640,
        num_hidden_layers=2 if student else 6,
        num_attention_heads=6 if student else 8,
        num_key_value_heads=3 if student else 4,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: source code's leading spaces are meaningful indentation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],  # ids 0 and 1, as coder_config says
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with eos/pad set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-D int64 tensor of token ids, each text followed by ``<|endoftext|>``."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def train(
    out_dir: str | Path,
    minutes: float = 60.0,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    student: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train stdlib-coder from scratch and write it (safetensors, config, tokenizer, training log) to ``out_dir``.

    Progress lines go to ``log`` (default: this module's logger at INFO).
    Returns the training summary that is also written to ``training.json``.
    """
    log = log or _logger.info
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_texts = corpus.load_split("train")
    tok = train_tokenizer(train_texts)
    tokenizer = wrap_tokenizer(tok)
    train_ids = encode_corpus(tokenizer, train_texts)
    calib_ids = encode_corpus(tokenizer, corpus.load_split("calibration"))
    log(f"tokenizer trained in {time.time() - t0:.0f}s; train tokens {len(train_ids):,}, calibration tokens {len(calib_ids):,}")

    model = LlamaForCausalLM(coder_config(student))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model parameters: {n_params:,}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    gen = torch.Generator().manual_seed(seed)
    budget_s = minutes * 60.0
    warmup = 100
    history = []
    step = 0
    t_train = time.time()
    model.train()
    while True:
        elapsed = time.time() - t_train
        if elapsed > budget_s:
            break
        # Cosine decay over wall-clock time, not steps: the machine is shared, so the step
        # rate varies, and a step-planned schedule would be cut off before it decays.
        if step < warmup:
            cur_lr = lr * (step + 1) / warmup
        else:
            progress = min(1.0, elapsed / budget_s)
            cur_lr = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 250 == 0:
            calib_loss = windowed_loss(model, calib_ids, SEQ_LEN, 64)
            history.append({"step": step, "train_loss": loss.item(), "calib_ppl": math.exp(calib_loss),
                            "seconds": round(time.time() - t_train)})
            log(f"step {step} loss {loss.item():.3f} calib ppl {math.exp(calib_loss):.2f} lr {cur_lr:.2e} "
                f"{time.time() - t_train:.0f}s")
            # Late in the schedule, stop when two checks in a row gain < 1% (the plateau the issue asks for).
            if elapsed > 0.6 * budget_s and len(history) >= 3:
                gains = [history[-k - 1]["calib_ppl"] / history[-k]["calib_ppl"] for k in (1, 2)]
                if max(gains) < 1.01:
                    log("calibration perplexity stopped improving by 1% per check; stopping")
                    break

    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "parameters": n_params,
        "steps": step,
        "batch_size": batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": step * batch_size * SEQ_LEN,
        "train_seconds": round(time.time() - t_train),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    log(f"saved to {out_dir}")
    return summary


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int = VOCAB_SIZE) -> float:
    """Perplexity of a unigram model (add-one smoothed token frequencies of ``train_ids``) on ``eval_ids``.

    The floor any LM must beat: it knows which tokens are common but nothing of context.
    """
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_p = torch.log(counts / counts.sum())
    return float(torch.exp(-log_p[eval_ids[1:]].mean()))  # the same tokens the LM predicts (all but the first)


def document(model_dir: str | Path, log: Callable[[str], None] | None = None) -> dict:
    """Measure the shipped model on the eval split and the unigram baseline; write ``eval.json`` beside it."""
    log = log or _logger.info
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from slimkit.tasks.metrics import perplexity

    model_dir = Path(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).eval()
    train_ids = encode_corpus(tokenizer, corpus.load_split("train"))
    eval_ids = encode_corpus(tokenizer, corpus.load_split("eval"))
    result = perplexity(model, eval_ids, context=SEQ_LEN, stride=SEQ_LEN // 2)
    summary = {
        "eval_split": {"files": sum(1 for f in corpus.list_files() if f.split == "eval"), "tokens": len(eval_ids)},
        "perplexity": result.perplexity,
        "context": result.context,
        "stride": result.stride,
        "unigram_perplexity": unigram_perplexity(train_ids, eval_ids),
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
    }
    (model_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps(summary, indent=2))
    return summary
