"""tasks.sources: every supported source reads back exactly, and every bad input is one clear DataError."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError, DataError
from slimkit.tasks import sources
from slimkit.tasks.sources import DataSpec, TensorRecords, TextRecords, is_builtin_name, read_source


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path: Path, records: list) -> str:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


class ChatTokenizer:
    """A stand-in tokenizer with a chat template: renders each message as <|role|>content."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=True):
        assert tokenize is False
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages)


class PlainTokenizer:
    """A tokenizer without a chat template."""

    chat_template = None

    def apply_chat_template(self, messages, tokenize=True):
        raise AssertionError("must not be called")


# -- DataSpec -------------------------------------------------------------------------


def test_parse_string_form_converts_each_value():
    spec = DataSpec.parse("chats.jsonl?field=messages&chat_template=true&n=32&seq_len=128&seed=7&split=test&unit=line")
    assert spec == DataSpec(source="chats.jsonl", field="messages", chat_template=True, n=32, seq_len=128, seed=7,
                            split="test", unit="line")
    assert DataSpec.parse("a.txt?chat_template=0").chat_template is False
    assert DataSpec.parse("a.txt?chat_template=1").chat_template is True
    assert DataSpec.parse("a.txt") == DataSpec(source="a.txt")
    assert DataSpec.parse("stdlib?n=8") == DataSpec(source="stdlib", n=8)


def test_parse_string_form_keeps_a_question_mark_that_belongs_to_an_existing_file(tmp_path):
    path = _write(tmp_path / "what?.txt", "one\ntwo\n")
    assert DataSpec.parse(path).source == path
    assert DataSpec.parse(path + "?unit=file") == DataSpec(source=path, unit="file")


@pytest.mark.parametrize("text, words", [
    ("x.jsonl?fild=text", ["'fild'", "did you mean 'field'"]),
    ("x.jsonl?n=many", ["'n'", "whole number", "'many'"]),
    ("x.jsonl?chat_template=maybe", ["'chat_template'", "true or false"]),
    ("x.jsonl?unit=lines", ["'unit'", "did you mean 'line'"]),
    ("x.jsonl?n=0", ["'n'", "at least 1"]),
    ("x.jsonl?field", ["key=value"]),
    ("x.jsonl?n=1&n=2", ["'n'", "twice"]),
])
def test_parse_string_form_refuses_bad_options(text, words):
    with pytest.raises(ConfigError) as info:
        DataSpec.parse(text)
    for word in words:
        assert word in str(info.value)


def test_parse_dict_form_and_round_trip_of_to_dict():
    spec = DataSpec.parse({"source": "data/my.jsonl", "field": "body", "label_field": "y", "n": "16", "seed": 3})
    assert spec == DataSpec(source="data/my.jsonl", field="body", label_field="y", n=16, seed=3)
    assert spec.to_dict() == {"source": "data/my.jsonl", "field": "body", "label_field": "y", "n": 16, "seed": 3}
    assert DataSpec.parse(spec.to_dict()) == spec
    full = DataSpec(source="x", field="f", label_field="l", n=2, seq_len=3, chat_template=True, seed=4, split="s",
                    unit="paragraph")
    assert DataSpec.parse(full.to_dict()) == full
    assert DataSpec(source="a.txt").to_dict() == {"source": "a.txt"}
    assert DataSpec.parse(spec) is spec
    assert DataSpec.parse(Path("p") / "q.txt") == DataSpec(source=os.path.join("p", "q.txt"))


def test_parse_dict_form_refuses_unknown_keys_and_missing_source():
    with pytest.raises(ConfigError, match=r"'feild'.*did you mean 'field'"):
        DataSpec.parse({"source": "a.txt", "feild": "text"})
    with pytest.raises(ConfigError, match="source"):
        DataSpec.parse({"field": "text"})
    with pytest.raises(ConfigError, match="'seed'"):
        DataSpec.parse({"source": "a.txt", "seed": True})


def test_describe_names_the_options_that_are_set():
    assert DataSpec(source="my.jsonl", field="text").describe() == "my.jsonl (field 'text')"
    assert DataSpec(source="notes.txt").describe() == "notes.txt"
    assert DataSpec(source="c.jsonl", field="messages", chat_template=True, split="train").describe() == \
        "c.jsonl (field 'messages', split 'train', chat template)"
    assert DataSpec(source=["a", "b"]).describe() == "in-memory list of 2 items"


