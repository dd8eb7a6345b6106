"""What edge classes a drawn case falls in, judged from its arrays, and their shares.

Independent of how the strategies choose their classes: a case counts as, say, a
"-inf mask" case because its float mask holds -inf, whichever draw put it there. The
shares test (tests/testing/test_strategy_shares.py) and the table in docs/testing.rst
use it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

FEATURES = ("neg_inf_mask", "masked_rows", "causal", "causal_with_mask", "huge_logits",
            "longer_keys", "longer_queries", "square", "one_kv_head", "grouped_kv_heads",
            "empty")


def _host(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch, bfloat16 included
        import torch

        x = x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
        return x.numpy()
    a = np.asarray(x)
    return a if a.dtype == bool else a.astype(np.float64)


def features(case: Any) -> set[str]:
    """The edge classes of a case of the torch or refattn convention."""
    s = case.shape
    kw = case.kwargs
    found: set[str] = set()
    if case.convention == "torch":
        mask, causal = kw.get("attn_mask"), bool(kw.get("is_causal"))
        bool_mask = float_mask = None
        if mask is not None:
            m = _host(mask)
            bool_mask, float_mask = (m, None) if m.dtype == bool else (None, m)
    elif case.convention == "refattn":
        bool_mask = None if kw.get("mask") is None else _host(kw["mask"])
        float_mask = None if kw.get("bias") is None else _host(kw["bias"])
        causal = bool(kw.get("causal"))
    else:
        raise ValueError(f"features reads the torch and refattn conventions; got "
                         f"{case.convention!r}")
    visible = np.ones(s.scores, dtype=bool)
    if bool_mask is not None:
        visible &= bool_mask
    if float_mask is not None:
        visible &= ~np.isneginf(float_mask)
        if np.isneginf(float_mask).any():
            found.add("neg_inf_mask")
    if causal:
        found.add("causal")
        if bool_mask is not None or float_mask is not None or kw.get("window") is not None:
            found.add("causal_with_mask")
        # Top-left (torch; refattn's default): query i sees keys j <= i. Only to find
        # masked rows, which a causal top-left mask never makes alone.
        visible &= np.tril(np.ones((s.L, s.S), dtype=bool))
    if s.L and s.S and not visible.any(axis=-1).all():
        found.add("masked_rows")
    q, k = _host(case.q), _host(case.k)
    if s.L and s.S and s.H:
        k = np.repeat(k, s.H // s.K, axis=-3)
        scale = kw.get("scale")
        scale = 1 / np.sqrt(s.E) if scale is None else scale
        logits = np.abs(q @ np.swapaxes(k, -1, -2) * scale)
        wide = "float64" in str(case.q.dtype)
        limit = np.log(np.finfo(np.float64 if wide else np.float32).max)
        if logits.max() > limit:
            found.add("huge_logits")
    found |= {"longer_keys"} if s.L < s.S else {"longer_queries"} if s.L > s.S else set()
    if s.L == s.S == s.E:
        found.add("square")
    if s.K == 1 < s.H:
        found.add("one_kv_head")
    if 1 < s.K < s.H:
        found.add("grouped_kv_heads")
    if s.L == 0 or s.S == 0:
        found.add("empty")
    return found


def shares(strategy: st.SearchStrategy[Any], n: int, *, seed: int | None = None
           ) -> tuple[int, dict[str, float]]:
    """(draws, share of each feature) over ``n`` draws of hypothesis's generation phase.

    Derandomized (the suite's CI profile draws that way) unless a ``seed`` is given;
    no shrinking, nothing stored, so that every call sees the same draws.
    """
    counts: Counter[str] = Counter()
    drawn = [0]

    @settings(max_examples=n, database=None, deadline=None, derandomize=seed is None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def collect(case: Any) -> None:
        drawn[0] += 1
        counts.update(features(case))

    if seed is not None:
        from hypothesis import seed as with_seed

        collect = with_seed(seed)(collect)
    collect()
    return drawn[0], {f: counts[f] / drawn[0] for f in FEATURES}
