"""S1: peak memory of block-by-block GPTQ on a random-init decoder whose weights exceed 3 GB.

Three steps, each in its own process so one's memory never counts for another:

1. ``make``: write a random-init Llama checkpoint (float32, >= 3 GB of weights) block by
   block with slimkit's incremental safetensors writer, never holding the whole model.
2. ``run``: ``slimkit.core.streaming.compress_checkpoint`` with GPTQ (int4, group 128):
   each block is read from safetensors just before it is quantized and written out and
   released right after. The child reports its peak RSS (``VmHWM``), its RSS after
   imports, slimkit's printed memory estimate and the wall time.
3. ``check``: the output reloads with ``slimkit.load`` and every block Linear is int4.

The budget is the issue's: one decoder block (float32) + the calibration activations +
300 MB. Random weights make this a memory and plumbing measurement only, never a quality one.

    python -m benchmarks.bench_stream_memory            # full (3.5 GB model; ~10 min)
    python -m benchmarks.bench_stream_memory --quick    # a 0.2 GB model, never written
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

SECTION = "s1-stream-memory"
THREADS = 2
MB = 2**20

FULL = dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=8192, samples=8, seq_len=256)
QUICK = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=2048, samples=4, seq_len=64)


def _config(settings: dict):
    from transformers import LlamaConfig

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return LlamaConfig(max_position_embeddings=1024, architectures=["LlamaForCausalLM"],
                       tie_word_embeddings=False, **{k: settings[k] for k in keys})


def make_checkpoint(folder: Path, settings: dict) -> dict:
    """Write a random-init Llama of ``settings`` to ``folder`` one module at a time; returns its sizes."""
    import torch
    from transformers import LlamaForCausalLM

    from slimkit.core.streaming import SafetensorsWriter

    folder.mkdir(parents=True, exist_ok=True)
    config = _config(settings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    writer = SafetensorsWriter(folder / "model.safetensors")
    n_params = 0
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm weights
            value = torch.ones(p.shape)
        else:
            value = torch.randn(p.shape, generator=gen) * 0.02
        writer.add(name, value)
        n_params += value.numel()
        del value
    writer.close()
    config.save_pretrained(folder)
    return {"params": n_params, "bytes": (folder / "model.safetensors").stat().st_size}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(src: Path, out: Path, settings: dict) -> dict:
    """Block-by-block GPTQ of ``src`` into ``out`` in this process; returns memory and time."""
    import torch

    from slimkit.core.calibration import CalibrationData
    from slimkit.core.registry import Context
    from slimkit.api import compress_checkpoint
    from slimkit.core.streaming import lazy_model, memory_estimate
    from slimkit.quantization.gptq import GPTQ

    harness.set_threads(THREADS)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, settings["vocab_size"], (settings["samples"], settings["seq_len"]), generator=gen)
    data = CalibrationData.from_tensors(ids, batch_size=4, key="input_ids")
    estimate = memory_estimate(lazy_model(src), data)  # imports transformers and the model class
    rss_after_imports = _rss_mb("VmRSS")
    ctx = Context()
    start = time.perf_counter()
    compress_checkpoint(src, out, GPTQ(bits=4, group_size=128, true_sequential=False), data, ctx)
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": _rss_mb("VmHWM"), "rss_after_imports_mb": rss_after_imports, "seconds": seconds,
            "block_mb": estimate.block / MB, "activations_mb": estimate.activations / MB,
            "statistics_mb": estimate.statistics / MB, "estimate_peak_mb": estimate.peak / MB,
            "estimate_line": estimate.describe(), "notes": ctx.notes[-3:]}


def check_output(out: Path) -> dict:
    """Reload the streamed checkpoint and count its int4 layers."""
    import slimkit
    from slimkit.quantization.modules import QuantLinear

    model = slimkit.load(out)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return {"int4_layers": sum(m.bits == 4 for m in quant),
            "bits_per_weight": sum(m.weight_bits_per_element() for m in quant) / max(len(quant), 1),
            "out_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


def _child(step: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_stream_memory", "--child", step, *args],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(made: dict, run: dict, checked: dict, settings: dict, env: dict) -> str:
    budget = run["block_mb"] + run["activations_mb"] + 300
    met = "met" if run["peak_rss_mb"] <= budget else "missed"
    t = harness.Table(["measure", "value"], align="lr")
    t.add("model", f"random-init Llama, {made['params'] / 1e6:.0f} M parameters, "
                   f"{made['bytes'] / 1e9:.2f} GB float32 safetensors")
    t.add("method", f"GPTQ int4 g128, one Hessian pass per block, {settings['samples']} x {settings['seq_len']} "
                    f"random calibration tokens")
    t.add("one decoder block (float32)", f"{run['block_mb']:.0f} MB")
    t.add("calibration activations (block inputs + outputs, one batch of attention scores)",
          f"{run['activations_mb']:.0f} MB")
    t.add("budget: block + activations + 300 MB", f"{budget:.0f} MB")
    t.add("**peak RSS of the run (VmHWM)**", f"**{run['peak_rss_mb']:.0f} MB** ({met})")
    t.add("of which RSS before the first block (python, torch, transformers, the meta model)",
          f"{run['rss_after_imports_mb']:.0f} MB")
    t.add("peak RSS above that", f"{run['peak_rss_mb'] - run['rss_after_imports_mb']:.0f} MB")
    t.add("slimkit's estimate before the run", f"{run['estimate_peak_mb']:.0f} MB (+ imports)")
    t.add("wall time", f"{run['seconds']:.0f} s ({run['seconds'] / (made['params'] / 1e6):.3f} s per M parameters)")
    t.add("output", f"{checked['int4_layers']} int4 layers, {checked['bits_per_weight']:.3f} bits/weight, "
                    f"{checked['out_bytes'] / 1e9:.2f} GB on disk; reloads with slimkit.load")
    return (f"### S1: memory of block-by-block GPTQ on a {made['bytes'] / 1e9:.1f} GB model\n\n"
            f"{harness.environment_line(env)}\n\n{t.to_markdown()}\n\n"
            f"Printed before the run: `{run['estimate_line']}`. The whole float32 model would need "
            f"{made['bytes'] / MB:.0f} MB in memory; the streamed run holds one block at a time.\n")


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser("bench_stream_memory", __doc__.split("\n")[0], quick="a small model; never written",
                                  no_write="print only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        step, *rest = args.child
        settings = json.loads(rest[-1])
        if step == "make":
            result = make_checkpoint(Path(rest[0]), settings)
        elif step == "run":
            result = run_child(Path(rest[0]), Path(rest[1]), settings)
        else:
            result = check_output(Path(rest[0]))
        print(json.dumps(result))
        return 0

    harness.set_threads(THREADS)
    settings = QUICK if args.quick else FULL
    env = harness.environment()
    with tempfile.TemporaryDirectory(prefix="slimkit-s1-", dir="/tmp") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        blob = json.dumps(settings)
        print("[s1] writing the random-init checkpoint", flush=True)
        made = _child("make", str(src), blob)
        print(f"[s1] {made['bytes'] / 1e9:.2f} GB written; streaming GPTQ", flush=True)
        run = _child("run", str(src), str(out), blob)
        print("[s1] checking the output", flush=True)
        checked = _child("check", str(out), blob)
    markdown = render(made, run, checked, settings, env)
    print(markdown)
    return harness.publish(args, SECTION, markdown, [])


if __name__ == "__main__":
    sys.exit(main())
