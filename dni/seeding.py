"""Explicit, order-independent seeds: every random stream of dni is named and derived here.

A stream's seed is a hash of its parent seed and its name, so a result never depends on
the order in which other work ran (e.g. which sweep cells were already done).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for the stream ``names`` under ``seed``."""
    text = "|".join([str(int(seed)), *(repr(n) if isinstance(n, float) else str(n) for n in names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen
