"""Exceptions with Lightning's names, so that code ported from Lightning catches what Kiln raises."""

from __future__ import annotations


class MisconfigurationException(ValueError):
    """A contradictory or invalid configuration (Lightning's name; a ValueError, as Kiln's refusals are)."""
