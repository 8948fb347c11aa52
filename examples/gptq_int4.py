"""4-bit GPTQ of the zoo's stdlib-coder: packed int4 checkpoint, MatMulNBits ONNX, compressed-tensors folder.

    python examples/gptq_int4.py [OUT_DIR]

Calibrates on the calibration split (block by block: each decoder block sees the already
quantized blocks' outputs), saves the int4 checkpoint and prints its measured bits per
weight, checks that it reloads with identical logits, exports ONNX Runtime's int4 kernel
(MatMulNBits carrying slimkit's own codes) and a compressed-tensors folder that
transformers loads, and prints held-out perplexity of fp32, RTN and GPTQ.
"""

import sys
from pathlib import Path

import torch

import slimkit as sk
from slimkit.tasks.metrics import perplexity
from slimkit.evaluation.suite import bits_per_weight, resolve_eval_data
from slimkit.export.compressed_tensors import export_compressed_tensors
from slimkit.export.onnx import check_onnx, export_onnx
from slimkit.zoo.corpus import load_split

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/gptq-int4-coder")
torch.set_num_threads(2)
fp32 = sk.load("stdlib-coder")
calib = sk.CalibrationData.from_texts(load_split("calibration"), sk.tokenizer_of(fp32), seq_len=256, n=64)
eval_ids = resolve_eval_data(fp32, max_tokens=16384).token_ids

rtn = sk.quantize_(sk.load("stdlib-coder"), sk.RTN(bits=4, group_size=128, ignore=["lm_head"]))
gptq = sk.quantize_(sk.load("stdlib-coder"), sk.GPTQ(bits=4, group_size=128), data=calib)
for name, model in (("fp32", fp32), ("RTN int4 g128", rtn), ("GPTQ int4 g128", gptq)):
    print(f"{name:>15}: held-out perplexity {perplexity(model, eval_ids).perplexity:.3f}")

sk.save(gptq, out / "model")
print(f"bits per weight of the int4 layers: {bits_per_weight(gptq, quantized_only=True):.3f}")
ids = eval_ids[:256].unsqueeze(0)
with torch.no_grad():
    same = torch.equal(sk.load(out / "model")(input_ids=ids).logits, gptq(input_ids=ids).logits)
print(f"reloaded checkpoint gives identical logits: {same}")

onnx_path = export_onnx(gptq, out / "model.onnx").path
print(f"ONNX (MatMulNBits) vs PyTorch, max |logit difference|: {check_onnx(gptq, onnx_path):.4f}")
ct = export_compressed_tensors(gptq, out / "compressed-tensors")
print(f"compressed-tensors folder: {ct.path} ({ct.size_bytes:,} bytes)")
