"""The shared-memory file that carries weights from the trainer process to the engine and the
local servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from nexrl_async.inference.staging import StagingReader, StagingWriter


def tensors(scale: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    return [
        ("embed.weight", torch.arange(12, dtype=torch.float32).view(3, 4) * scale),
        ("norm.weight", torch.full((5,), 0.5 * scale, dtype=torch.bfloat16)),
        ("empty", torch.zeros(0, 3)),
        ("count", torch.tensor([7], dtype=torch.int64)),
    ]


@pytest.fixture
def writer() -> StagingWriter:
    w = StagingWriter(prefix="nexrl-test-weights")
    yield w
    w.close()


def test_views_equal_what_was_filled(writer: StagingWriter) -> None:
    layout = writer.fill(tensors())
    views = StagingReader().views(layout)
    assert [name for name, _ in views] == [name for name, _ in tensors()]
    for (_, got), (_, want) in zip(views, tensors(), strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert torch.equal(got, want)
    assert all(entry.offset % 64 == 0 for entry in layout.entries)


def test_a_second_fill_updates_the_mapped_views_in_place(writer: StagingWriter) -> None:
    reader = StagingReader()
    first = writer.fill(tensors())
    views = reader.views(first)
    second = writer.fill(tensors(scale=3.0))
    assert second.path == first.path  # same names, shapes and dtypes: the file is reused
    assert torch.equal(views[0][1], tensors(scale=3.0)[0][1])
    assert torch.equal(reader.views(second)[1][1], tensors(scale=3.0)[1][1])


def test_a_changed_layout_gets_a_new_file(writer: StagingWriter) -> None:
    reader = StagingReader()
    first = writer.fill(tensors())
    reader.views(first)
    changed = writer.fill([("embed.weight", torch.ones(2, 2))])
    assert changed.token != first.token  # the path's descriptor number may be reused
    ((name, view),) = reader.views(changed)
    assert name == "embed.weight"
    assert torch.equal(view, torch.ones(2, 2))


def test_the_file_has_no_name_and_other_processes_still_map_it(writer: StagingWriter) -> None:
    layout = writer.fill(tensors())
    assert not list(Path("/dev/shm").glob("nexrl-test-weights-*"))  # nothing left on a crash
    code = (
        "import sys, msgspec, torch\n"
        "from nexrl_async.inference.staging import Layout, StagingReader\n"
        "layout = msgspec.json.decode(sys.argv[1].encode(), type=Layout)\n"
        "views = dict(StagingReader().views(layout))\n"
        "print(views['embed.weight'].sum().item(), views['count'].item())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, msgspec.json.encode(layout).decode()],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["66.0", "7"]


def test_two_readers_share_the_writers_next_fill(writer: StagingWriter) -> None:
    layout = writer.fill(tensors())
    first, second = StagingReader().views(layout), StagingReader().views(layout)
    writer.fill(tensors(scale=2.0))
    for views in (first, second):
        assert torch.equal(views[0][1], tensors(scale=2.0)[0][1])


def test_a_reader_of_a_closed_writer_fails_with_os_error() -> None:
    writer = StagingWriter(prefix="nexrl-test-weights")
    layout = writer.fill(tensors())
    writer.close()
    with pytest.raises(OSError):
        StagingReader().views(layout)


def test_a_reader_refuses_a_layout_larger_than_the_file(writer: StagingWriter) -> None:
    layout = writer.fill(tensors())
    bigger = msgspec.structs.replace(layout, size=layout.size * 4, token="other")
    with pytest.raises(ValueError, match="smaller than its layout"):
        StagingReader().views(bigger)


def test_nbytes_counts_the_tensors_without_padding(writer: StagingWriter) -> None:
    layout = writer.fill(tensors())
    assert layout.nbytes == 12 * 4 + 5 * 2 + 0 + 8
    assert layout.size > layout.nbytes


def test_two_buffers_keep_a_fill_until_the_fill_after_next() -> None:
    writer = StagingWriter(prefix="nexrl-test-weights", buffers=2)
    try:
        reader = StagingReader()
        first = writer.fill(tensors(scale=1.0))
        views = reader.views(first)
        second = writer.fill(tensors(scale=2.0))
        assert second.token != first.token
        assert torch.equal(views[0][1], tensors(scale=1.0)[0][1])  # still the first fill
        assert torch.equal(reader.views(second)[0][1], tensors(scale=2.0)[0][1])
        third = writer.fill(tensors(scale=3.0))
        assert third.token == first.token  # the first file again, now holding the third fill
        assert torch.equal(views[0][1], tensors(scale=3.0)[0][1])
    finally:
        writer.close()


def test_a_writer_takes_one_or_two_buffers() -> None:
    with pytest.raises(ValueError, match="buffers must be 1 or 2"):
        StagingWriter(buffers=3)
