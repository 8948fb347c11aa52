"""50% unstructured and 2:4 sparsity on stdlib-coder: slimkit Magnitude / Wanda / SparseGPT beside
torch.nn.utils.prune and torch.ao.pruning, measured in one run (targets P4 and P8).

    python -m benchmarks.bench_sparse_coder            # full run, writes BENCHMARKS.md
    python -m benchmarks.bench_sparse_coder --quick    # smoke test: few tokens and windows, never written
    python -m benchmarks.bench_sparse_coder --no-write # full run, printed only
    (--threads N: other than the protocol's 2, stated in the output)

Model: the zoo causal LM ``stdlib-coder`` (Llama architecture, 6.23M parameters, 6 blocks
of 7 Linear layers + an untied lm_head). Every row prunes the same 42 Linear layers of the
decoder blocks (as the Wanda and SparseGPT papers and llm-compressor do); lm_head and the
embedding stay dense in every row. Each method is applied layer-wise.

Data: calibration = 64 windows of 256 tokens drawn (seed 0) from the stdlib *calibration*
split (``CalibrationData.from_texts``; ``--quick``: 8), the same windows for Wanda and
SparseGPT; quality = sliding-window perplexity (context 256, stride 128) on the first 65,536
tokens of the disjoint *eval* split (``--quick``: 4,096) — the data of bench_w4_coder.

Rows, at 50% unstructured and at 2:4 (keep 2 of every 4 consecutive input weights of a row):
- slimkit ``Magnitude`` (|w|, layer scope: exactly half of each layer; at 2:4 the 2 largest
  |w| of every 4), the baseline every ratio is taken against;
- the peer for it: ``torch.nn.utils.prune.l1_unstructured(amount=0.5)`` per layer at 50%;
  ``torch.ao.pruning.WeightNormSparsifier(sparse_block_shape=(1, 4), zeros_per_block=2)`` at
  2:4 (torch's own 2:4 magnitude sparsifier). Their masks must be identical to slimkit
  Magnitude's (checked layer by layer; a mismatch keeps the run from being written);
- slimkit ``Wanda`` and ``SparseGPT`` (block 128, dampening 0.01), true-sequential (each group's
  inputs measured through the block's already-pruned groups) and, as the papers' reference
  code does, with ``true_sequential=False`` (every group measured on the incoming block);
- peers for Wanda and SparseGPT: llm-compressor's ``WandaPruningModifier`` and
  ``SparseGPTModifier`` (``oneshot``, sparsity 0.5, ``mask_structure="2:4"`` at 2:4, the same
  calibration windows, the decoder projections as targets), run in a child process by
  ``benchmarks/peer_llmcompressor.py``. llm-compressor pins transformers and
  compressed-tensors versions other than slimkit's, so give it its own folder:
  ``pip install --target DIR llmcompressor loguru accelerate datasets pyarrow pandas
  multiprocess dill xxhash nvidia-ml-py --no-deps`` (plus what they need) and pass
  ``--peer-path DIR``; without it those rows say why they could not run.
If slimkit's Magnitude is not available, the torch peer's row is the baseline (stated).

Columns: perplexity and its change vs fp32; the increase over fp32 (ppl − ppl_fp32); that
increase as a multiple of magnitude's at the same sparsity (P4: ≤ 0.33× at 50%, ≤ 0.25× at
2:4); measured sparsity of the pruned layers (exact zeros of each weight; min and max over
the 42 layers: exact means min = max = 50%, and every 4-group holds exactly 2 zeros at 2:4);
wall seconds of the pruning call alone and seconds per million model parameters (P8: ≤ 60 s);
the share of CPU time other processes took meanwhile.

A peer that cannot run is a row with the stage and the exception; a slimkit method whose module
is not written is a row saying "not available". Any other failure of an fp32 or slimkit row, or
inexact sparsity, or a magnitude mask differing from torch's, stops the run from writing BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import harness

SECTION = "sparse-coder"
THREADS = 2
MODEL = "stdlib-coder"
SEQ_LEN = 256  # calibration window length
IGNORE = ("lm_head",)  # dense in every row
BLOCKS = r"re:model\.layers\..*"  # only the decoder blocks' Linear layers are pruned
SETTINGS = (("50%", None), ("2:4", "2:4"))  # (label, pattern); sparsity 0.5 in both

# Targets of P4 (ratio of the perplexity increase to magnitude's) and P8 (seconds).
MAX_RATIO = {"50%": 0.33, "2:4": 0.25}
MAX_SECONDS = 60.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    eval_tokens: int
    n_calib: int


FULL = Settings(quick=False, eval_tokens=65536, n_calib=64)
QUICK = Settings(quick=True, eval_tokens=4096, n_calib=8)


@dataclass
class Row:
    """One variant: the model perplexity runs on, and what was measured on it."""

    label: str
    family: str  # "fp32", "slimkit" or "peer"
    setting: str | None = None  # "50%" or "2:4"
    method: str | None = None  # "magnitude", "wanda", "sparsegpt"
    lm: nn.Module | None = None
    seconds: float | None = None
    other_load: float | None = None
    ppl: float | None = None
    sparsity: tuple[float, float] | None = None  # (min, max) over the pruned layers
    exact: bool | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers every row prunes: those inside the decoder blocks."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


def measured_sparsity(model: nn.Module, pattern: str | None,
                      dense: dict[str, float]) -> tuple[tuple[float, float], bool, list[str]]:
    """((min, max) zero fraction over the pruned layers, exact?, problems) — from the weights themselves.

    Exact: every layer exactly 50% zeros and, at 2:4, exactly 2 zeros in every group of 4
    consecutive inputs of a row. Also checks that the layers outside the blocks (lm_head, the
    embedding) hold no more zeros than in the dense model (``dense``: its ``layer_sparsity``).
    """
    from slimkit.core.measure import layer_sparsity

    per_layer = layer_sparsity(model)
    targets = _targets(model)
    values = [per_layer[n] for n in targets]
    problems = [f"{n}: {100 * per_layer[n]:.3f}% zeros" for n in targets if per_layer[n] != 0.5]
    if pattern is not None:
        for n, lin in targets.items():
            w = lin.weight.detach()
            groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            if not bool((groups == 2).all()):
                problems.append(f"{n}: {int((groups != 2).sum())} groups of 4 without exactly 2 zeros")
    for n, s in per_layer.items():
        if n not in targets and s != dense.get(n):
            problems.append(f"{n} (not pruned) holds {100 * s:.4f}% zeros, {100 * dense.get(n, 0):.4f}% before")
    return (min(values), max(values)), not problems, problems


def _llmcompressor(model: nn.Module, method: str, pattern: str | None, settings: Settings,
                   peer_path: str | None) -> tuple[nn.Module, float, str]:
    """llm-compressor's ``method`` run by ``peer_llmcompressor`` in a child process; (pruned copy, seconds, version)."""
    import json
    import os
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in (peer_path, root, env.get("PYTHONPATH")) if p])
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "benchmarks.peer_llmcompressor", "--method", method, "--samples",
               str(settings.n_calib), "--seq-len", str(SEQ_LEN), "--threads", str(torch.get_num_threads()), "--out", out]
        if pattern:
            cmd += ["--pattern", pattern]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        if done.returncode != 0:
            last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise RuntimeError(f"llm-compressor child exited {done.returncode}: {last[0][:200]}")
        run = json.loads(Path(out, "run.json").read_text())
        pruned = copy.deepcopy(model)
        missing, unexpected = pruned.load_state_dict(load_file(str(Path(out, "model.safetensors"))), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"llm-compressor output does not match stdlib-coder: {missing[:3]} {unexpected[:3]}")
    return pruned, float(run["seconds"]), str(run["version"])


