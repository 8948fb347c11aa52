"""slimkit.distillation.trainer: schedule, batching, accumulation, checkpoints/resume, divergence, DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.core.errors import ConfigError, DataError, SlimkitError, UnsupportedError
from slimkit.distillation.trainer import (
    CheckpointError,
    Trainer,
    TrainingDiverged,
    TrainSettings,
    batch_rows,
    load_checkpoint_weights,
    scheduled_lr,
    split_batch,
)

REPO = Path(__file__).resolve().parents[2]


# --- tiny modules and data -----------------------------------------------------------------


class Regression(nn.Module):
    """Linear(4, 1) whose forward((x, y)) is the mean squared error."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1).to(dtype)

    def forward(self, batch):
        x, y = batch
        return ((self.linear(x) - y) ** 2).mean()


def regression_data(rows: int = 16, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 4, generator=g, dtype=dtype)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=dtype) + 0.25
    return x, y


class TiedDropoutNet(nn.Module):
    """A 6→6→1 net whose two hidden layers are ONE Linear (tied tensors in state_dict), with dropout (RNG)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 6)
        self.out = self.inp  # tied: state_dict has inp.weight and out.weight, one memory
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(6, 1)

    def forward(self, batch):
        h = self.drop(torch.relu(self.out(torch.relu(self.inp(batch["x"])))))
        loss = nn.functional.mse_loss(self.head(h), batch["y"])
        return SimpleNamespace(loss=loss, parts={"mse": loss.detach(), "one": 1.0})


def tied_batch_at(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=g)
    return {"x": x, "y": x.sum(1, keepdim=True), "note": "kept"}


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# --- the schedule --------------------------------------------------------------------------

# steps=10, warmup=4, lr=2: warmup 2·(i+1)/5; then p = (i−4)/5 over i = 4..9, final lr 0.2.
WARMUP = [0.4, 0.8, 1.2, 1.6]
HAND = {
    # 0.2 + 1.8·½·(1 + cos(πp)), p = 0, .2, .4, .6, .8, 1; cos 36° = 0.809017, cos 72° = 0.309017
    "cosine": WARMUP + [2.0, 1.8281152949, 1.3781152949, 0.8218847051, 0.3718847051, 0.2],
    "linear": WARMUP + [2.0, 1.64, 1.28, 0.92, 0.56, 0.2],  # 2 − 1.8·p
    "constant": WARMUP + [2.0] * 6,
}


@pytest.mark.parametrize("schedule", sorted(HAND))
def test_lr_at_matches_hand_values(schedule):
    s = TrainSettings(steps=10, lr=2.0, warmup_steps=4, schedule=schedule)
    got = [s.lr_at(i) for i in range(10)]
    assert got == pytest.approx(HAND[schedule], abs=1e-9)


def test_lr_at_edges():
    assert TrainSettings(steps=1, lr=0.5).lr_at(0) == 0.5  # a single step runs at the peak
    assert [TrainSettings(steps=3, lr=1.0).lr_at(i) for i in range(3)] == pytest.approx([1.0, 0.55, 0.1])
    assert [TrainSettings(steps=2, lr=1.0, warmup_steps=1).lr_at(i) for i in range(2)] == pytest.approx([0.5, 1.0])
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        TrainSettings(steps=10).lr_at(10)
    with pytest.raises(ConfigError, match="schedule"):
        scheduled_lr(0, 1.0, 10, 0, "exponential")


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 60), warmup_frac=st.floats(0, 0.99), lr=st.floats(1e-5, 10.0),
       schedule=st.sampled_from(["cosine", "linear", "constant"]))
def test_lr_schedule_shape(steps, warmup_frac, lr, schedule):
    warmup = min(int(warmup_frac * steps), steps - 1)
    values = [scheduled_lr(i, lr, steps, warmup, schedule) for i in range(steps)]
    assert all(0 < v <= lr * (1 + 1e-12) for v in values)
    ramp, decay = values[:warmup + 1], values[warmup:]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))  # strictly rising warmup up to the peak
    assert decay[0] == pytest.approx(lr)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(decay, decay[1:]))  # never rises again
    if schedule != "constant" and len(decay) > 1:
        assert decay[-1] == pytest.approx(0.1 * lr)


# --- batches -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 4), accum=st.integers(1, 4), per=st.integers(1, 3))
def test_split_batch_is_contiguous_share(world, accum, per):
    rows = world * accum * per
    x = torch.arange(rows * 2).reshape(rows, 2)
    batch = {"x": x, "ids": (x[:, 0], [x[:, 1]]), "name": "keep"}
    collected = []
    for rank in range(world):
        micro = split_batch(batch, rank, world, accum)
        assert len(micro) == accum
        for m in micro:
            assert m["name"] == "keep" and m["x"].shape == (per, 2)
            assert torch.equal(m["ids"][0], m["x"][:, 0]) and torch.equal(m["ids"][1][0], m["x"][:, 1])
            collected.append(m["x"])
        # This rank's rows are exactly its contiguous block of the global batch.
        share = torch.cat([m["x"] for m in micro])
        assert torch.equal(share, x[rank * rows // world:(rank + 1) * rows // world])
    assert torch.equal(torch.cat(collected), x)


def test_split_batch_errors_name_the_numbers():
    with pytest.raises(DataError, match=r"10 rows.*world size 3 × grad_accum 2 = 6"):
        split_batch(torch.zeros(10, 3), 0, 3, 2)
    with pytest.raises(DataError, match=r"batch\['y'\] has 3 rows but batch\['x'\] has 4"):
        batch_rows({"x": torch.zeros(4, 2), "y": torch.zeros(3)})
    with pytest.raises(DataError, match="0-dim"):
        batch_rows((torch.zeros(4), torch.tensor(1.0)))
    with pytest.raises(DataError, match="at least one tensor"):
        batch_rows({"a": 1})


# --- training ------------------------------------------------------------------------------


def test_fit_lowers_loss_and_reports():
    model = Regression()
    data = regression_data()
    s = TrainSettings(steps=150, lr=0.05, batch_size=16, warmup_steps=5)
    result = Trainer(model, s, lambda step: data).fit()
    first = ((Regression().linear(data[0]) - data[1]) ** 2).mean().item()
    assert first > 1.0
    assert result.final_loss < 0.01 < first
    assert result.steps == 150 and len(result.history) == 150 and result.world_size == 1
    assert [h["step"] for h in result.history] == list(range(1, 151))
    assert [h["lr"] for h in result.history] == pytest.approx([s.lr_at(i) for i in range(150)])
    assert result.checkpoint is None and result.resumed_from == 0 and result.seconds > 0
    assert model.training  # the mode it came in


def test_grad_accum_sgd_equals_full_batch_hand_loop():
    x, y = regression_data(16)
    s = TrainSettings(steps=12, lr=0.05, optimizer="sgd", schedule="cosine", warmup_steps=2, weight_decay=0.1,
                      batch_size=16, grad_accum=2, max_grad_norm=None)
    model = Regression()
    Trainer(model, s, lambda step: (x, y)).fit()

    # The reference: full batch, SGD with momentum 0.9 and L2 weight decay written out.
    ref = Regression()
    params = [ref.linear.weight, ref.linear.bias]
    buffers = [None, None]
    for step in range(12):
        loss = ((ref.linear(x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                g = g + 0.1 * p
                buffers[i] = g.clone() if buffers[i] is None else 0.9 * buffers[i] + g
                p -= s.lr_at(step) * buffers[i]
    assert_same(weights(model), weights(ref), atol=1e-6)
    # And it really moved: the trained weights are far from the start.
    assert (model.linear.weight - Regression().linear.weight).abs().max() > 0.1


def test_grad_accum_matches_single_micro_batch_adamw_with_clipping():
    x, y = regression_data(16, torch.float32)
    runs = []
    for accum in (1, 4):
        model = Regression(torch.float32)
        s = TrainSettings(steps=8, lr=0.1, batch_size=16, grad_accum=accum, max_grad_norm=0.3)
        runs.append((Trainer(model, s, lambda step: (x, y)).fit(), weights(model)))
    assert_same(runs[0][1], runs[1][1], atol=1e-5)
    assert [h["grad_norm"] for h in runs[0][0].history] == pytest.approx(
        [h["grad_norm"] for h in runs[1][0].history], rel=1e-4)
    assert runs[0][0].history[0]["grad_norm"] > 0.3  # clipping was active


def test_trainable_parameters_and_prepare():
    class WithHooks(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen_by_choice = nn.Linear(4, 4)
            self.proj = None
            self.prepared = []

        def prepare(self, batch):
            self.prepared.append(batch[0].shape)
            self.proj = nn.Linear(4, 1).double()  # created from the data, before the optimizer

        def trainable_parameters(self):
            return self.proj.parameters()

        def forward(self, batch):
            x, y = batch
            return ((self.proj(self.frozen_by_choice(x.float()).double()) - y) ** 2).mean()

    model = WithHooks()
    before = weights(model.frozen_by_choice)
    Trainer(model, TrainSettings(steps=3, batch_size=16, grad_accum=2), lambda s: regression_data()).fit()
    assert model.prepared == [torch.Size([8, 4])]  # once, with the first micro-batch
    assert_same(weights(model.frozen_by_choice), before)  # not in trainable_parameters: untouched
    assert model.proj.weight.grad is not None


# --- checkpoints and resume ----------------------------------------------------------------


class Interrupt(Exception):
    pass


def interrupt_after(step: int):
    def progress(text: str, fraction: float) -> None:
        if text.startswith(f"step {step}/"):
            raise Interrupt(text)
    return progress


@pytest.mark.parametrize("form, optimizer", [("callable", "adamw"), ("iterable", "adamw"), ("callable", "sgd")])
def test_resume_equals_uninterrupted_run(tmp_path, form, optimizer):
    batches = [tied_batch_at(i) for i in range(4)]  # the iterable form cycles 4 batches over 10 steps
    data = tied_batch_at if form == "callable" else batches
    common = dict(steps=10, lr=0.02, warmup_steps=2, batch_size=8, grad_accum=2, max_grad_norm=1.0, seed=5,
                  optimizer=optimizer, weight_decay=0.01)

    straight = TiedDropoutNet()
    full = Trainer(straight, TrainSettings(**common), data).fit()

    ckpt = tmp_path / "ckpt"
    first = TiedDropoutNet()
    with pytest.raises(Interrupt):  # a crash after step 7: the checkpoint of step 6 remains
        Trainer(first, TrainSettings(**common, checkpoint_every=3, checkpoint_dir=str(ckpt)), data,
                progress=interrupt_after(7)).fit()
    assert sorted(os.listdir(ckpt)) == ["last"]  # atomic: no temporary or old folders left
    assert sorted(os.listdir(ckpt / "last")) == ["model.safetensors", "optimizer.safetensors", "trainer.json"]
    state = json.loads((ckpt / "last" / "trainer.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6 and state["settings"]["batch_size"] == 8

    resumed = TiedDropoutNet()
    messages = []
    result = Trainer(resumed, TrainSettings(**common, checkpoint_every=3, checkpoint_dir=ckpt, resume=True), data,
                     progress=lambda text, frac: messages.append(text)).fit()
    assert messages[0].startswith("resumed from") and "step 6/10" in messages[0]
    assert result.resumed_from == 6 and result.steps == 10
    assert_same(weights(resumed), weights(straight))  # bit for bit: weights, Adam state, RNG, data position
    assert resumed.out is resumed.inp  # the tie survives the reload
    assert [h["loss"] for h in result.history] == [h["loss"] for h in full.history]
    assert json.loads((ckpt / "last" / "trainer.json").read_text())["step"] == 10
    assert sorted(os.listdir(ckpt)) == ["last"]
    assert result.checkpoint == str(ckpt / "last")


def test_checkpoint_files_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    model = TiedDropoutNet()
    Trainer(model, TrainSettings(steps=2, batch_size=8, checkpoint_dir=str(tmp_path)), tied_batch_at).fit()
    with safe_open(str(tmp_path / "last" / "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "inp.weight" in keys and "out.weight" not in keys  # the tied tensor is stored once
    assert json.loads(meta["slimkit.aliases"]) == {"out.weight": "inp.weight", "out.bias": "inp.bias"}
    with safe_open(str(tmp_path / "last" / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"rng.cpu", "state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= keys
    fresh = TiedDropoutNet()
    assert load_checkpoint_weights(fresh, tmp_path) == 2
    assert_same(weights(fresh), weights(model))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    messages = []
    s = TrainSettings(steps=3, batch_size=8, checkpoint_dir=str(tmp_path / "none"), resume=True)
    result = Trainer(TiedDropoutNet(), s, tied_batch_at, progress=lambda t, f: messages.append((t, f))).fit()
    assert "starting fresh" in messages[0][0] and messages[0][1] == 0.0
    assert result.resumed_from == 0 and (tmp_path / "none" / "last" / "trainer.json").exists()


def test_resume_refuses_bad_checkpoints(tmp_path):
    s = TrainSettings(steps=4, batch_size=8, checkpoint_dir=str(tmp_path))
    Trainer(TiedDropoutNet(), s, tied_batch_at).fit()
    last = tmp_path / "last"

    def resume(**changes):
        kwargs = {**s.to_dict(), "resume": True, **changes}
        del kwargs["type"], kwargs["version"]
        return Trainer(changes.pop("module", None) or TiedDropoutNet(), TrainSettings(**kwargs), tied_batch_at).fit()

    with pytest.raises(ConfigError, match=r"TrainSettings\.steps: .*step 4, past steps \(3\)"):
        resume(steps=3)
    with pytest.raises(ConfigError, match=r"TrainSettings\.batch_size: .*batch_size=8"):
        Trainer(TiedDropoutNet(), TrainSettings(steps=4, batch_size=4, checkpoint_dir=str(tmp_path), resume=True),
                lambda step: {k: v[:4] if torch.is_tensor(v) else v for k, v in tied_batch_at(step).items()}).fit()
    with pytest.raises(ConfigError, match=r"TrainSettings\.optimizer"):
        resume(optimizer="sgd")

    class Wider(TiedDropoutNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 2)

    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match the module"):
        Trainer(Wider(), TrainSettings(steps=5, batch_size=8, checkpoint_dir=str(tmp_path), resume=True),
                lambda step: {**tied_batch_at(step), "y": torch.zeros(8, 2)}).fit()
    assert resume(steps=6).resumed_from == 4  # a longer run continues the same checkpoint

    from safetensors.torch import save_file

    good = (last / "optimizer.safetensors").read_bytes()
    save_file({"state.0.exp_avg": torch.zeros(3, 3), "rng.cpu": torch.get_rng_state()},
              str(last / "optimizer.safetensors"))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: state\.0\.exp_avg has shape \(3, 3\)"):
        resume(steps=8)
    (last / "optimizer.safetensors").write_bytes(good)
    (last / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read"):
        resume(steps=8)
    (last / "trainer.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match=r"trainer\.json: cannot be read as JSON"):
        resume(steps=8)


# --- divergence ----------------------------------------------------------------------------


class NaNAt(Regression):
    """Regression whose forward returns NaN (in the loss and the 'mse' part) from call ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, batch):
        self.calls += 1
        loss = super().forward(batch)
        if self.calls >= self.at:
            loss = loss * float("nan")
        return {"loss": loss, "parts": {"mse": loss.detach(), "reg": torch.tensor(0.5)}}


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path):
    data = regression_data()
    model = NaNAt(7)
    snapshots = {}

    def progress(text, fraction):
        snapshots[round(fraction * 10)] = weights(model)

    s = TrainSettings(steps=10, lr=0.05, schedule="constant", batch_size=16, checkpoint_every=5,
                      checkpoint_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged) as info:
        Trainer(model, s, lambda step: data, progress=progress).fit()
    text = str(info.value)
    assert "step 7" in text and "mse=nan" in text and "reg" not in text.split("non-finite")[1].split(";")[0]
    assert f"{tmp_path / 'last'} at step 5" in text
    assert info.value.step == 7 and info.value.checkpoint_step == 5 and "mse" in info.value.bad_parts
    assert sorted(snapshots) == [1, 2, 3, 4, 5, 6]
    assert_same(weights(model), snapshots[6])  # the NaN step changed nothing
    reloaded = Regression()
    assert load_checkpoint_weights(reloaded, tmp_path / "last") == 5
    assert_same(weights(reloaded), snapshots[5])
    assert sorted(os.listdir(tmp_path)) == ["last"]