def test_is_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "localdir").mkdir()
    assert is_builtin_name("stdlib") and is_builtin_name("digits")
    for not_a_name in ("notes.txt", "data/stdlib", "localdir", "two words", "", Path("stdlib"), ["stdlib"], None):
        assert not is_builtin_name(not_a_name), not_a_name


# -- text files and folders -----------------------------------------------------------


def test_text_file_auto_is_lines_without_blank_lines_and_paragraphs_with_them(tmp_path):
    lines = _write(tmp_path / "lines.txt", "  first line \nsecond line\r\nthird\n")
    found = read_source(lines)
    assert isinstance(found, TextRecords)
    assert found.texts == ["first line", "second line", "third"]
    assert found.description == f"3 lines of {lines}"
    paras = _write(tmp_path / "paras.md", "# Title\n\nPara one\ncontinues.\n  \n\n\nPara two\n")
    assert read_source(paras).texts == ["# Title", "Para one\ncontinues.", "Para two"]
    assert read_source(f"{paras}?unit=line").texts == ["# Title", "Para one", "continues.", "Para two"]
    assert read_source(f"{paras}?unit=file").texts == ["# Title\n\nPara one\ncontinues.\n  \n\n\nPara two"]
    assert read_source(f"{lines}?unit=paragraph").texts == ["first line \nsecond line\nthird"]
    assert read_source(paras, max_records=2).texts == ["# Title", "Para one\ncontinues."]


# Any line that is non-empty once stripped, has no line break, and none of the two characters the
# reader treats specially (NUL marks a binary file; a leading BOM is the UTF-8 signature).
_LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff\n\r"), min_size=1,
                max_size=30).map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None)
