"""Shared annotated types for the recipe schema: bounds, paths and user-code references.

Path and reference fields carry a marker in their metadata so the loader can resolve them
relative to the recipe file that set them.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

PATH_MARK = "path"
REF_MARK = "ref"

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PosFloat = Annotated[float, Meta(gt=0.0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Port = Annotated[int, Meta(ge=0, le=65535)]

MAX_CONCURRENCY = 4096
"""Cap on concurrent tasks a recipe may ask for (rollout workers): each holds memory."""
MAX_GROUPS = 65536
"""Cap on groups per step, per pool and in flight: each group is held in memory."""
MAX_GROUP_SIZE = 1024
"""Cap on samples per group."""
MAX_TOKENS = 1 << 20
"""Cap on any token count (new tokens per turn): beyond every model's context."""
Concurrency = Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY)]
GroupCount = Annotated[int, Meta(ge=1, le=MAX_GROUPS)]
GroupSize = Annotated[int, Meta(ge=1, le=MAX_GROUP_SIZE)]
TokenCount = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]

CWD_MARK = "{cwd}"
"""A path field starting with this is relative to the working directory of the command (e.g.
the output of an earlier ``nexrl-async run --output runs/x``), not to the recipe file."""

PathStr = Annotated[str, Meta(min_length=1, extra={"nexrl": PATH_MARK})]
"""A filesystem path; relative paths are resolved against the recipe file that sets them
(``{cwd}/...``: against the working directory)."""

RefStr = Annotated[
    str,
    Meta(
        pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$",
        extra={"nexrl": REF_MARK},
        description="file.py:Name (relative to the recipe) or package.module:Name",
    ),
]
"""User code as ``file.py:Name`` (relative to the recipe file) or ``package.module:Name``."""
