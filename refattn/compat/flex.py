"""FlexAttention's conventions: ``torch.nn.attention.flex_attention``.

Reproduces torch 2.13's eager FlexAttention (``math_attention`` in
``torch/_higher_order_ops/flex_attention.py``, the reference its compiled kernels are
tested against):

* layout (B, H, L, E); key/value heads K divide H with ``enable_gqa`` (head h uses key
  head h // (H / K)), and a key/value batch of 1 serves every query batch when a block
  mask is given;
* ``score_mod(score, b, h, q_idx, kv_idx)`` receives the scaled score q.k * scale; where
  the block mask's ``mask_mod(b, h, q_idx, kv_idx)`` is False the score is -inf;
* a row whose every score is -inf (masked, or made -inf by ``score_mod``) gives output 0
  and LSE -inf (``torch._safe_softmax``);
* the LSE is the natural log-sum-exp of the final scores, (B, H, L).

The mods are the user's own callables: refattn evaluates them once on broadcast index
grids of the inputs' library (``b`` (B, 1, 1, 1), ``h`` (H, 1, 1), ``q_idx`` (L, 1),
``kv_idx`` (1, S)) rather than element by element under ``vmap``, so a mod written for
torch (operators, ``torch.where``, indexing captured tensors) runs unchanged on torch
tensors, and a mod written with operators only runs on every library.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

from .._front_door import attention
from .._namespace import infer_namespace
from .._validate import check_one_dtype

__all__ = ["AuxOutput", "BlockMask", "create_block_mask", "flex_attention"]


class BlockMask(NamedTuple):
    """refattn's stand-in for torch's ``BlockMask``: the mask_mod and the problem size.

    torch's BlockMask also stores which blocks are empty or full, for its kernels; the
    eager reference reads only ``mask_mod``, and so does refattn. ``B`` and ``H`` are
    None when the mask is the same for every batch entry or head.

    Attributes
    ----------
    mask_mod : callable
        ``mask_mod(b, h, q_idx, kv_idx)`` -> bool, True = take part.
    B, H : int or None
        Batch size and head count the mask was made for (None: any, broadcast).
    Q_LEN, KV_LEN : int
        Query and key lengths the mask was made for.
    """

    mask_mod: Callable[..., Any]
    B: int | None
    H: int | None
    Q_LEN: int
    KV_LEN: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN) with 1 for None, as torch's ``BlockMask.shape``."""
        return (self.B or 1, self.H or 1, self.Q_LEN, self.KV_LEN)

    @property
    def seq_lengths(self) -> tuple[int, int]:
        """(Q_LEN, KV_LEN), as torch's ``BlockMask.seq_lengths``."""
        return (self.Q_LEN, self.KV_LEN)


class AuxOutput(NamedTuple):
    """What ``flex_attention(..., return_aux=...)`` returns next to the output (torch's
    ``AuxOutput`` fields); fields not asked for are None."""

    lse: Any = None
    max_scores: Any = None


def _size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise TypeError(f"{name} must be a non-negative int; got {value!r}")
    return int(value)