@given(st.lists(_LINE, min_size=1, max_size=20))
def test_text_file_of_random_lines_reads_back_exactly(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lines.txt"
        path.write_bytes("\n".join(lines).encode("utf-8"))
        assert read_source(str(path)).texts == lines


def test_folder_of_text_files_is_recursive_sorted_and_skips_hidden_and_binary(tmp_path):
    root = tmp_path / "docs"
    _write(root / "b.md", "B file\n\nsecond para")
    _write(root / "a" / "z.txt", "nested")
    _write(root / "a.txt", "A file")
    _write(root / ".hidden.txt", "hidden")
    _write(root / ".git" / "config", "hidden folder")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_text("  \n")
    found = read_source(str(root))
    # sorted by relative path: "a.txt" < "a/z.txt" < "b.md"
    assert found.texts == ["A file", "nested", "B file\n\nsecond para"]
    assert found.description == f"3 files under {root} (2 non-text files skipped)"
    by_paragraph = read_source(f"{root}?unit=paragraph")
    assert by_paragraph.texts == ["A file", "nested", "B file", "second para"]
    assert by_paragraph.description.startswith(f"4 paragraphs from 3 files under {root}")


def test_folder_with_images_next_to_documents_is_a_text_folder(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    _write(tmp_path / "guide" / "intro.md", "Intro")
    (tmp_path / "img").mkdir()
    PIL.new("L", (2, 2)).save(tmp_path / "img" / "fig.png")
    assert read_source(str(tmp_path)).texts == ["Intro"]


@pytest.mark.parametrize("make, words", [
    (lambda p: _write(p / "empty.txt", ""), ["holds no text"]),
    (lambda p: _write(p / "blank.txt", " \n\t\n  "), ["holds no text"]),
    (lambda p: (p / "x.bin").write_bytes(b"abc\x00def") and str(p / "x.bin"), ["is not a text file"]),
    (lambda p: (p / "l1.txt").write_bytes(b"caf\xe9\n") and str(p / "l1.txt"), ["is not a text file"]),
    (lambda p: str(p / "missing.txt"), ["is not a file or folder"]),
    (lambda p: ((p / "d").mkdir(), (p / "d" / "x.bin").write_bytes(b"\x00"), str(p / "d"))[-1],
     ["holds no text files"]),
    (lambda p: ((p / "e").mkdir(), str(p / "e"))[-1], ["holds no text files"]),
])
def test_bad_text_sources_raise_one_clear_error(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        read_source(path)
    assert path in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_path_suggests_a_close_name(tmp_path):
    _write(tmp_path / "notes.txt", "x")
    with pytest.raises(DataError, match="did you mean 'notes.txt'"):
        read_source(str(tmp_path / "notse.txt"))


def test_text_source_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    path = _write(tmp_path / "big.txt", "x" * 5000)
    monkeypatch.setattr(sources, "MAX_TEXT_BYTES", 1024)
    with pytest.raises(DataError, match=r"big.txt is 4.9 KB.*over 1.0 KB"):
        read_source(path)
    with pytest.raises(DataError, match="total 4.9 KB"):
        read_source(str(tmp_path))
    jsonl = _jsonl(tmp_path / "big.jsonl", [{"text": "y" * 100}] * 50)
    with pytest.raises(DataError, match="big.jsonl is"):
        read_source(jsonl)
    assert read_source(jsonl, max_records=3).texts == ["y" * 100] * 3  # streamed: the limit does not apply


def test_chat_template_on_a_text_file_is_refused(tmp_path):
    path = _write(tmp_path / "a.txt", "hello")
    with pytest.raises(DataError, match="not chat records"):
        read_source(DataSpec(source=path, chat_template=True), ChatTokenizer())


# -- records: JSON, JSONL, CSV, Parquet -----------------------------------------------


def test_json_list_and_data_dict_and_list_of_strings(tmp_path):
    records = [{"id": 1, "text": "alpha", "label": 0}, {"id": 2, "text": "beta", "label": 1}]
    listed = _write(tmp_path / "a.json", json.dumps(records))
    found = read_source(listed)
    assert (found.texts, found.labels) == (["alpha", "beta"], [0, 1])
    assert found.description == f"2 records of {listed} (field 'text')"
    wrapped = _write(tmp_path / "b.json", json.dumps({"version": 2, "data": records}))
    assert read_source(wrapped).texts == ["alpha", "beta"]
    strings = _write(tmp_path / "c.json", json.dumps(["one", "two"]))
    assert read_source(strings).texts == ["one", "two"]


@pytest.mark.parametrize("content, words", [
    ("42", ["is not a list of records", "an int"]),
    ('{"a": [1], "b": [2]}', ["is not a list of records", "'a', 'b'"]),
    ("[1, 2]", ["is not a list of records"]),
    ('[{"text": "a"}, "b"]', ["record 2", "str"]),
    ("[{", ["is not valid JSON"]),
    ("[]", ["holds no records"]),
])
def test_bad_json_raises_one_clear_error(tmp_path, content, words):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(DataError) as info:
        read_source(path)
    assert path in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_jsonl_labels_field_choice_and_max_records_stops_reading(tmp_path):
    path = _write(tmp_path / "r.jsonl", '{"body": "one", "y": 3}\n\n{"body": "two", "y": 4}\nNOT JSON\n')
    found = read_source(path, max_records=2)  # the broken line 3 is never read
    assert (found.texts, found.labels) == (["one", "two"], [3, 4])
    with pytest.raises(DataError, match="line 4 of .*r.jsonl is not valid JSON"):
        read_source(path)
    prompt = _jsonl(tmp_path / "p.jsonl", [{"prompt": "p1", "answer": "a1", "labels": 1}])
    found = read_source(prompt)  # several strings: the common name "prompt" wins; "labels" is picked up
    assert (found.texts, found.labels) == (["p1"], [1])
    assert read_source(f"{prompt}?field=answer&label_field=labels").texts == ["a1"]


def test_missing_and_ambiguous_fields_list_the_fields_that_exist(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [{"title": "t", "body": "b", "score": 1}])
    with pytest.raises(DataError) as info:
        read_source(f"{path}?field=bdy")
    assert "no field 'bdy'" in str(info.value) and "did you mean 'body'" in str(info.value)
    assert "'title', 'body', 'score'" in str(info.value)
    with pytest.raises(DataError, match=r"cannot tell which field.*'title', 'body', 'score'"):
        read_source(path)
    with pytest.raises(DataError, match=r"no label field 'label'.*'title', 'body', 'score'"):
        read_source(f"{path}?field=body&label_field=label")


def test_record_level_errors_name_the_record_number(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [{"text": "a"}, {"text": "b"}, {"text": 7}])
    with pytest.raises(DataError, match=r"record 3 of .*'text' holds an int, not text"):
        read_source(path)
    path = _jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"other": "b"}])
    with pytest.raises(DataError, match=r"record 2 of .*no field 'text'; it has: 'other'"):
        read_source(path)
    path = _jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(DataError, match="holds no text"):
        read_source(path)


