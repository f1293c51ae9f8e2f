"""Errors the exporter raises for what a user passed: each message is the one-line reason."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(Exception):
    """A user-facing, one-line reason why a checkpoint cannot be loaded."""


def short_list(keys: Iterable[str], limit: int = 6) -> str:
    """Sorted keys for a one-line message: the first ``limit``, then how many more."""
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