def build_rows(settings: Settings, peer_path: str | None = None) -> tuple[list[Row], dict[str, Any], list[str]]:
    """Load stdlib-coder, build every variant (failures recorded in their rows); returns rows, run facts, problems."""
    import slimkit as sk
    from slimkit.core.errors import SlimkitError
    from slimkit.core.registry import Context
    from slimkit.core.measure import layer_sparsity
    from slimkit.evaluation.suite import resolve_eval_data
    from slimkit.zoo.corpus import load_split

    model = sk.load(MODEL).eval()
    calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model), seq_len=SEQ_LEN,
                                          n=settings.n_calib)
    data = resolve_eval_data(model, max_tokens=settings.eval_tokens)
    targets = _targets(model)
    info: dict[str, Any] = {"data": data, "calib": f"stdlib calibration split, {calib.description}",
                            "params": sum(p.numel() for p in model.parameters()),
                            "pruned": (len(targets), sum(m.weight.numel() for m in targets.values()))}
    rows = [Row("PyTorch fp32", "fp32", lm=model)]
    problems: list[str] = []
    dense = layer_sparsity(model)  # the embedding holds a few exact zeros of its own

    def finish(row: Row, pruned: nn.Module, pattern: str | None) -> None:
        row.lm = pruned.eval()
        row.sparsity, row.exact, issues = measured_sparsity(pruned, pattern, dense)
        # Inexact sparsity is a result for a peer, but stops the write for slimkit's own rows.
        if row.family == "peer" and row.method != "magnitude":
            row.notes.extend(f"not exact: {p}" for p in issues[:3])
        else:
            problems.extend(f"{row.label}: {p}" for p in issues[:5])

    def llmc_row(setting: str, pattern: str | None, method: str) -> Row:
        name = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}[method]
        row = Row(f"llm-compressor {name} {setting}", "peer", setting, method)
        print(f"  building: {row.label}", flush=True)

        def run() -> nn.Module:
            with harness.OtherLoad() as load:
                pruned, row.seconds, version = _llmcompressor(model, method, pattern, settings, peer_path)
            row.other_load = load.fraction
            row.label += f" ({version})"
            return pruned

        pruned = harness.guard(row, "llm-compressor", run)
        if pruned is not None:
            finish(row, pruned, pattern)
        return row

    def slimkit_row(label: str, setting: str, pattern: str | None, method: str, name: str, **kw: Any) -> Row:
        row = Row(label, "slimkit", setting, method)
        print(f"  building: {label}", flush=True)
        try:
            cfg = getattr(sk, name)(pattern=pattern, include=[BLOCKS], ignore=list(IGNORE), **kw)
        except (ImportError, AttributeError, TypeError) as exc:  # the module or the option is not written yet
            row.error = f"not available: {harness.why('config', exc)}"
            return row
        except SlimkitError as exc:
            row.error = harness.why("config", exc)
            return row
        ctx = Context()
        work = copy.deepcopy(model)

        def prune() -> nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # --quick's few windows warn; the full run has 64
                return sk.prune_(work, cfg, data=calib, ctx=ctx)

        pruned = harness.guard(row, "prune_", lambda: harness.timed_row(row, prune))
        if pruned is not None:
            finish(row, pruned, pattern)
            row.notes += [n for n in ctx.notes if ("magnitude (" in n and n.endswith(" used")) or "escalated" in n]
        return row

    def torch_row(label: str, setting: str, pattern: str | None, prune: Callable[[nn.Module], None]) -> Row:
        row = Row(label, "peer", setting, "magnitude")
        print(f"  building: {label}", flush=True)
        work = copy.deepcopy(model)
        if harness.guard(row, "prune", lambda: harness.timed_row(row, lambda: prune(work))) is not None:
            finish(row, work, pattern)
        return row

    def l1_unstructured(m: nn.Module) -> bool:
        import torch.nn.utils.prune as torch_prune

        for lin in _targets(m).values():
            torch_prune.l1_unstructured(lin, "weight", amount=0.5)
            torch_prune.remove(lin, "weight")
        return True

    def weight_norm_2of4(m: nn.Module) -> bool:
        from torch.ao.pruning import WeightNormSparsifier

        sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        sparsifier.prepare(m, config=[{"tensor_fqn": f"{n}.weight"} for n in _targets(m)])
        sparsifier.step()
        sparsifier.squash_mask()
        return True

    peers = {"50%": ("torch.nn.utils.prune.l1_unstructured (amount 0.5, per layer)", l1_unstructured),
             "2:4": ("torch.ao.pruning WeightNormSparsifier (1×4 blocks, 2 zeros each)", weight_norm_2of4)}
    for setting, pattern in SETTINGS:
        mag = slimkit_row(f"slimkit Magnitude {setting}", setting, pattern, "magnitude", "Magnitude",
                          sparsity=0.5, scope="layer", keep_masks=False)
        peer_label, peer_fn = peers[setting]
        peer = torch_row(peer_label, setting, pattern, peer_fn)
        if mag.lm is not None and peer.lm is not None:
            differ = [n for n, lin in _targets(mag.lm).items()
                      if not torch.equal(lin.weight == 0, _targets(peer.lm)[n].weight == 0)]
            mag.notes.append(f"masks identical to {peer_label.split(' (')[0]}'s in {len(targets) - len(differ)} "
                             f"of {len(targets)} layers")
            if differ:
                problems.append(f"{mag.label}: masks differ from {peer_label} in {', '.join(differ[:5])}")
        rows += [mag, peer]
        rows.append(slimkit_row(f"slimkit Wanda {setting}", setting, pattern, "wanda", "Wanda", sparsity=0.5))
        rows.append(slimkit_row(f"slimkit SparseGPT {setting}", setting, pattern, "sparsegpt", "SparseGPT",
                                sparsity=0.5, block_size=128, dampening=0.01))
        # The reference code's order: every group of a block measured before any is pruned.
        rows.append(slimkit_row(f"slimkit Wanda {setting}, one pass per block", setting, pattern, "wanda", "Wanda",
                                sparsity=0.5, true_sequential=False))
        rows.append(slimkit_row(f"slimkit SparseGPT {setting}, one pass per block", setting, pattern, "sparsegpt",
                                "SparseGPT", sparsity=0.5, block_size=128, dampening=0.01, true_sequential=False))
        rows += [llmc_row(setting, pattern, "wanda"), llmc_row(setting, pattern, "sparsegpt")]
    return rows, info, problems