def test_nan_without_checkpoint_says_so():
    with pytest.raises(TrainingDiverged, match=r"step 1 of 3.*no checkpoint was written \(set checkpoint_every\)"):
        Trainer(NaNAt(1), TrainSettings(steps=3, batch_size=16), lambda step: regression_data()).fit()


def test_non_finite_gradient_with_finite_loss_diverges():
    class InfGrad(Regression):
        def forward(self, batch):
            w = self.linear.weight
            return torch.sqrt((w - w.detach()).sum())  # value 0, gradient 1/(2·sqrt(0)) = inf

    model = InfGrad()
    before = weights(model)
    with pytest.raises(TrainingDiverged, match=r"step 1 of 2: non-finite grad_norm=(inf|nan)"):
        Trainer(model, TrainSettings(steps=2, batch_size=16, max_grad_norm=None), lambda s: regression_data()).fit()
    assert_same(weights(model), before)


# --- evaluation and progress ---------------------------------------------------------------


def test_eval_and_progress_cadence():
    model = Regression()
    seen = []

    def evaluate(module):
        seen.append((module.training, torch.is_grad_enabled()))
        return {"mse": 1.5, "calls": len(seen)}

    progress = []
    s = TrainSettings(steps=10, batch_size=16, eval_every=3)
    result = Trainer(model, s, lambda step: regression_data(), evaluate=evaluate,
                     progress=lambda t, f: progress.append((t, f))).fit()
    assert seen == [(False, False)] * 4  # in eval mode, without autograd
    evaluated = {h["step"]: h["eval_calls"] for h in result.history if "eval_mse" in h}
    assert evaluated == {3: 1, 6: 2, 9: 3, 10: 4}  # every 3 steps and at the end
    assert result.metrics == {"mse": 1.5, "calls": 4.0}
    assert [f for _, f in progress] == pytest.approx([k / 10 for k in range(1, 11)])
    assert progress[-1][1] == 1.0 and progress[-1][0].startswith("step 10/10 loss ")
    assert model.training


