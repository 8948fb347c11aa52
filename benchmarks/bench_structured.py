"""P5: structured pruning at 2x fewer MACs, slimkit beside Torch-Pruning, one run.

    python -m benchmarks.bench_structured            # full run, writes BENCHMARKS.md
    python -m benchmarks.bench_structured --quick    # smoke test: short fine-tunes, few timings, never written
    python -m benchmarks.bench_structured --no-write # full run, printed only

Two models, each pruned by slimkit and by Torch-Pruning (``torch_pruning.pruner.MetaPruner``,
the peer) at the same ratio with the same importance, then fine-tuned by the same loop:

- digits-cnn (zoo): every conv's output filters, L1 importance (``StructuredPrune(importance="l1")``
  beside ``MagnitudeImportance(p=1, group_reduction="mean")``), one per-layer ratio, the one that
  brings slimkit's model to <= 0.5x the dense MACs (searched by bisection on slimkit's pruning,
  then given unchanged to Torch-Pruning); the classifier is kept whole. Quality: top-1 accuracy on
  the 540 test images; fine-tune: AdamW (lr 2e-3, cosine) on the train split, the random
  one-pixel shifts digits-cnn was trained with, a fixed number of epochs, seed 0.
- minilm (all-MiniLM-L6-v2): 50% of the attention heads of every layer (whole heads across
  q/k/v/o) and 50% of every FFN's neurons, L1 importance; for Torch-Pruning its documented BERT
  recipe (``num_heads``, ``prune_num_heads=True``, ``head_pruning_ratio``) with the residual
  stream kept (the layers writing it ignored), so both prune the same units. Quality: mean
  cosine of mean-pooled sentence embeddings to the dense model's on 256 eval-split sentences;
  fine-tune: the pruned encoder learns the dense one's embeddings (1 - cosine) on train-split
  sentences (disjoint from eval), AdamW lr 1e-4, batch 16, a fixed number of steps, seed 0.

MACs: ``slimkit.core.measure.count_macs`` (torch's FlopCounterMode / 2) on one input of
the timed shape. Latency: PyTorch eager, digits at batch 256, MiniLM at batch 32 x seq 128;
dense and both pruned models interleaved (warm-up 3, median of 20 calls in 4 rounds), threads
as stated. Prune time: wall seconds of the pruning call alone.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import harness

SECTION = "structured-p5"
DIGITS_BATCH = 256
MINILM_BATCH, MINILM_SEQ = 32, 128


@dataclass
class Row:
    label: str
    family: str  # "fp32" | "slimkit" | "peer"
    model: Any = None
    macs: int | None = None
    params: int | None = None
    quality_pruned: float | None = None
    quality_tuned: float | None = None
    latency_ms: float | None = None
    ort_ms: float | None = None  # ONNX Runtime latency (digits only)
    prune_s: float | None = None
    error: str | None = None


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- digits-cnn --------------------------------------------------------------------------
def _digits_finetune(model, epochs: int) -> None:
    import torch
    from torch import nn

    from slimkit.zoo.digits import random_shift, load_digits_split

    x, y = load_digits_split("train")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    steps = epochs * math.ceil(len(x) / 64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = loss_fn(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _slimkit_prune(model, config, data=None):
    import slimkit as sk

    start = time.perf_counter()
    sk.prune_(model, config, data=data)
    return time.perf_counter() - start


def _digits_ratio(dense, example, round_to: int, scope: str) -> float:
    """The smallest filter ratio (bisection to 0.001) whose slimkit L1 pruning reaches <= 0.5x dense MACs."""
    import slimkit as sk
    from slimkit.core.measure import count_macs

    target = 0.5 * count_macs(dense, example)
    lo, hi = 0.0, 0.9
    while hi - lo > 0.001:
        mid = (lo + hi) / 2
        m = copy.deepcopy(dense)
        sk.prune_(m, sk.StructuredPrune(ratio=mid, importance="l1", round_to=round_to, scope=scope))
        lo, hi = (lo, mid) if count_macs(m, example) <= target else (mid, hi)
    return hi  # unrounded: both tools get exactly this ratio


def _tp_digits(model, ratio: float, example, round_to: int, scope: str):
    import torch_pruning as tp

    imp = tp.importance.MagnitudeImportance(p=1, group_reduction="mean")
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, global_pruning=scope == "global",
                                  ignored_layers=[model.classifier], round_to=round_to if round_to > 1 else None)
    pruner.step()
    return time.perf_counter() - start


def _ort_call(model, batch, folder: str, name: str):
    """An ONNX Runtime session (2 intra-op threads) of ``model`` exported by slimkit, as a no-argument call."""
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    path = f"{folder}/{name}.onnx"
    export_onnx(model, path)
    session = ort_session(path, spin=False)  # sessions are timed in turn: no spinning between calls
    feed = {session.get_inputs()[0].name: batch.numpy()}
    return lambda: session.run(None, feed)


def run_digits(args) -> tuple[list[Row], dict[str, Any]]:
    import tempfile

    import slimkit as sk
    from slimkit.core.measure import count_macs
    from slimkit.zoo.digits import accuracy, load_digits_split

    x_test, y_test = load_digits_split("test")
    batch = x_test[:DIGITS_BATCH]
    dense = sk.load("digits-cnn").eval()
    epochs = 2 if args.quick else 15
    rows = [Row("digits-cnn dense", "fp32", dense)]
    ratios = {}
    # Per-layer ratio with any widths (the plain comparison), and global ranking with widths
    # kept at multiples of 8 (what CPU kernels want), each at slimkit's ratio for <= 0.5x MACs.
    for scope, round_to in (("layer", 1), ("global", 8)):
        ratio = ratios[scope] = _digits_ratio(dense, batch[:1], round_to, scope)
        suffix = f"{scope} ratio {ratio:.4f}" + (f", round_to {round_to}" if round_to > 1 else "")
        ours = Row(f"slimkit StructuredPrune l1, {suffix}", "slimkit", copy.deepcopy(dense))
        peer = Row(f"Torch-Pruning MetaPruner l1, {suffix}", "peer", copy.deepcopy(dense))
        config = sk.StructuredPrune(ratio=ratio, importance="l1", round_to=round_to, scope=scope)
        harness.guard(ours, "prune", lambda: setattr(ours, "prune_s", _slimkit_prune(ours.model, config)))
        harness.guard(peer, "prune", lambda: setattr(peer, "prune_s", _tp_digits(
            peer.model, ratio, batch[:1], round_to, scope)))
        rows += [ours, peer]
    for r in rows:
        def measure(r=r):
            r.macs, r.params = count_macs(r.model, batch[:1]), _params(r.model)
            r.quality_pruned = 100 * accuracy(r.model, x_test, y_test)
            if r.family != "fp32":
                _digits_finetune(r.model, epochs)
                r.quality_tuned = 100 * accuracy(r.model, x_test, y_test)
        harness.guard(r, "measure", measure)
    _time_rows(rows, lambda m: (lambda: m(batch)), args, batch_size=DIGITS_BATCH)
    with tempfile.TemporaryDirectory() as folder:
        calls = {}
        for i, r in enumerate(rows):
            if not r.error:
                calls[r.label] = harness.guard(r, "onnx export", lambda r=r, i=i: _ort_call(r.model, batch, folder, f"m{i}"))
        live = {k: v for k, v in calls.items() if v is not None}
        runs, rounds = (4, 2) if args.quick else (20, 4)
        result = harness.timed_interleaved(live, runs=runs, rounds=rounds, batch_size=DIGITS_BATCH)
        for r in rows:
            if r.label in result.stats:
                r.ort_ms = result.stats[r.label].median_ms
    return rows, {"ratios": ratios, "epochs": epochs}


# -- minilm ------------------------------------------------------------------------------
def _minilm_inputs(tokenizer, texts, batch: int, seq: int) -> dict:
    enc = tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def _embed(model, tokenizer, texts):
    from slimkit.tasks.metrics import encode_sentences

    return encode_sentences(model, tokenizer, texts, batch_size=32, max_length=128)


def _cosine(model, tokenizer, texts, reference) -> float:
    from slimkit.tasks.metrics import embedding_fidelity

    return embedding_fidelity(_embed(model, tokenizer, texts), reference).mean_cosine


def _minilm_finetune(model, teacher, tokenizer, texts, steps: int) -> None:
    import torch

    from slimkit.tasks.metrics import mean_pool

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (16,), generator=gen).tolist()
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch = dict(enc)
        with torch.no_grad():
            target = mean_pool(teacher(**batch).last_hidden_state, batch["attention_mask"])
        student = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        loss = (1 - torch.nn.functional.cosine_similarity(student, target, dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def _tp_minilm(model, example) -> float:
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    num_heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for lin in (m.query, m.key, m.value):
                num_heads[lin] = m.num_attention_heads
    # The layers that write the residual stream are ignored, so (like slimkit) only heads and FFN neurons go.
    ignored = [model.embeddings] + ([model.pooler] if getattr(model, "pooler", None) is not None else [])
    for layer in model.encoder.layer:
        ignored += [layer.attention.output.dense, layer.output.dense]
    imp = tp.importance.MagnitudeImportance(p=1, group_reduction="mean")
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=0.5, num_heads=num_heads,
                                  prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=0.5,
                                  output_transform=lambda out: out.last_hidden_state.sum(), ignored_layers=ignored)
    pruner.step()
    for m in model.modules():  # Torch-Pruning's documented follow-up: the attention modules' own counts
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return time.perf_counter() - start


def run_minilm(args) -> tuple[list[Row], dict[str, Any]]:
    import torch

    import slimkit as sk
    from slimkit.core.measure import count_macs
    from slimkit.zoo.minilm import sample_texts

    dense = sk.load("minilm").eval()
    tokenizer = sk.tokenizer_of(dense)
    eval_texts = sample_texts("eval", n=256)
    train_texts = sample_texts("train", n=2048)
    example = _minilm_inputs(tokenizer, eval_texts, MINILM_BATCH, MINILM_SEQ)
    reference = _embed(dense, tokenizer, eval_texts)
    steps = 10 if args.quick else 300
    config = sk.StructuredPrune(ratio=0.5, importance="l1", targets=("heads", "neurons"))
    rows = [Row("minilm dense", "fp32", dense)]
    ours = Row("slimkit StructuredPrune l1, heads 50% + neurons 50%", "slimkit", copy.deepcopy(dense))
    peer = Row("Torch-Pruning MetaPruner l1, heads 50% + FFN 50%", "peer", copy.deepcopy(dense))
    harness.guard(ours, "prune", lambda: setattr(ours, "prune_s", _slimkit_prune(ours.model, config)))
    one = {k: v[:1] for k, v in example.items()}
    harness.guard(peer, "prune", lambda: setattr(peer, "prune_s", _tp_minilm(peer.model, one)))
    rows += [ours, peer]
    for r in rows:
        def measure(r=r):
            with torch.no_grad():
                r.macs = count_macs(r.model, one)
            r.params = _params(r.model)
            r.quality_pruned = _cosine(r.model, tokenizer, eval_texts, reference)
            if r.family != "fp32":
                _minilm_finetune(r.model, dense, tokenizer, train_texts, steps)
                r.quality_tuned = _cosine(r.model, tokenizer, eval_texts, reference)
        harness.guard(r, "measure", measure)

    def call(m):
        def fn():
            with torch.no_grad():
                m(**example)
        return fn

    _time_rows(rows, call, args, batch_size=MINILM_BATCH, seq_len=MINILM_SEQ)
    return rows, {"steps": steps}


# -- shared ------------------------------------------------------------------------------
def _time_rows(rows: list[Row], make_call: Callable[[Any], Callable[[], Any]], args, **kw) -> None:
    import torch

    live = [r for r in rows if not r.error]
    runs, rounds = (4, 2) if args.quick else (20, 4)
    with torch.no_grad():
        result = harness.timed_interleaved({r.label: make_call(r.model) for r in live}, runs=runs, rounds=rounds, **kw)
    for r in live:
        r.latency_ms = result.stats[r.label].median_ms


def table(rows: list[Row], quality: str) -> harness.Table:
    dense = rows[0]
    ort = any(r.ort_ms for r in rows)

    def ratio(a, b):
        return f"{a / b:.3f}x" if a is not None and b else ""

    t = harness.Table(["model", "MACs (M)", "MACs vs dense", "params", "PyTorch ms", "PyTorch vs dense",
                       *(["ORT ms", "ORT vs dense"] if ort else []),
                       f"{quality} pruned", f"{quality} fine-tuned", "prune s", "note"])
    for r in rows:
        t.add(r.label, f"{r.macs / 1e6:.2f}" if r.macs else "", ratio(r.macs, dense.macs), r.params or "",
              f"{r.latency_ms:.3f}" if r.latency_ms else "", ratio(r.latency_ms, dense.latency_ms),
              *([f"{r.ort_ms:.3f}" if r.ort_ms else "", ratio(r.ort_ms, dense.ort_ms)] if ort else []),
              f"{r.quality_pruned:.4f}" if r.quality_pruned is not None else "",
              f"{r.quality_tuned:.4f}" if r.quality_tuned is not None else "",
              f"{r.prune_s:.2f}" if r.prune_s is not None else "", r.error or "")
    return t


def verdicts(name: str, rows: list[Row], tolerance: float) -> list[str]:
    """One line per P5 check of each (slimkit, Torch-Pruning) pair after the dense row: 'met' or 'MISSED'."""
    dense, lines = rows[0], []
    for ours, peer in zip(rows[1::2], rows[2::2]):
        if ours.error or dense.error:
            lines.append(f"- {name}, {ours.label}: failed ({ours.error or dense.error})")
            continue
        lat = ours.latency_ms / dense.latency_ms
        ort = f", ONNX Runtime {ours.ort_ms / dense.ort_ms:.3f}x" if ours.ort_ms and dense.ort_ms else ""
        lines.append(f"- {name}, {ours.label}: MACs {ours.macs / dense.macs:.3f}x, PyTorch latency {lat:.3f}x dense "
                     f"(target <= 0.60x): {'met' if lat <= 0.60 else 'MISSED'}{ort}")
        if peer.error:
            lines.append(f"- {name}: Torch-Pruning could not run ({peer.error}); quality comparison not made")
            continue
        gap = ours.quality_tuned - peer.quality_tuned
        lines.append(f"- {name}, {ours.label}: fine-tuned quality {ours.quality_tuned:.4f} vs Torch-Pruning "
                     f"{peer.quality_tuned:.4f} (difference {gap:+.4f}; target within {tolerance}): "
                     f"{'met' if gap >= -tolerance else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser("bench_structured", __doc__.split("\n")[0], quick="smoke test: short fine-tunes, few timings; never written", no_write="print the tables only; leave BENCHMARKS.md alone")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every timing (default 2)")
    args = parser.parse_args(argv)
    threads = harness.set_threads(args.threads)
    env = harness.environment()
    start = time.perf_counter()
    digits, d_info = run_digits(args)
    minilm, m_info = run_minilm(args)
    seconds = time.perf_counter() - start
    # "within 0.3 pt": accuracy points for digits; the same 0.003 in cosine for MiniLM.
    lines = verdicts("digits-cnn", digits, 0.3) + verdicts("minilm", minilm, 0.003)
    d_table, m_table = table(digits, "accuracy %"), table(minilm, "mean cosine")
    markdown = "\n".join([
        "## P5: structured pruning at 2x fewer MACs (slimkit beside Torch-Pruning)",
        "",
        f"digits-cnn: batch {DIGITS_BATCH}; filter ratio {d_info['ratios']['layer']:.4f} per layer (any width) and "
        f"{d_info['ratios']['global']:.4f} ranked globally with kept widths rounded to a multiple of 8, each slimkit's "
        f"smallest ratio at <= 0.5x MACs (the same ratio given to Torch-Pruning), L1; fine-tune {d_info['epochs']} epochs on the train split; accuracy on the 540 test images. "
        "ONNX Runtime: slimkit's fp32 export of each model, 2 intra-op threads, no thread spinning (sessions are timed in turn).",
        "",
        d_table.to_markdown(),
        "",
        f"minilm: batch {MINILM_BATCH} x seq {MINILM_SEQ}; heads 50% + FFN neurons 50% per layer, L1; fine-tune "
        f"{m_info['steps']} steps (batch 16) to the dense embeddings on train-split sentences; mean cosine to the dense "
        "embeddings on 256 eval-split sentences.",
        "",
        m_table.to_markdown(),
        "",
        *lines,
        "",
        f"Latency: PyTorch eager, {threads} threads, warm-up 3, median of 20 interleaved calls. "
        f"The whole run took {seconds:.0f} s. " + harness.environment_line(env),
    ])
    return harness.publish_rows(args, SECTION, digits + minilm, d_table.to_text() + "\n\n" + m_table.to_text(), markdown)


if __name__ == "__main__":
    sys.exit(main())
