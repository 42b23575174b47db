"""The shared-memory file that carries weights from the trainer process to the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nexrl_async.train.ranks.staging import StagingReader, StagingWriter


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
    assert changed.path != first.path
    ((name, view),) = reader.views(changed)
    assert name == "embed.weight"
    assert torch.equal(view, torch.ones(2, 2))


def test_the_reader_removes_the_files_name_once_mapped(writer: StagingWriter) -> None:
    layout = writer.fill(tensors())
    assert Path(layout.path).exists()
    views = StagingReader().views(layout)
    assert not Path(layout.path).exists()  # nothing left behind if either side crashes now
    writer.fill(tensors(scale=2.0))
    assert torch.equal(views[0][1], tensors(scale=2.0)[0][1])  # still shared


def test_closing_the_writer_removes_an_untaken_file() -> None:
    writer = StagingWriter(prefix="nexrl-test-weights")
    layout = writer.fill(tensors())
    writer.close()
    assert not Path(layout.path).exists()