def test_evaluate_must_return_numbers():
    with pytest.raises(ConfigError, match="evaluate"):
        Trainer(Regression(), TrainSettings(steps=1, batch_size=16), lambda s: regression_data(),
                evaluate=lambda m: [1.0]).fit()


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),
    ({"lr": 0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"schedule": "step"}, "schedule"),
    ({"warmup_steps": 10, "steps": 10}, "warmup_steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 10, "grad_accum": 4}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"eval_every": -1}, "eval_every"),
    ({"checkpoint_every": 5}, "checkpoint_every"),
    ({"resume": True}, "resume"),
    ({"checkpoint_dir": ""}, "checkpoint_dir"),
    ({"seed": -1}, "seed"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^TrainSettings\.{field}: "):
        TrainSettings(**kwargs)


def test_settings_round_trip_and_paths(tmp_path):
    s = TrainSettings(checkpoint_dir=tmp_path, checkpoint_every=2)
    assert s.checkpoint_dir == str(tmp_path)
    d = s.to_dict()
    assert d["type"] == "TrainSettings" and d["max_grad_norm"] == 1.0 and json.loads(json.dumps(d)) == d


def test_bad_data_and_modules():
    s = TrainSettings(steps=2, batch_size=16)
    with pytest.raises(DataError, match=r"step 1: the data gave a batch of 8 rows but batch_size is 16"):
        Trainer(Regression(), s, lambda step: regression_data(8)).fit()
    with pytest.raises(DataError, match="one-shot iterator"):
        Trainer(Regression(), s, (b for b in [regression_data()])).fit()
    with pytest.raises(DataError, match="callable batch_at"):
        Trainer(Regression(), s, 3)

    class Frozen(Regression):
        def __init__(self):
            super().__init__()
            self.requires_grad_(False)

    with pytest.raises(UnsupportedError, match="no trainable parameters"):
        Trainer(Frozen(), s, lambda step: regression_data()).fit()

    class ReturnsString(Regression):
        def forward(self, batch):
            return "loss"

    with pytest.raises(UnsupportedError, match="scalar loss tensor or an object with .loss"):
        Trainer(ReturnsString(), s, lambda step: regression_data()).fit()

    class VectorLoss(Regression):
        def forward(self, batch):
            x, y = batch
            return (self.linear(x) - y) ** 2

    with pytest.raises(UnsupportedError, match="scalar floating loss"):
        Trainer(VectorLoss(), s, lambda step: regression_data()).fit()
    assert issubclass(TrainingDiverged, SlimkitError) and issubclass(CheckpointError, SlimkitError)


# --- multi-process -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_equal_one(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    from safetensors.torch import load_file

    from tests.distillation import ddp_worker

    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "distillation" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["world_size"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    assert [r["evals"] for r in ranks] == [3, 0]  # steps 2, 4 and the end, on rank 0 alone
    assert ranks[0]["history"] == ranks[1]["history"]  # losses averaged over ranks, rank 0's metrics shared

    single = ddp_worker.build_model()
    result = Trainer(single, ddp_worker.settings(tmp_path / "single"), ddp_worker.batch_at,
                     evaluate=ddp_worker.evaluate).fit()
    assert result.world_size == 1
    ddp_state = load_file(str(out / "final.safetensors"))
    start = ddp_worker.build_model().state_dict()
    for name, value in single.state_dict().items():
        assert (ddp_state[name] - value).abs().max() < 1e-5, name
        assert (value - start[name]).abs().max() > 1e-3, name  # it trained
    for a, b in zip(ranks[0]["history"], result.history, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (a["step"], k, a[k], b[k])
    # Rank 0 wrote the checkpoint, and it holds the final weights.
    reloaded = ddp_worker.build_model()
    assert load_checkpoint_weights(reloaded, out / "ckpt") == 5
    assert_same(weights(reloaded), {k: v for k, v in ddp_state.items()})
    assert sorted(os.listdir(out / "ckpt")) == ["last"]
