"""Your own model and data from the command line: every architecture through every shipped LLM recipe.

Random-init tiny models of eleven Hugging Face architectures (hidden 128, so the shipped
recipes' group size 128 applies), each saved as a Hugging Face folder with a small BPE
tokenizer; a JSONL calibration file and a one-text-per-line evaluation file. ``slimkit
compress`` runs each one-shot LLM recipe (and ``slimkit distill`` the prune-then-distill
recipe with a training file), the result reloads and ``slimkit eval`` re-measures it.
``distill-stdlib-coder`` is left out: its student is the zoo's stdlib-coder-student, whose
vocabulary is stdlib-coder's. Random weights: plumbing, never quality claims.
"""

import json
import random
import sys

import pytest
import torch

from tests.llm_archs import ALL_ARCHS, tiny_causal_lm

ONE_SHOT_RECIPES = ("int8-weight-only", "w4-gptq", "w4-awq", "w8a8-smoothquant", "wanda-50", "sparsegpt-2of4")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``slimkit ARGS`` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from slimkit.cli import main

    monkeypatch.setattr(sys, "argv", ["slimkit", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """(tokenizer, folder with calib.jsonl / eval.txt / train.txt) of code-like user text."""
    from slimkit.zoo.stdlib_coder import train_tokenizer, wrap_tokenizer

    rng = random.Random(0)
    lines = [f"def f{i}(x, y={rng.randint(0, 99)}):\n    return x * {rng.randint(0, 9)} + y  # {i}" for i in range(400)]
    tokenizer = wrap_tokenizer(train_tokenizer(lines, vocab_size=300))
    folder = tmp_path_factory.mktemp("data")
    with open(folder / "calib.jsonl", "w") as f:
        for i, line in enumerate(lines[:200]):
            f.write(json.dumps({"id": i, "text": line, "source": "user"}) + "\n")
    (folder / "eval.txt").write_text("\n".join(f"class C{i}: value = {rng.randint(0, 999)}" for i in range(80)))
    (folder / "train.txt").write_text("\n\n".join(lines[200:]))
    return tokenizer, folder


@pytest.fixture(scope="module")
def arch_dirs(user_data, tmp_path_factory):
    """arch -> a Hugging Face folder (safetensors + config + tokenizer) of a tiny random model."""
    tokenizer, _ = user_data
    root = tmp_path_factory.mktemp("archs")
    dirs = {}
    for arch in ALL_ARCHS:
        model = tiny_causal_lm(arch, width=128, vocab=len(tokenizer), positions=512)
        dirs[arch] = root / arch
        model.save_pretrained(dirs[arch])
        tokenizer.save_pretrained(dirs[arch])
    return dirs


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_llm_recipe_runs_from_the_cli_on_user_data(arch, arch_dirs, user_data, tmp_path, monkeypatch, capsys):
    import slimkit as sk

    _, data = user_data
    calib = f"{data / 'calib.jsonl'}?field=text&n=8&seq_len=64"
    for recipe in ONE_SHOT_RECIPES:
        out = tmp_path / recipe
        code, stdout, stderr = run_cli(monkeypatch, capsys, "compress", "--model", arch_dirs[arch], "--recipe", recipe,
                                       "--calib", calib, "--data", data / "eval.txt", "--metrics", "size,perplexity",
                                       "--out", out, "--json")
        assert code == 0, f"{arch} {recipe}: {stderr}"
        report = json.loads(stdout)
        assert report["compressed"]["size_bytes"] < report["baseline"]["size_bytes"], (arch, recipe)
        if recipe != "int8-weight-only":  # the only one that needs no calibration data
            assert "calib.jsonl (field 'text')" in " ".join(report["notes"]), report["notes"]
        assert "80 lines of " in report["compressed"]["details"]["quality data"] and "eval.txt" in report["compressed"]["details"]["quality data"]
        ppl = report["compressed"]["quality"]["perplexity"]
        assert 1.0 < ppl < float("inf"), (arch, recipe, ppl)
        # The saved checkpoint reloads and `slimkit eval` reproduces the report's perplexity.
        reloaded = sk.load(out / "model")
        assert reloaded.__class__.__name__ == sk.load(arch_dirs[arch]).__class__.__name__
        code, stdout, stderr = run_cli(monkeypatch, capsys, "eval", out / "model", "--data", data / "eval.txt",
                                       "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["quality"]["perplexity"] == pytest.approx(ppl, rel=1e-5), (arch, recipe)
    # Deployable artifacts of the int4 result: ONNX (MatMulNBits, checked against PyTorch by ORT) and
    # compressed-tensors where its loaders know the layer type (plain nn.Linear: not GPT-2's Conv1D, Falcon's).
    gptq = tmp_path / "w4-gptq" / "model"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "export", "onnx", gptq, "--out", tmp_path / "m.onnx", "--json")
    assert code == 0, f"{arch}: {stderr}"
    exported = json.loads(stdout)
    assert exported["ops"].get("MatMulNBits", 0) >= 8 and exported["max_abs_diff"] < 0.05, (arch, exported)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "export", "compressed-tensors", gptq, tmp_path / "ct", "--json")
    if arch in ("gpt2", "falcon"):
        assert code == 2 and "compressed-tensors export" in stderr and "nn.Linear" in stderr, stderr
    else:
        assert code == 0, f"{arch}: {stderr}"
        assert len(json.loads(stdout)["quantized"]) >= 8


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prune_then_distill_trains_on_a_user_text_folder(arch, arch_dirs, user_data, tmp_path, monkeypatch, capsys):
    _, data = user_data
    code, stdout, stderr = run_cli(monkeypatch, capsys, "distill", "--recipe", "prune-then-distill",
                                   "--teacher", arch_dirs[arch], "--steps", "2",
                                   "--calib", f"{data / 'calib.jsonl'}?n=8&seq_len=64",
                                   "--train-data", f"{data / 'train.txt'}?unit=paragraph",
                                   "--data", data / "eval.txt", "--out", tmp_path / "pd", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert any("Distill: 2 steps" in n for n in report["notes"]), report["notes"]
    assert report["compressed"]["params_nonzero"] < 0.8 * report["baseline"]["params_nonzero"]  # sparsity kept


def test_user_data_mistakes_exit_2_with_one_line(arch_dirs, user_data, tmp_path, monkeypatch, capsys):
    _, data = user_data
    model = arch_dirs["llama"]
    (tmp_path / "empty.txt").write_text("   \n\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "x = 1"}) + "\n")
    cases = [
        (("compress", "--model", model, "--recipe", "w4-gptq", "--calib", f"{data / 'calib.jsonl'}?field=body"),
         "has no field 'body'"),
        (("compress", "--model", model, "--recipe", "w4-gptq", "--calib", tmp_path / "empty.txt"), "no text"),
        (("compress", "--model", model, "--recipe", "w4-gptq", "--calib", tmp_path / "blob.bin"), "not a text file"),
        (("compress", "--model", model, "--recipe", "w4-gptq", "--calib", tmp_path / "short.jsonl"),
         "one calibration window needs seq_len=256"),
        (("compress", "--model", model, "--recipe", "w4-gptq",
          "--calib", f"{data / 'calib.jsonl'}?chat_template=true&field=text"), "chat"),
        (("eval", model, "--data", tmp_path / "missing.txt"), "is not a file or folder"),
        (("compress", "--model", model, "--recipe", "w4-gptq", "--metrics", "speed"), "unknown figure 'speed'"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        code, _, stderr = run_cli(monkeypatch, capsys, *args, "--out", out) if args[0] == "compress" else \
            run_cli(monkeypatch, capsys, *args)
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("done ")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, stderr)
        assert not out.exists()  # nothing written


def test_a_chat_template_renders_chat_records(arch_dirs, tmp_path):
    import slimkit as sk

    model = sk.load(arch_dirs["qwen2"])
    tokenizer = sk.tokenizer_of(model)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                                                        {"role": "assistant", "content": f"{2 * i + 1}"}]})
                               for i in range(300)))
    calib = sk.task_of(model).calibration(model, f"{chats}?chat_template=true&n=4&seq_len=32")
    text = tokenizer.decode(torch.cat([b["input_ids"].reshape(-1) for b in calib]))
    assert "<|user|>add" in text and "<|assistant|>" in text