# ---------------------------------------------------------------------------------------
# Measuring and reporting
# ---------------------------------------------------------------------------------------


def baseline(rows: list[Row], setting: str | None) -> Row | None:
    """The magnitude row ratios are taken against: slimkit Magnitude, else the torch peer of the same setting."""
    for family in ("slimkit", "peer"):
        for r in rows:
            if r.setting == setting and r.method == "magnitude" and r.family == family and r.ppl is not None:
                return r
    return None


def increase_ratio(ppl: float, ppl_magnitude: float, ppl_fp32: float) -> float | None:
    """(ppl − ppl_fp32) / (ppl_magnitude − ppl_fp32): 1 = as bad as magnitude, 0 = fp32 quality.

    None when magnitude has no increase to compare with.
    """
    gap = ppl_magnitude - ppl_fp32
    return None if gap <= 0 else (ppl - ppl_fp32) / gap


def _ratio(rows: list[Row], row: Row) -> float | None:
    ref, fp32 = baseline(rows, row.setting), rows[0]
    if row.family == "fp32" or row.ppl is None or ref is None or fp32.ppl is None:
        return None
    return increase_ratio(row.ppl, ref.ppl, fp32.ppl)


def table(rows: list[Row], params: int) -> harness.Table:
    """The results table."""
    t = harness.Table(["variant", "sparsity", "perplexity (Δ vs fp32)", "increase over fp32", "× magnitude's increase",
                       "pruned layers' sparsity min / max", "exact", "method s", "s / M params", "others' CPU"],
                      align="llrrrrcrrr")
    fp32 = rows[0]
    for r in rows:
        if r.error:
            t.add(r.label, r.setting, f"**could not run** — {r.error}", None, None, None, None, None, None, None)
            continue
        ppl = None if r.ppl is None else f"{r.ppl:.3f}"
        if ppl and r is not fp32 and fp32.ppl:
            ppl += f" ({100 * (r.ppl / fp32.ppl - 1):+.2f}%)"
        inc = None if r is fp32 or r.ppl is None or fp32.ppl is None else f"{r.ppl - fp32.ppl:+.3f}"
        ratio = _ratio(rows, r)
        t.add(r.label, r.setting or "dense", ppl, inc, None if ratio is None else f"{ratio:.3f}×",
              None if r.sparsity is None else f"{100 * r.sparsity[0]:.2f}% / {100 * r.sparsity[1]:.2f}%",
              None if r.exact is None else ("yes" if r.exact else "**no**"),
              None if r.seconds is None else f"{r.seconds:.2f}",
              None if r.seconds is None else f"{r.seconds / (params / 1e6):.3f}",
              None if r.other_load is None else f"{100 * r.other_load:.0f}%")
    return t


