"""Stable ids and hash splits (pure): a query's id from its text, and a key's place in [0, 1]
for deterministic splits that hold whatever the data's size or order."""

from __future__ import annotations

import hashlib


def text_id(text: str) -> str:
    """A stable query id from its text (first 16 hex digits of sha256)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hash_bucket(key: str) -> float:
    """``key``'s fixed position in [0, 1]: ``hash_bucket(k) < f`` puts a fraction f of keys on one side."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
