"""An endless data factory without ``max_items`` is refused with a clear message, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.core.errors import DataError
from nexrl_async.data import readers

ENDLESS = "import itertools\n\ndef rows():\n    return ({'p': str(i)} for i in itertools.count())\n"


def test_an_endless_factory_needs_max_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gen.py").write_text(ENDLESS)
    monkeypatch.setattr(readers, "MAX_FACTORY_ROWS", 1000)
    with pytest.raises(DataError, match=r"more than 1,000 rows \(endless\?\): set data.max_items"):
        readers.read_factory("gen.py:rows", {}, tmp_path)
    assert len(readers.read_factory("gen.py:rows", {}, tmp_path, limit=5000)) == 5000
