"""Weight-only int8 on the zoo's stdlib-coder: quantize, save, reload, compare.

    python examples/int8_weight_only.py [OUT_DIR]
"""

import sys

import torch

import slimkit as sk

out_dir = sys.argv[1] if len(sys.argv) > 1 else "out/int8-coder"
model = sk.load("stdlib-coder")
ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))

# Every Linear (lm_head included) and the token embedding become int8 codes + one fp32 scale per row.
sk.quantize_(model, sk.RTN(bits=8, embeddings=True))
with torch.no_grad():
    before = model(input_ids=ids).logits
sk.save(model, out_dir)

reloaded = sk.load(out_dir)
with torch.no_grad():
    assert torch.equal(reloaded(input_ids=ids).logits, before), "reload must give identical logits"

report = sk.evaluate(out_dir, baseline="stdlib-coder")
print(report.to_markdown())