def _optional_size(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise TypeError(f"{name} must be a non-negative int or None; got {value!r}")
    return int(value)


def create_block_mask(
    mask_mod: Callable[..., Any],
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Any = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,
) -> BlockMask:
    """``torch.nn.attention.flex_attention.create_block_mask``, for refattn's front-end.

    Parameters
    ----------
    mask_mod : callable
        ``mask_mod(b, h, q_idx, kv_idx)`` -> bool array, True = take part.
    B, H : int or None
        Batch size and head count; None means the mask is the same for all of them.
    Q_LEN, KV_LEN : int
        Query and key lengths.
    device : optional
        Accepted and ignored: refattn evaluates the mod on the inputs' device.
    BLOCK_SIZE : int or (int, int)
        Accepted and ignored: block sparsity only lets kernels skip work.

    Returns
    -------
    BlockMask
        The mask_mod with the sizes; pass it as ``flex_attention(block_mask=...)``.

    Raises
    ------
    TypeError
        A mask_mod that is not callable, sizes that are not non-negative ints.

    Examples
    --------
    >>> from refattn.compat.flex import create_block_mask
    >>> def causal(b, h, q_idx, kv_idx):
    ...     return q_idx >= kv_idx
    >>> create_block_mask(causal, None, None, 4, 4).shape
    (1, 1, 4, 4)
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable; got {type(mask_mod).__name__}")
    return BlockMask(mask_mod, _optional_size("B", B), _optional_size("H", H),
                     _size("Q_LEN", Q_LEN), _size("KV_LEN", KV_LEN))


def _block_mask_parts(block_mask: Any) -> tuple[Callable[..., Any] | None, Any, Any]:
    """(mask_mod, batch size or None, (Q_LEN, KV_LEN) or None) of any accepted form."""
    if block_mask is None:
        return None, None, None
    if isinstance(block_mask, BlockMask):
        return block_mask.mask_mod, block_mask.B, block_mask.seq_lengths
    if hasattr(block_mask, "mask_mod") and hasattr(block_mask, "seq_lengths"):
        # torch's own BlockMask: its batch is the leading size of its block counts.
        batch = getattr(getattr(block_mask, "kv_num_blocks", None), "shape", (None,))[0]
        return block_mask.mask_mod, batch, tuple(block_mask.seq_lengths)
    if callable(block_mask):
        return block_mask, None, None
    raise TypeError(
        "block_mask must be None, a BlockMask (refattn's create_block_mask or torch's), "
        f"or a mask_mod callable; got {type(block_mask).__name__}"
    )


def _aux_request(return_lse: Any, return_aux: Any) -> tuple[bool, bool]:
    """(want the LSE, answer with AuxOutput)."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False; got {return_lse!r}")
    if return_aux is None:
        return return_lse, False
    if return_lse:
        raise ValueError(
            "give return_lse or return_aux, not both (torch: 'Cannot specify both "
            "return_lse and return_aux')"
        )
    if not (hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise TypeError(
            "return_aux must be an AuxRequest(lse=..., max_scores=...); got "
            f"{type(return_aux).__name__}"
        )
    if return_aux.max_scores:
        raise NotImplementedError(
            "return_aux=AuxRequest(max_scores=True) is not implemented by refattn's "
            "flex_attention front-end; ask for lse only"
        )
    return bool(return_aux.lse), True


def flex_attention(
    query: Any,
    key: Any,
    value: Any,
    score_mod: Callable[..., Any] | None = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Any = None,
    *,
    return_aux: Any = None,
    xp: Any = None,
) -> Any:
    """``torch.nn.attention.flex_attention.flex_attention``, computed in float64.

    Same signature, defaults and return values as torch 2.13's eager FlexAttention; the
    output is rounded once to the dtype of ``query``.

    Parameters
    ----------
    query, key, value : array
        (B, H, L, E), (B_kv, K, S, E), (B_kv, K, S, Ev); one dtype. B_kv is B, or 1 with
        a ``block_mask``.
    score_mod : callable, optional
        ``score_mod(score, b, h, q_idx, kv_idx)`` -> new score; ``score`` is the scaled
        q.k. Called once on broadcast index grids (see the module's docstring).
    block_mask : BlockMask, torch BlockMask or callable, optional
        Where its ``mask_mod(b, h, q_idx, kv_idx)`` is False the score is -inf. A bare
        mask_mod callable is taken as its own block mask. Made for (Q_LEN, KV_LEN) =
        (L, S).
    scale : float, optional
        Defaults to 1/sqrt(E).
    enable_gqa : bool
        Let K divide H; without it K must equal H.
    return_lse : bool
        Also return the LSE (B, H, L) (torch deprecates it for ``return_aux``).
    kernel_options : dict, optional
        Accepted and ignored: it tunes torch's kernels (block sizes, stages) and their
        rounding, not the function computed.
    return_aux : AuxRequest, optional
        Keyword only, torch's ``AuxRequest(lse=..., max_scores=...)``: returns
        ``(out, AuxOutput(lse, None))``. ``max_scores=True`` raises
        NotImplementedError.
    xp : namespace or str, optional
        Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
        when None.

    Returns
    -------
    array or tuple
        ``out`` (B, H, L, Ev) in query's dtype; ``(out, lse)`` with ``return_lse``;
        ``(out, AuxOutput)`` with ``return_aux``. The LSE is float64 for float64 inputs
        and float32 otherwise (torch's eager working precision), -inf on rows whose
        every score is -inf.

    Raises
    ------
    TypeError
        Mixed libraries or dtypes, a block_mask or return_aux of the wrong kind,
        non-callable mods, a mask_mod that does not return booleans.
    ValueError
        Inputs not 4-D, head or batch sizes that do not fit (with torch's rules), a
        block mask made for other lengths, return_lse together with return_aux.
    NotImplementedError
        ``return_aux`` asking for ``max_scores``.

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.compat.flex import create_block_mask, flex_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 8)) for _ in range(3))
    >>> def relative(score, b, h, q_idx, kv_idx):
    ...     return score - 0.1 * abs(q_idx - kv_idx)
    >>> def causal(b, h, q_idx, kv_idx):
    ...     return q_idx >= kv_idx
    >>> mask = create_block_mask(causal, None, None, 4, 4)
    >>> out, lse = flex_attention(q, k, v, score_mod=relative, block_mask=mask,
    ...                           return_lse=True)
    >>> out.shape, lse.shape
    ((1, 2, 4, 8), (1, 2, 4))

    The first query sees only the first key:

    >>> bool(np.allclose(out[0, :, 0], v[0, :, 0]))
    True
    """
    xp, _ = infer_namespace({"query": query, "key": key, "value": value}, xp=xp,
                            required=("query", "key", "value"))
    want_lse, aux = _aux_request(return_lse, return_aux)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be True or False; got {enable_gqa!r}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be callable or None; got {type(score_mod).__name__}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, L, E) for flex_attention; got shape "
                f"{tuple(x.shape)}"
            )
    B, H, L, E = query.shape
    Bkv, K, S, Ek = key.shape
    if Ek != E:
        raise ValueError(
            f"query and key must have the same embedding dimension; got E={E} and E={Ek}"
        )
    if tuple(value.shape[:3]) != (Bkv, K, S):
        raise ValueError(
            f"value must have key's (B, K, S) = {(Bkv, K, S)} leading sizes; got shape "
            f"{tuple(value.shape)}"
        )
    if not enable_gqa and K != H:
        raise ValueError(
            f"query and key/value must have the same number of heads, got Hq={H} and "
            f"Hkv={K}; set enable_gqa=True for grouped-query attention"
        )
    if enable_gqa and H % K:
        raise ValueError(
            f"the number of query heads must be a multiple of kv heads for GQA; got "
            f"Hq={H} and Hkv={K}"
        )
    mask_mod, mask_batch, lengths = _block_mask_parts(block_mask)
    if Bkv != B and (mask_mod is None or Bkv != 1):
        raise ValueError(
            f"query and key/value must have the same batch size, or key/value a batch of "
            f"1 with a block_mask; got Bq={B} and Bkv={Bkv}"
        )
    if mask_batch is not None and mask_batch not in (1, B):
        raise ValueError(
            f"block_mask was made for a batch of {mask_batch}, the query has {B}"
        )
    if lengths is not None and tuple(lengths) != (L, S):
        raise ValueError(
            f"block_mask was made for (Q_LEN, KV_LEN) = {tuple(lengths)} but the query and "
            f"key have lengths ({L}, {S}); make a block mask for these lengths"
        )
    dtype = check_one_dtype({"query": query, "key": key, "value": value})  # before widening
    if dtype not in (xp.float32, xp.float64):
        # Widened so that the output is rounded once and the LSE comes back in float32
        # (torch's working precision) rather than in the 16-bit input dtype.
        query, key, value = (xp.astype(x, xp.float64) for x in (query, key, value))
    res = attention(
        query, key, value, scale=scale, score_mod=score_mod, mask_mod=mask_mod,
        masked_rows="zero", return_lse=want_lse, xp=xp,
    )
    if not want_lse and not aux:
        return xp.astype(res, dtype)
    out = xp.astype(res.out if want_lse else res, dtype)
    lse = None
    if want_lse:
        lse = xp.astype(res.lse, xp.float64 if dtype == xp.float64 else xp.float32)
    if aux:
        return out, AuxOutput(lse=lse, max_scores=None)
    return out, lse