def test_single_string_field_is_used_when_no_common_name_exists(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [{"id": 1, "sentence": "s1", "label": "pos"}])
    found = read_source(path)
    assert (found.texts, found.labels) == (["s1"], ["pos"])


def test_csv_and_tsv_with_labels(tmp_path):
    path = _write(tmp_path / "d.csv", 'text,label\n"hello, world",1\n"two\nlines",0\n')
    found = read_source(path)
    assert (found.texts, found.labels) == (["hello, world", "two\nlines"], [1, 0])
    assert read_source(path, max_records=1).texts == ["hello, world"]
    tsv = _write(tmp_path / "d.tsv", "content\tcls\nfirst\ta\nsecond\tb\n")
    found = read_source(f"{tsv}?label_field=cls")
    assert (found.texts, found.labels) == (["first", "second"], ["a", "b"])
    long = _write(tmp_path / "long.csv", "text\n" + "x" * 200_000 + "\n")  # over csv's 128 KB default field limit
    assert read_source(long).texts == ["x" * 200_000]
    with pytest.raises(DataError, match="holds no records"):
        read_source(_write(tmp_path / "empty.csv", "text,label\n"))
    with pytest.raises(DataError, match="record 2 of .*short.csv: field 'text' holds null"):
        read_source(_write(tmp_path / "short.csv", "label,text\n1,a\n2\n"))


def test_parquet_records_and_corrupt_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["p", "q", "r"], "label": [2, 1, 0], "extra": [0.5, 0.5, 0.5]}), path,
                   row_group_size=2)
    found = read_source(str(path))
    assert (found.texts, found.labels) == (["p", "q", "r"], [2, 1, 0])
    assert read_source(str(path), max_records=2).texts == ["p", "q"]
    with pytest.raises(DataError, match=r"no field 'txt'.*'text', 'label', 'extra'"):
        read_source(f"{path}?field=txt")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match=r"bad.parquet is not a readable Parquet file: \S"):
        read_source(str(bad))


# -- chat records ---------------------------------------------------------------------


_CHATS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
          {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]


def test_chat_records_joined_as_plain_text_or_rendered_with_the_template(tmp_path):
    path = _jsonl(tmp_path / "chats.jsonl", _CHATS)
    plain = read_source(path)
    assert plain.texts == ["user: hi\nassistant: hello", "user: 2+2?\nassistant: 4"]
    assert plain.description == f"2 chats of {path} (field 'messages')"
    rendered = read_source(f"{path}?chat_template=true", ChatTokenizer())
    assert rendered.texts == ["<|user|>hi<|assistant|>hello", "<|user|>2+2?<|assistant|>4"]
    assert "chat template" in rendered.description


def test_sharegpt_conversations_are_chat_records(tmp_path):
    path = _jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "a"}]}])
    assert read_source(path).texts == ["user: q\nassistant: a"]
    assert read_source(f"{path}?chat_template=1", ChatTokenizer()).texts == ["<|user|>q<|assistant|>a"]


