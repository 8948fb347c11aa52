"""Run llm-compressor's Wanda or SparseGPT on stdlib-coder in a child process (a peer for bench_sparse_coder).

    python -m benchmarks.peer_llmcompressor --method wanda|sparsegpt [--pattern 2:4] --samples N --out DIR

llm-compressor pins transformers and compressed-tensors versions other than slimkit's
test environment, so it lives in its own folder (``bench_sparse_coder --peer-path DIR``
puts DIR on this child's ``PYTHONPATH`` only). The child builds the same calibration
windows as the parent (``CalibrationData.from_texts`` on the stdlib calibration split,
seq 256, same count), runs ``llmcompressor.oneshot`` with the modifier's documented
arguments on the decoder blocks' projections (lm_head and embeddings stay dense, as in
slimkit's rows), and writes ``DIR/model.safetensors`` plus ``DIR/run.json`` (wall seconds
of ``oneshot`` alone). The parent measures perplexity and sparsity itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_llmcompressor", description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--pattern", default=None, help="N:M mask structure, e.g. 2:4 (default: unstructured)")
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import pyarrow as pa
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import save_file

    import slimkit as sk
    from slimkit.zoo.corpus import load_split

    model = sk.load("stdlib-coder").eval()
    calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model),
                                          seq_len=args.seq_len, n=args.samples)
    ids = torch.cat([(b["input_ids"] if isinstance(b, dict) else b).reshape(-1, args.seq_len) for b in calib])
    # Built from an arrow table with a fixed fingerprint: datasets' own hashing fails on this pyarrow.
    table = pa.table({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    dataset = Dataset(table, fingerprint="slimkit-stdlib-calibration")
    kwargs = {"sparsity": 0.5, "targets": [r"re:model\.layers\.\d+\..*_proj$"]}
    if args.pattern:
        kwargs["mask_structure"] = args.pattern
    modifier = (WandaPruningModifier if args.method == "wanda" else SparseGPTModifier)(**kwargs)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=len(ids),
            max_seq_length=args.seq_len)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    save_file(state, str(args.out / "model.safetensors"))
    from importlib import metadata

    (args.out / "run.json").write_text(json.dumps({"seconds": seconds, "version": metadata.version("llmcompressor")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
