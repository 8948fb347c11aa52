"""Magnitude pruning of the zoo's digits-cnn three ways, each fine-tuned with its masks on.

    python examples/prune_digits.py [--quick]

(a) one-shot: prune 70% of the conv and classifier weights (one global ranking), then
    fine-tune; the masks keep pruned weights at zero through every optimizer step.
(b) gradual: train while ``GradualPruner`` raises the sparsity 0 -> 70% on Zhu & Gupta's
    cubic schedule, then keep fine-tuning at 70%.
(c) lottery-ticket style: take (a)'s masks, re-initialize the network (fresh random
    weights), apply the masks and train from scratch with the mask fixed.

Prints test accuracy (540 images: one image is 0.0019) and sparsity for each; the masks
are baked in at the end (``sk.strip``) and the measured sparsity checked unchanged.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import slimkit as sk
from slimkit.pruning.magnitude import magnitude_masks
from slimkit.core.masks import apply_mask
from slimkit.zoo.digits import DigitsCNN, accuracy, load_digits_split

SPARSITY = 0.7


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch moved by up to one pixel (the augmentation digits-cnn was trained with)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train(model: torch.nn.Module, steps: int, lr: float, on_step=None, seed: int = 0) -> None:
    """The user's own loop: AdamW with weight decay, cosine schedule, batches of 64 with shifts."""
    x_train, y_train = load_digits_split("train")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        idx = torch.randint(0, len(x_train), (64,), generator=gen)
        loss = F.cross_entropy(model(random_shift(x_train[idx], gen)), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def config() -> sk.Magnitude:
    """70% of every conv and the classifier, ranked globally (the first conv has only 288 weights)."""
    return sk.Magnitude(sparsity=SPARSITY, scope="global")


def one_shot(dense: torch.nn.Module, steps: int) -> dict:
    """(a) prune once, then fine-tune with the masks on."""
    model = copy.deepcopy(dense)
    sk.prune_(model, config())
    x_test, y_test = load_digits_split("test")
    pruned = accuracy(model, x_test, y_test)
    train(model, steps, lr=1e-3)
    return {"pruned": pruned, "finetuned": accuracy(model, x_test, y_test),
            "sparsity": sk.sparsity_report(model).overall, "model": model}


def gradual(dense: torch.nn.Module, steps: int) -> dict:
    """(b) prune during training: 0 -> 70% over the first 60% of the steps, then fine-tune at 70%."""
    model = copy.deepcopy(dense)
    end = int(steps * 0.6)
    schedule = sk.Gradual(final_sparsity=SPARSITY, begin_step=0, end_step=end, frequency=max(1, end // 10),
                          scope="global")
    pruner = sk.GradualPruner(model, schedule)
    train(model, steps, lr=1e-3, on_step=pruner.step)
    assert pruner.done
    x_test, y_test = load_digits_split("test")
    return {"finetuned": accuracy(model, x_test, y_test), "sparsity": sk.sparsity_report(model).overall,
            "model": model}


def lottery(dense: torch.nn.Module, steps: int) -> dict:
    """(c) the one-shot masks on freshly initialized weights, trained from scratch with the mask fixed."""
    masks = magnitude_masks(dense, config())
    torch.manual_seed(1)
    model = DigitsCNN(dense.arch_config())  # new random init of the same architecture
    for name, keep in masks.items():
        apply_mask(model.get_submodule(name), keep)
    train(model, steps, lr=4e-3, seed=1)
    x_test, y_test = load_digits_split("test")
    return {"finetuned": accuracy(model, x_test, y_test), "sparsity": sk.sparsity_report(model).overall,
            "model": model}


def run(quick: bool = False) -> dict:
    """Run the three flows; returns their accuracies, sparsities and models (masks still attached)."""
    torch.manual_seed(0)
    dense = sk.load("digits-cnn")
    x_test, y_test = load_digits_split("test")
    scale = 0.25 if quick else 1.0
    return {
        "dense": accuracy(dense, x_test, y_test),
        "one-shot": one_shot(dense, int(300 * scale)),
        "gradual": gradual(dense, int(500 * scale)),
        "lottery": lottery(dense, int(900 * scale)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(quick=args.quick)
    print(f"dense digits-cnn: test accuracy {results['dense']:.4f}")
    print(f"{'flow':<36} {'accuracy':>9} {'sparsity':>9}")
    print(f"{'(a) one-shot 70%, before fine-tune':<36} {results['one-shot']['pruned']:>9.4f} "
          f"{results['one-shot']['sparsity']:>9.2%}")
    for key, label in (("one-shot", "(a) one-shot 70% + fine-tune"), ("gradual", "(b) gradual 0->70% + fine-tune"),
                       ("lottery", "(c) fixed mask, retrained")):
        r = results[key]
        model = sk.strip(r["model"])  # bake the masks in; the zeros must survive
        assert abs(sk.sparsity_report(model).overall - r["sparsity"]) < 1e-12
        print(f"{label:<36} {r['finetuned']:>9.4f} {r['sparsity']:>9.2%}")