def target_lines(rows: list[Row]) -> list[str]:
    """Each P4/P8 target with the measured number and met / missed."""
    lines = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    for r in rows:
        if r.family != "slimkit":
            continue
        if r.error:
            lines.append(f"- {r.label}: no measurement ({r.error})")
            continue
        checks = []
        if r.method in ("wanda", "sparsegpt"):
            ratio, need = _ratio(rows, r), MAX_RATIO[r.setting]
            ref = baseline(rows, r.setting)
            against = "magnitude's" if ref is None else f"{ref.label}'s"
            checks.append(f"perplexity increase {'—' if ratio is None else f'{ratio:.3f}'}× {against} ≤ {need}×: "
                          + verdict(ratio is not None and ratio <= need))
        if r.exact is not None:
            checks.append("exact sparsity: " + verdict(r.exact))
        if r.seconds is not None:
            checks.append(f"{r.seconds:.1f} s ≤ {MAX_SECONDS:.0f} s: " + verdict(r.seconds <= MAX_SECONDS))
            peers = [p for p in rows if p.family == "peer" and p.method == r.method and p.setting == r.setting
                     and p.seconds is not None and not p.error]
            if r.method != "magnitude" and peers:
                fastest = min(peers, key=lambda p: p.seconds)
                checks.append(f"no slower than {fastest.label} ({fastest.seconds:.1f} s): "
                              + verdict(r.seconds <= fastest.seconds))
            if r.method != "magnitude":
                rivals = [p for p in rows if p.family == "peer" and p.method == r.method and p.setting == r.setting
                          and p.ppl is not None]
                for p in rivals:
                    checks.append(f"perplexity {r.ppl:.3f} vs {p.label}'s {p.ppl:.3f}")
        lines.append(f"- {r.label}: " + "; ".join(checks))
    return lines


