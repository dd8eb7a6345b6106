"""The array-API paths called directly, on problems the tests build by hand.

The paths take an ``AttentionProblem``; the tests of one path pass its pieces as
keywords (a mask without the window, a window as a diagonal offset, small blocks, a
keep-mask of a wrong shape to see the path refuse it), so these build the problem
directly, without the front door's validation, and call the path.
"""

from __future__ import annotations

from typing import Any

from refattn import _validate
from refattn._agnostic import _blocked, _direct
from refattn._agnostic._backward import direct_backward as _direct_backward
from refattn._agnostic._scores import ScoreMods
from refattn._problem import AttentionProblem
from refattn._window import Window, alignment_shift


def problem_of(q: Any, k: Any, v: Any, *, scale: float, bias: Any = None, allowed: Any = None,
               keep: Any = None, dropout_p: float = 0.0, masked_rows: str = "zero",
               causal: bool = False, alignment: str = "top_left", diagonal_offset: int = 0,
               window_left: int | None = None, alibi_slopes: Any = None,
               mask_mod: Any = None, mods: ScoreMods | None = None,
               xp: Any) -> AttentionProblem:
    """An ``AttentionProblem`` of compute-form arrays: ``allowed`` is the user's mask,
    ``causal`` with ``diagonal_offset`` the window's right edge, ``window_left`` its
    left edge."""
    shapes = _validate.check_qkv(q, k, v)
    right = diagonal_offset if causal else None
    window = None if right is None and window_left is None else Window(window_left, right)
    return AttentionProblem(
        xp=xp, device=q.device, shapes=shapes, q=q, k=k, v=v, mask=allowed,
        mask_mod=mask_mod, bias=bias, alibi_slopes=alibi_slopes, window=window,
        alignment=alignment, shift=alignment_shift(shapes.L, shapes.S, alignment),
        mods=mods if mods is not None else ScoreMods(), keep=keep, scale=scale,
        dropout_p=dropout_p, masked_rows=masked_rows, layout="BHLD", in_dtype=q.dtype,
        compute_dtype=q.dtype, precision="standard", implementation=None,
    )


def direct_attention(q: Any, k: Any, v: Any, **options: Any) -> Any:
    """``_direct.direct_attention`` on ``problem_of(q, k, v, **options)``."""
    return _direct.direct_attention(problem_of(q, k, v, **options))


def direct_backward(grad_out: Any, q: Any, k: Any, v: Any, *, out: Any, lse: Any,
                    **options: Any) -> Any:
    """``direct_backward`` on ``problem_of(q, k, v, **options)``."""
    return _direct_backward(problem_of(q, k, v, **options), grad_out, out=out, lse=lse)


def blocked_attention(q: Any, k: Any, v: Any, *, return_weights: bool = False,
                      block_l: int | None = None, block_s: int | None = None,
                      num_threads: int = 1, **options: Any) -> Any:
    """``_blocked.blocked_attention`` on ``problem_of(q, k, v, **options)``."""
    return _blocked.blocked_attention(problem_of(q, k, v, **options),
                                      return_weights=return_weights, block_l=block_l,
                                      block_s=block_s, num_threads=num_threads)


def blocked_attention_backward(grad_out: Any, q: Any, k: Any, v: Any, *, out: Any, lse: Any,
                               block_l: int | None = None, block_s: int | None = None,
                               num_threads: int = 1, **options: Any) -> Any:
    """``_blocked.blocked_attention_backward`` on ``problem_of(q, k, v, **options)``."""
    return _blocked.blocked_attention_backward(
        problem_of(q, k, v, **options), grad_out, out=out, lse=lse, block_l=block_l,
        block_s=block_s, num_threads=num_threads)
