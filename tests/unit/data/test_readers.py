"""Each source kind read from files the test writes; open-time errors name what is wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from nexrl_async.config.data import HFDiskData, JsonlData, ParquetData, PythonData
from nexrl_async.core.errors import DataError, UserCodeError
from nexrl_async.data import iterate_once, open_source, read_rows

ROWS: list[dict[str, Any]] = [
    {"question": "1+1?", "answer": "2"},
    {"question": "2+3?", "answer": "5"},
    {"question": "capital of France?", "answer": "Paris"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_factory(tmp_path: Path, body: str) -> None:
    (tmp_path / "gen.py").write_text(body)


@pytest.fixture(scope="module")
def hf_datasets() -> Any:
    return pytest.importorskip("datasets")


def questions(items: list[Any]) -> list[str]:
    return [item.fields["question"] for item in items]


# ---- jsonl ----------------------------------------------------------------------------------


def test_jsonl_rows_in_file_order_with_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    assert read_rows(JsonlData(path=str(path)), tmp_path) == ROWS[:2]


def test_jsonl_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", ROWS)
    items = iterate_once(JsonlData(path="sub/d.jsonl"), tmp_path)
    assert questions(items) == [r["question"] for r in ROWS]


def test_jsonl_max_items_stops_reading_early(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    # Line 3 is garbage: with max_items=2 it must never be parsed.
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    assert read_rows(JsonlData(path=str(path), max_items=2), tmp_path) == ROWS[:2]


def test_jsonl_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"jsonl file .*nope\.jsonl does not exist"):
        open_source(JsonlData(path=str(missing)), base_dir=tmp_path)


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        open_source(JsonlData(path=str(path)), base_dir=tmp_path)


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "an array"), ('"text"', "str")])
def test_jsonl_non_object_line_names_file_and_line(tmp_path: Path, line: str, kind: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + line + "\n")
    expected = rf"d\.jsonl:3: expected a JSON object per line, got {kind}"
    with pytest.raises(DataError, match=expected):
        open_source(JsonlData(path=str(path)), base_dir=tmp_path)


def test_jsonl_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a file"):
        open_source(JsonlData(path=str(tmp_path)), base_dir=tmp_path)


def test_empty_source_is_an_error_unless_max_items_is_zero(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        open_source(JsonlData(path=str(path)), base_dir=tmp_path)
    source = open_source(JsonlData(path=str(path), max_items=0), base_dir=tmp_path)
    assert len(source) == 0
    assert source.exhausted
    assert source.next_item() is None


# ---- parquet --------------------------------------------------------------------------------


def test_parquet_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    source = open_source(ParquetData(path=str(path), shuffle=False), base_dir=tmp_path)
    assert len(source) == 3
    items = [source.next_item() for _ in range(3)]
    assert [i.fields for i in items if i is not None] == ROWS


def test_parquet_max_items(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    assert read_rows(ParquetData(path=str(path), max_items=2), tmp_path) == ROWS[:2]


def test_parquet_garbage_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"cannot read parquet file .*d\.parquet"):
        open_source(ParquetData(path=str(path)), base_dir=tmp_path)


def test_parquet_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"parquet file .*x\.parquet does not exist"):
        open_source(ParquetData(path="x.parquet"), base_dir=tmp_path)


# ---- HF datasets save_to_disk -----------------------------------------------------------------


def test_hf_disk_single_dataset(tmp_path: Path, hf_datasets: Any) -> None:
    hf_datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(HFDiskData(path="ds"), tmp_path) == ROWS
    assert read_rows(HFDiskData(path="ds", max_items=1), tmp_path) == ROWS[:1]


def test_hf_disk_dataset_dict_split(tmp_path: Path, hf_datasets: Any) -> None:
    dd = hf_datasets.DatasetDict(
        {
            "train": hf_datasets.Dataset.from_list(ROWS[:2]),
            "test": hf_datasets.Dataset.from_list(ROWS[2:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_rows(HFDiskData(path="dd", split="test"), tmp_path) == ROWS[2:]
    assert read_rows(HFDiskData(path="dd", split="train"), tmp_path) == ROWS[:2]
    with pytest.raises(DataError, match=r"has no split 'val'; its splits are \['train', 'test'\]"):
        read_rows(HFDiskData(path="dd", split="val"), tmp_path)
    with pytest.raises(DataError, match=r"holds a DatasetDict with splits .*: set split"):
        read_rows(HFDiskData(path="dd"), tmp_path)


def test_hf_disk_lone_split_is_read_without_naming_it(tmp_path: Path, hf_datasets: Any) -> None:
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert read_rows(HFDiskData(path="dd"), tmp_path) == ROWS


def test_hf_disk_split_on_plain_dataset(tmp_path: Path, hf_datasets: Any) -> None:
    hf_datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="single Dataset, not a DatasetDict: remove split"):
        read_rows(HFDiskData(path="ds", split="train"), tmp_path)


def test_hf_disk_missing_and_non_dataset_folders(tmp_path: Path, hf_datasets: Any) -> None:
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        read_rows(HFDiskData(path="absent"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot load HF dataset from .*empty"):
        read_rows(HFDiskData(path="empty"), tmp_path)


def test_hf_disk_without_datasets_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"needs the `datasets` package"):
        read_rows(HFDiskData(path="ds"), tmp_path)


# ---- Python factory -------------------------------------------------------------------------


def test_factory_called_with_kwargs(tmp_path: Path) -> None:
    write_factory(
        tmp_path,
        "def make(n, prefix):\n"
        "    for i in range(n):\n"
        "        yield {'question': f'{prefix}{i}', 'answer': str(i)}\n",
    )
    cfg = PythonData(factory="gen.py:make", kwargs={"n": 4, "prefix": "q"}, shuffle=False)
    assert questions(iterate_once(cfg, tmp_path)) == ["q0", "q1", "q2", "q3"]


def test_factory_endless_generator_with_max_items(tmp_path: Path) -> None:
    write_factory(
        tmp_path,
        "import itertools\n"
        "def forever():\n"
        "    for i in itertools.count():\n"
        "        yield {'question': str(i)}\n",
    )
    source = open_source(PythonData(factory="gen.py:forever", max_items=5), base_dir=tmp_path)
    assert len(source) == 5


def test_factory_raising_is_a_data_error_naming_the_ref(tmp_path: Path) -> None:
    write_factory(tmp_path, "def make():\n    raise ValueError('no data today')\n")
    with pytest.raises(DataError, match=r"'gen.py:make' raised ValueError: no data today"):
        open_source(PythonData(factory="gen.py:make"), base_dir=tmp_path)


def test_factory_raising_while_iterated(tmp_path: Path) -> None:
    write_factory(tmp_path, "def make():\n    yield {'q': 1}\n    raise KeyError('half way')\n")
    with pytest.raises(DataError, match=r"'gen.py:make' raised KeyError"):
        open_source(PythonData(factory="gen.py:make"), base_dir=tmp_path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("make = 3\n", "is not callable"),
        ("def make():\n    return 7\n", "returned int, not an iterable of dicts"),
        ("def make():\n    return [{'q': 1}, 'x']\n", "row 1 is str, expected a dict"),
        ("def make():\n    return [{1: 'a'}]\n", "row 0 has non-string keys"),
    ],
)
def test_factory_bad_results(tmp_path: Path, body: str, message: str) -> None:
    write_factory(tmp_path, body)
    with pytest.raises(DataError, match=message):
        open_source(PythonData(factory="gen.py:make"), base_dir=tmp_path)


def test_factory_file_missing_is_a_user_code_error(tmp_path: Path) -> None:
    with pytest.raises(UserCodeError, match="does not exist"):
        open_source(PythonData(factory="absent.py:make"), base_dir=tmp_path)
