"""User functions in torch SDPA's convention for the audit's verdicts (``refattn check``).

Each is what a user might hand to ``refattn check tests.helpers.audit_kernels:NAME`` and
differs from the correct kernel of :mod:`tests.helpers.example_kernels` in one way:

* on an explicit ``attn_mask`` together with ``is_causal=True`` (which the reference
  semantics, torch's math path, refuses): ``anded_causal`` combines them by AND as
  torch's CPU fused path does, ``refuses_mask_with_causal`` raises like the math path,
  ``garbage_for_mask_with_causal`` drops the mask and keeps only the causal part;
* on ``dropout_p``: ``dropout_correct`` drops weights with a fresh keep-mask each call
  (torch's ``F.dropout`` on torch tensors, an unseeded NumPy generator otherwise),
  ``dropout_ignored`` computes as if ``dropout_p`` were 0, ``dropout_refused`` raises
  ``NotImplementedError``, ``dropout_not_rescaled`` drops weights but forgets the
  ``1 / (1 - p)`` rescaling, ``dropout_wrong_rate`` drops with probability p / 2.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from .example_kernels import correct


def anded_causal(query: Any, key: Any, value: Any, attn_mask: Any = None,
                 dropout_p: float = 0.0, is_causal: bool = False,
                 scale: float | None = None, enable_gqa: bool = False) -> Any:
    """A correct kernel that ANDs an explicit mask with ``is_causal``."""
    # example_kernels' kernel applies the mask, then the causal cut-off: an AND.
    return correct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def refuses_mask_with_causal(query: Any, key: Any, value: Any, attn_mask: Any = None,
                             dropout_p: float = 0.0, is_causal: bool = False,
                             scale: float | None = None, enable_gqa: bool = False) -> Any:
    """A correct kernel that refuses an explicit mask with ``is_causal``, as torch's math
    path does."""
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True are exclusive")
    return correct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def garbage_for_mask_with_causal(query: Any, key: Any, value: Any, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None,
                                 enable_gqa: bool = False) -> Any:
    """Given an explicit mask with ``is_causal``, drops the mask: neither a refusal nor
    what any library documents."""
    if attn_mask is not None and is_causal:
        attn_mask = None
    return correct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _weights(query: Any, key: Any, scale: float | None, xp: Any) -> Any:
    # Softmax weights in the working precision (float64 for float64, else float32).
    work = xp.float64 if "float64" in str(query.dtype) else xp.float32
    q, k = xp.astype(query, work), xp.astype(key, work)
    s = (q @ xp.matrix_transpose(k)) * (scale if scale is not None else
                                        1.0 / math.sqrt(q.shape[-1]))
    e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def _dropout_kernel(query: Any, key: Any, value: Any, dropout_p: float, scale: float | None,
                    *, rescale: bool) -> Any:
    # Plain attention (the dropout group has no mask, causal or GQA) with the weights
    # dropped by a keep-mask drawn here, each call afresh.
    xp = array_api_compat.array_namespace(query)
    w = _weights(query, key, scale, xp)
    if dropout_p:
        if hasattr(w, "detach"):
            import torch

            keep = torch.rand(w.shape, dtype=w.dtype, device=w.device) >= dropout_p
        else:
            keep = xp.asarray(np.random.default_rng().random(w.shape) >= dropout_p)
        w = xp.where(keep, w / (1 - dropout_p) if rescale else w, xp.zeros_like(w))
    return xp.astype(w @ xp.astype(value, w.dtype), query.dtype)


def dropout_correct(query: Any, key: Any, value: Any, attn_mask: Any = None,
                    dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> Any:
    """Dropout done right: each weight kept with probability 1 - p, kept ones rescaled by
    1 / (1 - p); torch tensors through ``torch.nn.functional.dropout``."""
    if hasattr(query, "detach"):
        import torch

        xp = array_api_compat.array_namespace(query)
        w = torch.nn.functional.dropout(_weights(query, key, scale, xp), dropout_p)
        return (w @ value.to(w.dtype)).to(query.dtype)
    return _dropout_kernel(query, key, value, dropout_p, scale, rescale=True)


def dropout_ignored(query: Any, key: Any, value: Any, attn_mask: Any = None,
                    dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> Any:
    """Takes ``dropout_p`` and computes as if it were 0."""
    return _dropout_kernel(query, key, value, 0.0, scale, rescale=True)


def dropout_refused(query: Any, key: Any, value: Any, attn_mask: Any = None,
                    dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> Any:
    """Refuses a non-zero ``dropout_p``."""
    if dropout_p:
        raise NotImplementedError("dropout is not implemented")
    return _dropout_kernel(query, key, value, 0.0, scale, rescale=True)


def dropout_not_rescaled(query: Any, key: Any, value: Any, attn_mask: Any = None,
                         dropout_p: float = 0.0, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False) -> Any:
    """Drops weights with probability p but leaves the kept ones as they were."""
    return _dropout_kernel(query, key, value, dropout_p, scale, rescale=False)


def dropout_wrong_rate(query: Any, key: Any, value: Any, attn_mask: Any = None,
                       dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False) -> Any:
    """Drops each weight with probability p / 2 yet rescales by 1 / (1 - p): every call
    is right for its own keep-mask, only the fraction kept gives it away."""
    xp = array_api_compat.array_namespace(query)
    w = _weights(query, key, scale, xp)
    if dropout_p:
        keep = xp.asarray(np.random.default_rng().random(w.shape) >= dropout_p / 2)
        w = xp.where(keep, w / (1 - dropout_p), xp.zeros_like(w))
    return xp.astype(w @ xp.astype(value, w.dtype), query.dtype)