def render(rows: list[Row], info: dict[str, Any], env: dict[str, Any], seconds: float) -> str:
    """The BENCHMARKS.md section: environment, data, table, targets, reading notes and run notes."""
    n_layers, n_weights = info["pruned"]
    by_note: dict[str, list[str]] = {}
    for r in rows:
        for n in r.notes:
            by_note.setdefault(n, []).append(r.label)
    notes = [f"- {'; '.join(labels)}: {n}" for n, labels in by_note.items()]
    return "\n".join([
        (f"## 50% unstructured and 2:4 sparsity on {MODEL}: slimkit Magnitude / Wanda / SparseGPT beside "
         "torch.nn.utils.prune and torch.ao.pruning (P4, P8)"),
        "",
        f"The whole run took {seconds:.0f} s. " + harness.environment_line(env),
        "",
        f"Model: {MODEL} ({info['params'] / 1e6:.2f}M parameters); every row prunes the same {n_layers} decoder "
        f"Linear layers ({n_weights / 1e6:.2f}M weights), layer by layer, to 50% (unstructured, or 2:4 along each "
        f"row's inputs); lm_head and embeddings stay dense. Perplexity: {info['data'].description}. Calibration "
        f"(Wanda, SparseGPT): {info['calib']} (the corpus assigns each file to one split by its path: calibration "
        f"and eval are disjoint). Threads: {env['threads']}"
        + ("." if env["threads"] == THREADS else f", **not the protocol's {THREADS}**: timings are not comparable "
           "with protocol runs."),
        "",
        table(rows, info["params"]).to_markdown(),
        "",
        ("**Targets** (P4: Wanda's and SparseGPT's perplexity increase ≤ 0.33× magnitude's at 50%, ≤ 0.25× at 2:4, "
         "exact sparsity; P8: ≤ 60 s):"),
        "",
        *target_lines(rows),
        "",
        "**Reading the table.**",
        "",
        ("- × magnitude's increase = (ppl − ppl_fp32) / (ppl_magnitude − ppl_fp32) with slimkit Magnitude of the same "
         "sparsity (PyTorch fp32 perplexity throughout): 0 = fp32 quality, 1 = as bad as magnitude."),
        ("- Magnitude (slimkit, torch) at 50% prunes exactly half of each layer, anywhere in it; Wanda exactly half of "
         "each output row (|w|·‖x‖₂ over all calibration tokens, no weight update); SparseGPT exactly half of each "
         "layer, chosen per block of 128 columns by w²/[U]²_jj with the remaining weights updated (OBS). At 2:4 every "
         "method keeps 2 of every 4 consecutive input weights of each row."),
        ("- sparsity: exact zeros of each pruned weight as stored after the call (min / max over the layers); "
         "exact = every layer at exactly 50% and, at 2:4, every group of 4 with exactly 2 zeros, and no new zero "
         "in lm_head or the embedding (the embedding holds a few zeros of its own)."),
        (f"- method s: wall time of the pruning call alone ({env['threads']} thread(s)); s / M params divides by the "
         f"model's {info['params'] / 1e6:.2f}M parameters. others' CPU: share of the machine's CPU time other "
         "processes used meanwhile (this machine is shared, so timings are noisy)."),
        "",
        *(["Notes from the run:", "", *notes, ""] if notes else []),
    ]).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph on one line
    parser = harness.bench_parser("bench_sparse_coder", summary, quick="smoke test: fewer tokens and windows; never written")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (protocol: {THREADS}; fewer "
                        "only to get numbers on an overloaded machine, stated in the output)")
    parser.add_argument("--peer-path", default=None, help="a folder holding llm-compressor and its pinned dependencies "
                        "(pip install --target DIR ...); put on the peer child's PYTHONPATH only")
    args = parser.parse_args(argv)

    harness.set_threads(args.threads)
    torch.manual_seed(0)
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    start = time.perf_counter()
    print(f"[{MODEL}] building variants", flush=True)
    rows, info, problems = build_rows(settings, args.peer_path)
    harness.perplexity_rows(rows, info["data"].token_ids)
    seconds = time.perf_counter() - start
    markdown = render(rows, info, env, seconds)

    print()
    print(table(rows, info["params"]).to_text())
    print()
    print(markdown)
    # A method whose module is not written yet is stated in its row and does not block the write.
    own_failures = [f"{r.label}: {r.error}" for r in rows
                    if r.error and r.family != "peer" and "not available" not in r.error] + problems
    return harness.publish(args, SECTION, markdown, own_failures)


if __name__ == "__main__":
    sys.exit(main())
