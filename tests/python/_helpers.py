"""Shared helpers of the qwix-torch Python tests."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-exact equality (torch.equal on the non-NaN elements, NaN at the same positions)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach(), expected.detach()
    if a.is_floating_point():
        na, ne = torch.isnan(a), torch.isnan(e)
        if not torch.equal(na, ne):
            idx = (na != ne).nonzero()[:5].tolist()
            raise AssertionError(
                f"{what}: NaN positions differ at {idx}: actual {[a[tuple(i)].item() for i in idx]}, "
                f"expected {[e[tuple(i)].item() for i in idx]}"
            )
        a, e = a[~na], e[~ne]
    if not torch.equal(a, e):
        a, e = a.reshape(-1), e.reshape(-1)  # (a 0-dim tensor's nonzero() has no index to report)
        diff = (a != e).nonzero().reshape(-1)
        n = diff.numel()
        first = diff[:6].tolist()
        raise AssertionError(
            f"{what}: {n} of {a.numel()} elements differ (among non-NaN, flattened); first at {first}: "
            f"actual {[a[i].item() for i in first]}, expected {[e[i].item() for i in first]}"
        )


def make_input(shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random data with magnitudes that differ along every axis (so group scales differ) and a few zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    for a, d in enumerate(shape):
        view = [1] * len(shape)
        view[a] = d
        x = x * torch.exp(torch.randn(d, generator=g, dtype=torch.float64) * 0.7).reshape(view)
    if x.numel() > 4:
        flat = x.reshape(-1)
        flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=g)] = 0.0
    return x.to(torch.float32).to(dtype)


def stable_seed(*parts) -> int:
    h = 0
    for ch in repr(parts):
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h


def nextafter(t: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, direction))


INF = math.inf
