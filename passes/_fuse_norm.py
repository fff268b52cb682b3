"""Normalization and GELU fusions."""

from __future__ import annotations
