"""Trainer under torchrun, for test_trainer.py's multi-process test.

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/distillation/ddp_worker.py OUTDIR

Each rank trains the same small MLP (no batch-dependent layers, so N processes must equal
one) on the same deterministic global batches, then writes ``OUTDIR/rank<r>.json`` (its rank,
world size, how often it evaluated, its history) and rank 0 ``OUTDIR/final.safetensors``.
The test imports ``build_model``, ``batch_at`` and ``settings`` to run the same in-process
with one process and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

if __name__ == "__main__":  # run as a script by torchrun: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from slimkit.distillation.trainer import Trainer, TrainSettings, init_distributed  # noqa: E402

GLOBAL_BATCH = 8
FEATURES = 6


class MLPRegression(nn.Module):
    """A 2-layer MLP whose forward(batch) returns its MSE loss with a part for the history."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.GELU(), nn.Linear(16, 1))

    def forward(self, batch: dict) -> SimpleNamespace:
        """The MSE of the prediction against ``batch["y"]``; ``parts`` reports it and a weight norm."""
        loss = nn.functional.mse_loss(self.net(batch["x"]), batch["y"])
        return SimpleNamespace(loss=loss, parts={"mse": loss.detach(), "w0": float(self.net[0].weight.detach().norm())})


def build_model() -> MLPRegression:
    """The same initial weights in every process and in the test."""
    torch.manual_seed(0)
    return MLPRegression()


def batch_at(step: int) -> dict:
    """The global batch of ``step``: a pure function of the step (a seeded generator), plus a passed-through tag."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, FEATURES, generator=g)
    y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(GLOBAL_BATCH, 1, generator=g)
    return {"x": x, "y": y, "tag": "train"}


def evaluate(module: nn.Module) -> dict[str, float]:
    """The MSE on a fixed held-out batch."""
    batch = batch_at(10_000)
    return {"mse": float(nn.functional.mse_loss(module.net(batch["x"]), batch["y"]))}


def settings(checkpoint_dir: Path) -> TrainSettings:
    """5 AdamW steps on a global batch of 8 in 2 micro-batches, clipped, with warmup and evaluations."""
    return TrainSettings(steps=5, lr=1e-2, weight_decay=0.01, optimizer="adamw", schedule="cosine",
                         warmup_steps=1, batch_size=GLOBAL_BATCH, grad_accum=2, max_grad_norm=0.5,
                         eval_every=2, checkpoint_every=2, checkpoint_dir=str(checkpoint_dir), seed=3)


def main(outdir: Path) -> None:
    """Train under the process group torchrun set up and write what the test compares."""
    import torch.distributed as dist

    from safetensors.torch import save_file

    torch.set_num_threads(1)
    rank, world = init_distributed()
    model = build_model()
    evals: list[int] = []

    def counted(module: nn.Module) -> dict[str, float]:
        evals.append(1)
        return evaluate(module)

    result = Trainer(model, settings(outdir / "ckpt"), batch_at, evaluate=counted).fit()
    info = {"rank": rank, "world": world, "world_size": result.world_size, "evals": len(evals),
            "history": result.history, "checkpoint": result.checkpoint}
    (outdir / f"rank{rank}.json").write_text(json.dumps(info), encoding="utf-8")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(outdir / "final.safetensors"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
