"""Running ``slimkit auto``'s plans: one after another, in parallel processes, or as Ray tasks.

A trial applies a plan's steps to a copy of the model, saves it (bytes on disk, stored bits
per weight of the measured layers) and measures the task's headline quality on the
calibration split. Trials share nothing but the read-only ``TrialSetup``, so they can run
anywhere:

- ``jobs=1``: in this process;
- ``jobs=N``: N forked processes (Linux's copy-on-write fork: the model is not copied until a
  trial changes its copy), each with ``cores // N`` torch threads;
- ``ray_address``: Ray tasks on the cluster at that address ("local" starts a Ray instance on
  this machine); the setup is put in Ray's object store once.

Latency is never measured inside a trial: trials running side by side would time each other.
A trial that must be timed returns its model, and ``slimkit auto`` times it afterwards, alone.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.errors import ConfigError
from slimkit.core.io import save
from slimkit.core.measure import size_on_disk
from slimkit.core.registry import Context
from slimkit.recipe.steps import apply_step
from slimkit.tasks import task_of


@dataclass
class TrialSetup:
    """What every trial reads: the model, its calibration and quality data, and what to measure."""

    model: nn.Module
    calibration: Any
    data: Any  # the task's eval data drawn from the calibration split
    reference: Any
    metric: str
    layer_names: list[str]
    layer_weights: int
    keep_model: bool = False  # return the compressed model (for timing afterwards)


def run_steps(model: nn.Module, steps: Sequence[Config], calibration: Any, teacher: nn.Module) -> None:
    """Apply ``steps`` in place; a distillation step learns from ``teacher`` on its own training data."""
    ctx = Context(teacher=teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steps:
            apply_step(model, step, data=None if step.family == "distill" else calibration, ctx=ctx)


def measured_layer_bits(names: list[str], weights: int, folder: Path) -> float:
    """Stored bits per weight of layers ``names`` (``weights`` in all) in a saved folder: every entry under their names."""
    from safetensors import safe_open

    from slimkit.core.sparse_storage import SAFETENSORS_DTYPES

    owners = set(names)
    nbytes = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
            owner = key.split(".__")[0].rsplit(".", 1)[0]
            if owner in owners or owner.rsplit(".", 1)[0] in owners:  # FactorizedLinear: first/second
                view = f.get_slice(key)
                nbytes += math.prod(view.get_shape()) * SAFETENSORS_DTYPES[view.get_dtype()].itemsize
    return nbytes * 8 / max(weights, 1)


def run_trial(setup: TrialSetup, steps: Sequence[Config]) -> dict[str, Any]:
    """One plan on a copy: {size_bytes, bits, quality, seconds, error, model}; a plan that fails says why."""
    start = time.perf_counter()
    out: dict[str, Any] = {"size_bytes": None, "bits": None, "quality": None, "error": None, "model": None}
    work = copy.deepcopy(setup.model)
    try:
        run_steps(work, steps, setup.calibration, setup.model)
        with tempfile.TemporaryDirectory(prefix="slimkit-auto-") as tmp:
            folder = save(work, Path(tmp) / "m")
            out["size_bytes"] = size_on_disk(folder)
            out["bits"] = measured_layer_bits(setup.layer_names, setup.layer_weights, folder)
        quality, _ = task_of(work).measure_quality(work, setup.data, setup.reference)
        out["quality"] = float(quality[setup.metric])
        if setup.keep_model:
            out["model"] = work
    except Exception as exc:  # noqa: BLE001 - a plan that cannot run is reported, the others still count
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        out["error"] = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    out["seconds"] = time.perf_counter() - start
    return out


_SETUP: TrialSetup | None = None  # what forked workers inherit


def _forked_trial(steps: Sequence[Config]) -> dict[str, Any]:
    assert _SETUP is not None
    return run_trial(_SETUP, steps)


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def run_trials(setup: TrialSetup, plans: list[Sequence[Config]], jobs: int = 1, ray_address: str | None = None,
               progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every plan's trial result, in order: serially, in ``jobs`` forked processes, or as Ray tasks."""
    say = progress or (lambda text: None)
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs {jobs!r}: the number of trials run at once, an integer >= 1")
    if ray_address is not None:
        say(f"{len(plans)} trial(s) as Ray tasks at {ray_address}")
        return _ray_trials(setup, plans, ray_address)
    if jobs == 1 or len(plans) <= 1:
        results = []
        for i, steps in enumerate(plans):
            say(f"trial {i + 1}/{len(plans)}")
            results.append(run_trial(setup, steps))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError("jobs > 1 runs trials in forked processes, which this platform lacks: use jobs=1 or --ray")
    global _SETUP
    _SETUP = setup
    threads = max(1, (os.cpu_count() or 1) // jobs)
    say(f"{len(plans)} trial(s) in {min(jobs, len(plans))} processes of {threads} thread(s)")
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(plans)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_set_threads, initargs=(threads,)) as pool:
            return list(pool.map(_forked_trial, plans))
    finally:
        _SETUP = None


def _ray_trials(setup: TrialSetup, plans: list[Sequence[Config]], address: str) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray runs trials as Ray tasks and needs Ray: pip install 'slimkit[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({"num_cpus": os.cpu_count() or 1} if address == "local" else {}))
        except Exception as exc:  # noqa: BLE001 - the cluster's own error, said once with what to fix
            raise ConfigError(f"--ray {address}: cannot connect ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]}); give a running cluster's address "
                              "(ray start --head prints it) or 'local'") from None
    try:
        shared = ray.put(setup)
        remote = ray.remote(num_cpus=1)(run_trial)
        return ray.get([remote.remote(shared, list(steps)) for steps in plans])
    finally:
        if started:
            ray.shutdown()
