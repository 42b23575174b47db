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

PathStr = Annotated[str, Meta(min_length=1, extra={"nexrl": PATH_MARK})]
"""A filesystem path; relative paths are resolved against the recipe file that sets them."""

RefStr = Annotated[
    str,
    Meta(
        pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$",
        extra={"nexrl": REF_MARK},
        description="file.py:Name (relative to the recipe) or package.module:Name",
    ),
]
"""User code as ``file.py:Name`` (relative to the recipe file) or ``package.module:Name``."""