def test_chat_template_errors(tmp_path):
    path = _jsonl(tmp_path / "chats.jsonl", _CHATS)
    with pytest.raises(DataError) as info:
        read_source(f"{path}?chat_template=true", PlainTokenizer())
    assert "PlainTokenizer" in str(info.value) and "has no chat template" in str(info.value)
    assert "set chat_template: false" in str(info.value)
    with pytest.raises(DataError, match="no tokenizer"):
        read_source(f"{path}?chat_template=true")
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match="holds plain text"):
        read_source(f"{texts}?chat_template=true", ChatTokenizer())
    broken = _jsonl(tmp_path / "b.jsonl", [_CHATS[0], {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="record 2 of .*'role' and 'content'"):
        read_source(broken)


# -- Hugging Face datasets ------------------------------------------------------------


def test_hf_dataset_objects_and_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    found = read_source(DataSpec(source=train))
    assert (found.texts, found.labels) == (["a", "b", "c"], [0, 1, 0])
    assert read_source(DataSpec(source=train), max_records=2).texts == ["a", "b"]
    both = datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_dict({"text": ["t"], "label": [1]})})
    assert read_source(DataSpec(source=both, split="test")).texts == ["t"]
    with pytest.raises(DataError, match=r"several splits \(train, test\).*split="):
        read_source(DataSpec(source=both))
    with pytest.raises(DataError, match=r"no split 'tset'.*did you mean 'test'"):
        read_source(DataSpec(source=both, split="tset"))
    single = datasets.DatasetDict({"validation": train})
    assert read_source(DataSpec(source=single)).texts == ["a", "b", "c"]
    train.save_to_disk(str(tmp_path / "saved"))
    assert read_source(str(tmp_path / "saved")).texts == ["a", "b", "c"]
    both.save_to_disk(str(tmp_path / "saved_dict"))
    assert read_source(f"{tmp_path / 'saved_dict'}?split=train").labels == [0, 1, 0]
    with pytest.raises(DataError, match=r"no field 'body'.*'text', 'label'"):
        read_source(DataSpec(source=train, field="body"))


# -- tensors --------------------------------------------------------------------------


