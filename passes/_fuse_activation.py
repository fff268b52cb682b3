"""Activation fusions."""

from __future__ import annotations
