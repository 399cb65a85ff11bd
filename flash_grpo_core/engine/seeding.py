"""Seeds derived from the run seed and a purpose, identical on every rank and every machine."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (the run seed, an iteration, a purpose, a sample id)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