def test_npz_npy_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.array([1, 0, 1, 2], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    found = read_source(str(tmp_path / "d.npz"))
    assert isinstance(found, TensorRecords)
    assert found.inputs.dtype == torch.float32 and torch.equal(found.inputs, torch.tensor(x, dtype=torch.float32))
    assert found.labels.dtype == torch.long and found.labels.tolist() == [1, 0, 1, 2]
    np.savez(tmp_path / "named.npz", feats=x, target=y, other=y)
    found = read_source(f"{tmp_path / 'named.npz'}?field=feats&label_field=target")
    assert found.inputs.shape == (4, 3) and found.labels.tolist() == [1, 0, 1, 2]
    with pytest.raises(DataError, match=r"cannot tell which array.*feats, target, other"):
        read_source(str(tmp_path / "named.npz"))
    np.savez(tmp_path / "one.npz", anything=x)
    assert read_source(str(tmp_path / "one.npz")).labels is None
    np.save(tmp_path / "d.npy", x)
    assert torch.equal(read_source(str(tmp_path / "d.npy")).inputs, torch.tensor(x, dtype=torch.float32))
    save_file({"inputs": torch.ones(2, 5), "labels": torch.tensor([3, 4])}, str(tmp_path / "d.safetensors"))
    found = read_source(str(tmp_path / "d.safetensors"), max_records=1)
    assert found.inputs.tolist() == [[1.0] * 5] and found.labels.tolist() == [3]


def test_in_memory_tensors_dicts_and_tuples():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(read_source(DataSpec(source=x)).inputs, x)
    found = DataSpec.parse({"x": x, "y": torch.tensor([0, 1, 1])})  # a dict of tensors is a source, not a spec
    assert read_source(found).labels.tolist() == [0, 1, 1]
    found = read_source(DataSpec(source=(x.double(), np.array([2, 2, 1]))))
    assert found.inputs.dtype == torch.float32 and found.labels.tolist() == [2, 2, 1]
    with pytest.raises(DataError, match=r"3 inputs .* shape \(2,\)"):
        read_source(DataSpec(source=(x, torch.tensor([0, 1]))))
    with pytest.raises(DataError, match=r"NaN or inf \(first in sample 1\)"):
        read_source(DataSpec(source=torch.tensor([[0.0], [float("nan")]])))


def test_corrupt_and_pickled_tensor_files_are_refused_without_unpickling(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match=r"bad.npz is not a readable npz file: \S"):
        read_source(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"objects.npz is not a readable npz file: .*allow_pickle"):
        read_source(str(tmp_path / "objects.npz"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(DataError, match=r"bad.safetensors is not a readable safetensors file: \S"):
        read_source(str(tmp_path / "bad.safetensors"))


# -- image folders --------------------------------------------------------------------


def _image_folder(root: Path, mode: str = "L", size=(4, 3)) -> Path:
    """cat/ (2 images) and dog/ (1 image), width x height = size; pixel (0, 0) of dog/d0 is 255, else 51."""
    Image = pytest.importorskip("PIL.Image")
    fill = 51 if mode == "L" else (51, 102, 153)
    for cls, names in (("cat", ["c0", "c1"]), ("dog", ["d0"])):
        (root / cls).mkdir(parents=True)
        for name in names:
            image = Image.new(mode, size, fill)
            if name == "d0":
                image.putpixel((0, 0), 255 if mode == "L" else (255, 0, 0))
            image.save(root / cls / f"{name}.png")
    (root / "dog" / "notes.txt").write_text("ignored")
    return root


def test_grayscale_image_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    found = read_source(str(root))
    assert isinstance(found, TensorRecords)
    assert found.inputs.shape == (3, 1, 3, 4) and found.inputs.dtype == torch.float32
    assert found.labels.tolist() == [0, 0, 1] and found.classes == ["cat", "dog"]
    assert found.inputs[2, 0, 0, 0].item() == 1.0
    assert found.inputs[0, 0, 1, 1].item() == pytest.approx(51 / 255)
    assert found.description == f"3 images in 2 classes under {root} (1x3x4)"
    rgb = read_source(str(root), channels=3)
    assert rgb.inputs.shape == (3, 3, 3, 4) and torch.equal(rgb.inputs[:, 0], rgb.inputs[:, 2])


def test_colour_image_folder_channels_and_resize(tmp_path):
    root = _image_folder(tmp_path / "imgs", mode="RGB")
    found = read_source(str(root))
    assert found.inputs.shape == (3, 3, 3, 4)
    assert found.inputs[2, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert found.inputs[0, :, 2, 3].tolist() == pytest.approx([51 / 255, 102 / 255, 153 / 255])
    gray = read_source(str(root), channels=1)  # PIL's ITU-R 601 luma: (51*299 + 102*587 + 153*114) / 1000 = 92.6
    assert gray.inputs.shape == (3, 1, 3, 4) and gray.inputs[0, 0, 0, 0].item() == pytest.approx(93 / 255)
    resized = read_source(str(root), image_size=(6, 8))
    assert resized.inputs.shape == (3, 3, 6, 8)
    assert resized.inputs[0, :, 3, 3].tolist() == pytest.approx([51 / 255, 102 / 255, 153 / 255], abs=1e-6)
    assert 0.0 <= resized.inputs.min() and resized.inputs.max() <= 1.0


def test_bad_image_folders(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = _image_folder(tmp_path / "mixed")
    Image.new("L", (5, 5)).save(root / "cat" / "c2.png")
    with pytest.raises(DataError, match=r"differ in size \(c0.png is 3x4, c2.png is 5x5"):
        read_source(str(root))
    assert read_source(str(root), image_size=(3, 4)).inputs.shape == (4, 1, 3, 4)
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="class folder 'empty_class' .* holds no images"):
        read_source(str(root), image_size=(3, 4))
    (root / "empty_class").rmdir()
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png .* is not a readable image"):
        read_source(str(root), image_size=(3, 4))
    texts = tmp_path / "texts"
    _write(texts / "a.txt", "text")
    with pytest.raises(DataError, match=f"{texts} holds no images"):
        read_source(str(texts), image_size=(28, 28))


# -- in-memory texts ------------------------------------------------------------------


def test_in_memory_lists():
    found = read_source(DataSpec(source=["one", "two "]))
    assert found.texts == ["one", "two "] and found.description == "2 texts of in-memory list of 2 items"
    records = read_source(DataSpec(source=[{"text": "r", "label": 1}]))
    assert (records.texts, records.labels) == (["r"], [1])
    with pytest.raises(DataError, match="holds no text"):
        read_source(DataSpec(source=[]))
    with pytest.raises(DataError, match="holds no text"):
        read_source(DataSpec(source=[" ", "\n"]))
    with pytest.raises(DataError, match="item 1 .* an int, not text"):
        read_source(DataSpec(source=["a", 2]))


def test_a_string_that_is_not_a_path_is_not_split_into_characters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="is not a file or folder .*list of str"):
        read_source("some text\nthat is not a path")
    with pytest.raises(DataError, match="'stdlib' is not a file or folder .*built-in corpus"):
        read_source("stdlib")
    with pytest.raises(DataError, match="cannot read an object as data"):
        read_source(DataSpec(source=object()))
