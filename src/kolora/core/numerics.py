"""Checks on tensors' numbers, shared by every reader that refuses nan/inf (cache entries, LoRA files)."""

from __future__ import annotations

# torch: imported in the functions that use them (a login node's CLI starts without them)


def nonfinite_count(t) -> int:
    """How many nan/inf `t` holds. Fast path: its float64 sum is finite exactly when every value is (float16/
    bfloat16/float32 values stay below 3.5e38, so no sum of fewer than 1e269 of them overflows float64), about
    4x cheaper than isfinite on 16-bit tensors; only a non-finite sum pays the exact count."""
    import torch

    if not t.is_floating_point() or bool(torch.isfinite(t.double().sum())):
        return 0
    return int((~torch.isfinite(t)).sum())
