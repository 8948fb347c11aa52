"""Static int8 PTQ of the zoo's stdlib-coder, exported to ONNX and run on ONNX Runtime's int8 kernels.

    python examples/static_int8_onnx.py [OUT_DIR]

Calibrates the input range of every Linear on the calibration split, exports QDQ int8 with
slimkit's own scales, checks ORT against the PyTorch fake-quant model, and prints
held-out perplexity and the median ORT latency of fp32 and int8 (2 threads, batch 8 x 256).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

import slimkit as sk
from slimkit.tasks.metrics import perplexity
from slimkit.evaluation.suite import resolve_eval_data
from slimkit.export.onnx import check_onnx, export_onnx, ort_session
from slimkit.zoo.corpus import load_split

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/static-int8-coder")
torch.set_num_threads(2)
fp32 = sk.load("stdlib-coder")
model = sk.load("stdlib-coder")
calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(model), seq_len=256, n=64)

# Weights int8 per output channel; each Linear input one frozen uint8 scale chosen by the MSE observer;
# the embedding table as int8 rows.
sk.quantize_(model, sk.StaticQuant(act_observer="mse", embeddings=True), data=calib)
paths = {"fp32": export_onnx(fp32, out / "fp32.onnx").path, "int8": export_onnx(model, out / "int8.onnx").path}
print(f"ORT vs PyTorch fake-quant, max |logit difference|: {check_onnx(model, paths['int8']):.4f}")

eval_ids = resolve_eval_data(fp32, max_tokens=16384).token_ids
batch = eval_ids[: 8 * 256].reshape(8, 256).numpy()
feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}


class OrtLM(torch.nn.Module):
    """An ORT session that perplexity() can call like a causal LM."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, input_ids):
        ids = input_ids.numpy()
        return torch.from_numpy(self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0])


for name, path in paths.items():
    session = ort_session(path, threads=2)
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    ppl = perplexity(OrtLM(session), eval_ids).perplexity
    print(f"{name}: {path.stat().st_size / 1e6:.1f} MB, perplexity {ppl:.3f} (16k eval tokens), "
          f"ORT median {sorted(times)[5] * 1000:.1f} ms at 8 x 256")
