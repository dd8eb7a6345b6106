"""The front door: ``attention(q, k, v, ...)`` and ``attention_backward``.

Each call builds one ``AttentionProblem`` (``refattn._problem``: validation, the dropout
keep-mask, normalisation), picks the path that runs it and turns the path's result back
into the user's layout, rank and dtype. No arithmetic and no semantics live here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _threads
from ._agnostic._accurate import compensated_attention, compensated_backward
from ._agnostic._backward import direct_backward
from ._agnostic._blocked import blocked_attention, blocked_attention_backward
from ._agnostic._direct import direct_attention
from ._arrays import sum_to_shape
from ._namespace import infer_namespace, library_name
from ._problem import AttentionProblem, build_problem
from ._results import AttentionGrads, AttentionResult
from ._types import Array

__all__ = ["DIRECT_MAX_SCORES", "AttentionGrads", "AttentionResult", "attention",
           "attention_backward", "kernels_take"]

# implementation=None materialises the scores (the direct path) up to this many score
# elements (..., H, L, S), 2**20 = 8 MiB in float64 with about five such arrays alive
# at once, and runs the blocked path above it: there the direct path's memory grows
# with L x S while the blocked path's stays per block, and the blocked path's worker
# threads and cache-sized blocks make it the faster one too; measured on 2 cores, the
# two cross near 2**20 scores (docs/performance.rst).
DIRECT_MAX_SCORES = 2**20

# Array libraries whose arrays the fused CUDA kernels take. CuPy's always; the CPU shim
# (refattn._cuda_shim) adds NumPy's while it serves as the kernels' backend.
_kernel_libraries: set[str] = {"cupy"}


@contextmanager
def kernels_take(library: str) -> Iterator[None]:
    """Route arrays of ``library`` to the CUDA kernels while inside the block.

    How a kernel backend other than CuPy registers itself: the CPU shim runs the
    unchanged kernel sources on NumPy arrays (``refattn._cuda_shim.serve_numpy_arrays``).

    Examples
    --------
    >>> with kernels_take("numpy"):
    ...     "numpy" in _kernel_libraries
    True
    >>> "numpy" in _kernel_libraries
    False
    """
    added = library not in _kernel_libraries
    _kernel_libraries.add(library)
    try:
        yield
    finally:
        if added:
            _kernel_libraries.discard(library)


def _use_blocked(problem: AttentionProblem) -> bool:
    # The explicit choice wins; None goes by the size of the score array.
    if problem.implementation is not None:
        return problem.implementation == "blocked"
    return math.prod(problem.shapes.scores) > DIRECT_MAX_SCORES


# Below this many bytes a materialised path is not checked against the free memory (it
# costs a read of /proc per call and no machine that runs refattn lacks 1 GiB).
_MEMORY_CHECK_BYTES = 2**30


def _available_memory() -> int | None:
    # The memory a new allocation can have without paging: Linux's MemAvailable, capped
    # by a cgroup (container) limit; None where neither can be read (then no check).
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            room = max(int(limit) - used, 0)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    return available


def _on_host(problem: AttentionProblem) -> bool:
    # Host memory is overcommitted: a too large allocation succeeds and then pages the
    # machine to a halt (or wakes the OOM killer). Device allocators (CuPy, torch on
    # cuda) refuse at once with their own out-of-memory error, so they are left to it.
    library = library_name(problem.q)
    if library == "torch":
        return getattr(problem.device, "type", None) == "cpu"
    return library in ("numpy", "array_api_strict")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_materialised_memory(problem: AttentionProblem, *, arrays: int, what: str,
                              instead: str) -> None:
    """MemoryError, at once, when ``arrays`` arrays of the score shape cannot fit.

    ``arrays`` is a lower bound on the score-sized arrays the path holds at once (the
    scores and the weights, for the direct forward), so a refusal is certain to be
    right; ``what`` names the choice that materialises them and ``instead`` what to do.
    """
    elements = math.prod(problem.shapes.scores)
    if elements * 8 * arrays < _MEMORY_CHECK_BYTES:
        return  # no compute dtype is wider than 8 bytes: small enough whatever it is
    one = elements * (problem.xp.finfo(problem.compute_dtype).bits // 8)
    need = one * arrays
    if need < _MEMORY_CHECK_BYTES or not _on_host(problem):
        return
    available = _available_memory()
    if available is not None and need > available:
        raise MemoryError(
            f"{what} materialises the (..., H, L, S) scores: score shape "
            f"{problem.shapes.scores} needs at least {arrays} arrays of {_gib(one)} "
            f"({_gib(need)}) but {_gib(available)} of memory is available; {instead}"
        )


def _use_cuda(problem: AttentionProblem, *, return_weights: bool) -> bool:
    # Kernels for CuPy inputs whose options they implement; "cuda" insists, None falls
    # back to the array-API path (the results are the same up to rounding).
    implementation = problem.implementation
    if implementation not in (None, "cuda"):
        return False
    library = library_name(problem.q)
    if library not in _kernel_libraries:
        if implementation == "cuda":
            raise ValueError(
                f"implementation='cuda' runs on CuPy arrays; got {library} arrays (use "
                "implementation=None, 'direct' or 'blocked')"
            )
        return False
    from . import _cuda

    reason = _cuda.unsupported(problem, return_weights=return_weights)
    if reason is not None and implementation == "cuda":
        raise ValueError(f"implementation='cuda' does not support {reason}")
    return reason is None


def _cuda_path(problem: AttentionProblem, run: Any) -> Any:
    # None when the launch turns out unsupported (known only at launch: the shared
    # memory of this device); "cuda" insists, None falls back as above.
    from . import _cuda

    try:
        return run(_cuda)
    except _cuda.UnsupportedLaunch as exc:
        if problem.implementation == "cuda":
            raise ValueError(f"implementation='cuda' does not support {exc}") from None
        return None


_USE_BLOCKED = ("use implementation='blocked' (or None), whose memory grows with the "
                "block, not with L x S")


def _array_api_forward(problem: AttentionProblem, return_weights: bool,
                       return_lse: bool) -> AttentionResult:
    # The xp path: compensated arithmetic, the blocked online softmax or the direct one.
    if problem.precision == "compensated":
        # Double-float scores: a high and a low part, and the weights' two parts.
        _check_materialised_memory(problem, arrays=4, what="precision='compensated'",
                                  instead="use precision='standard' with "
                                  "implementation='blocked'")
        return compensated_attention(problem, need_weights=return_weights)
    if _use_blocked(problem):
        if return_weights:
            _check_materialised_memory(
                problem, arrays=1, what="return_weights=True",
                instead="ask for return_lse=True instead: the weights of a row are "
                "exp(scores - lse)")
        with _threads.worker_threads(problem.xp) as num_threads:
            return blocked_attention(problem, return_weights=return_weights,
                                     num_threads=num_threads)
    _check_materialised_memory(problem, arrays=2, what="implementation='direct'",
                              instead=_USE_BLOCKED)
    _threads.settle_allocator(problem.xp)
    return direct_attention(problem, need_lse=return_lse)


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    alignment: str = "top_left",
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    rng: Any = None,
    masked_rows: str = "zero",
    layout: str = "BHLD",
    compute_dtype: Any = None,
    precision: str = "standard",
    implementation: str | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    return_dropout_mask: bool = False,
    xp: Any = None,
    sinks: Any = None,
    attention_chunk: int | None = None,
    qv: Any = None,
) -> Any:
    """Scaled dot-product attention, computed in float64 by default.

    ``softmax(scale * q @ k^T + bias, masked) @ v`` with the masks, causal structure,
    grouped-query heads and dropout of the options below. Inputs of any real floating
    dtype are computed in ``compute_dtype`` (float64 unless asked otherwise) and the
    results are cast back to the input dtype, in the input's namespace and device.

    Parameters
    ----------
    q, k, v : array
        Queries (..., H, L, E), keys (..., K, S, E) and values (..., Kv, S, Ev) of one
        array library, with one real floating dtype. K and Kv must divide H; query head
        h reads key head ``h // (H // K)`` and value head ``h // (H // Kv)``
        (grouped-query attention; K = Kv = H is ordinary multi-head attention). Leading
        dims broadcast against each other. 2-D inputs (L, E) have no head axis.
    mask : bool array, optional
        True where a query may attend a key; broadcastable to (..., H, L, S).
    bias : float array, optional
        Added to the scaled scores; broadcastable to (..., H, L, S). -inf entries mask.
    causal : bool
        Restrict query i to keys j <= i + shift (see ``alignment``); combined with
        ``mask`` by logical AND. The same as ``window=(None, 0)``.
    window : (left, right), optional
        Sliding window: query i sees keys j with i + shift - left <= j <= i + shift +
        right; None or -1 leaves that side unlimited. With ``causal`` the two intersect.
    alignment : {"top_left", "bottom_right"}
        shift = 0 (torch's ``is_causal``) or S - L (flash-attn, decoding), for causal,
        windows and ALiBi alike.
    scale : float, optional
        Multiplies q @ k^T; defaults to 1/sqrt(E). Zero gives the mean of the attended
        values; negative values are allowed.
    softcap : float, optional
        ``c * tanh(s / c)`` on the scaled scores, before the bias (flash-attn, Gemma).
    alibi_slopes : float array, optional
        (H,) or (..., H) slopes: adds ``-slope * |i + shift - j|`` after the bias.
    score_mod : callable, optional
        ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's), evaluated once on the
        whole score array after ALiBi with broadcast integer index grids: b (..., 1, 1, 1)
        the flat batch index, h (H, 1, 1), q_idx (L, 1), kv_idx (1, S). Use operators and
        the namespace's functions so it runs on every library.
    mask_mod : callable, optional
        ``mask_mod(b, h, q_idx, kv_idx)`` returning a boolean array (True = take part),
        ANDed with the other masks.
    dropout_p : float
        Probability of dropping a weight; kept weights are scaled by 1/(1 - dropout_p).
        ``dropout_p=1`` gives zeros. Needs ``dropout_mask`` or ``rng``.
    dropout_mask : bool array, optional
        Keep-mask (True = kept), broadcastable to (..., H, L, S).
    rng : int or numpy.random.Generator, optional
        Seed or generator used to draw the keep-mask on the host with NumPy, at the
        full score shape; ask for it back with ``return_dropout_mask``.
    masked_rows : {"zero", "nan", "uniform"}
        Result for a query row whose every score is -inf: output 0 (torch's SDPA), NaN
        (plain softmax), or the mean of all values (JAX's finite fill).
    layout : {"BHLD", "BLHD"}
        Axis order of q, k, v and the output: heads before positions (torch) or after
        (flash-attn). Weights and LSE are always (..., H, L[, S]).
    compute_dtype : {None, "float64", "float32"}
        Dtype of the computation; None means float64 whatever the input dtype.
    precision : {"standard", "compensated"}
        Arithmetic of the computation: plain float64, or double-float logits, exp and
        sums rounded once at the end (within about half an ulp of the exact result
        whatever the logit size; several times slower; float64 direct path only; see
        docs/accuracy.rst).
    implementation : {None, "direct", "blocked", "cuda"}
        Which path computes. "cuda" runs the fused CUDA kernel on CuPy arrays (the
        options it lacks are named in an error; None uses it for CuPy inputs whose
        options it has, see docs/gpu.rst). Both array-API paths take every variant;
        on "blocked" softcap, ALiBi, score_mod and mask_mod are applied block by block
        (the mods are called once per block with that block's index grids) and a
        window's edges skip the key blocks they hide: nothing is materialised at
        (..., H, L, S) there but the user's own mask and bias. "direct" materialises the
        (..., H, L, S) scores;
        "blocked" runs an online softmax over cache-sized blocks with extra memory
        O(block) per worker thread, skips key blocks the causal mask hides, and computes
        ``weights`` (when asked) block by block from each row's final max and sum. None
        takes "direct" up to ``DIRECT_MAX_SCORES`` (2**20) score elements and
        "blocked" above. Both give the same results up to rounding. The blocked path
        runs ``refattn.get_num_threads()`` worker threads on NumPy-backed arrays (see
        ``refattn.set_num_threads``).
    return_weights, return_lse, return_dropout_mask : bool
        Return an ``AttentionResult`` with these fields filled in.
    xp : namespace or str, optional
        The array namespace of the inputs, or its name: ``"numpy"``, ``"torch"``,
        ``"cupy"``, ``"array_api_strict"`` or ``"jax"`` (``xp="numpy"`` is ``xp=numpy``);
        inferred when None. A namespace that does not match the inputs is an error.
    sinks : array, optional
        (H,) learnable attention sinks (gpt-oss; flash-attn's ``learnable_sink``): one
        logit per query head that joins every row's softmax denominator and adds nothing
        to the output, ``out_i = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij))``.
        Not scaled, capped or biased. The LSE includes it, the weights then sum to less
        than 1, and a row with no visible key gives 0 with LSE = sink (docs/variants.rst).
    attention_chunk : int, optional
        Chunked local attention (Llama 4; flash-attn 3's ``attention_chunk``): query i
        sees only the keys j with ``(i + shift) // attention_chunk == j //
        attention_chunk``, the shift of ``alignment``; intersected with every other mask,
        ``causal`` and ``window`` included.
    qv : array, optional
        (..., H, L, Ev), q's shape with v's head dim (flash-attn 3's ``qv``, for MLA's
        absorbed decoding): the scores become ``scale (q k^T + qv v^T)``. Scaled by the
        same ``scale`` (by default 1 / sqrt(E), E of q).

    Returns
    -------
    array or AttentionResult
        The output (..., H, L, Ev) alone, or an ``AttentionResult`` when a ``return_*``
        flag is set. ``dropout_mask`` is None when there was no dropout.

    Raises
    ------
    TypeError
        Mixed libraries, non-arrays (None included), integer/complex data, mismatched
        dtypes, a non-bool mask; ``numpy.matrix``, NumPy masked arrays and torch ``meta``
        tensors, which look like arrays but would be computed wrongly or have no values.
    ValueError
        Incompatible shapes, heads that do not divide, bad option values, dropout without
        a keep-mask or seed, an ``xp`` name refattn does not know.
    MemoryError
        On the host, before a path materialises score-sized arrays (``"direct"``,
        ``precision="compensated"``, ``return_weights`` on ``"blocked"``) that cannot fit
        in the available memory.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # B=2, H=4, L=5, E=8
    >>> k = rng.standard_normal((2, 2, 7, 8))   # K=2 key heads (grouped-query)
    >>> v = rng.standard_normal((2, 2, 7, 3))   # S=7, Ev=3
    >>> out = refattn.attention(q, k, v, causal=True, alignment="bottom_right")
    >>> out.shape
    (2, 4, 5, 3)
    >>> res = refattn.attention(q, k, v, return_weights=True, return_lse=True)
    >>> bool(np.allclose(res.weights.sum(axis=-1), 1.0))
    True
    >>> res.lse.shape
    (2, 4, 5)

    Variants compose in a fixed order (scale, softcap, bias, ALiBi, score_mod, masks):

    >>> out = refattn.attention(q, k, v, window=(2, 0), softcap=30.0,
    ...                         alibi_slopes=np.full(4, 0.5), alignment="bottom_right")
    >>> out.shape
    (2, 4, 5, 3)

    The namespace may be named rather than passed:

    >>> bool(np.array_equal(refattn.attention(q, k, v, xp="numpy"),
    ...                     refattn.attention(q, k, v, xp=np)))
    True
    """
    problem = build_problem(
        q, k, v, mask=mask, bias=bias, causal=causal, window=window, alignment=alignment,
        scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, score_mod=score_mod,
        mask_mod=mask_mod, dropout_p=dropout_p, dropout_mask=dropout_mask, rng=rng,
        masked_rows=masked_rows, layout=layout, compute_dtype=compute_dtype,
        precision=precision, implementation=implementation, xp=xp, sinks=sinks,
        attention_chunk=attention_chunk, qv=qv,
    )
    res = None
    if _use_cuda(problem, return_weights=return_weights):
        res = _cuda_path(problem, lambda cuda: cuda.forward(problem, need_lse=return_lse))
    if res is None:
        res = _array_api_forward(problem, return_weights, return_lse)
    out = problem.to_user_form(res.out, swap=True)
    if not (return_weights or return_lse or return_dropout_mask):
        return out
    return AttentionResult(
        out=out,
        lse=problem.to_user_form(res.lse, swap=False) if return_lse else None,
        weights=problem.to_user_form(res.weights, swap=False) if return_weights else None,
        dropout_mask=problem.keep if return_dropout_mask else None,
    )


# --- backward -------------------------------------------------------------------------



def _user_out_shape(problem: AttentionProblem) -> tuple[int, ...]:
    # The output's shape as the user sees it: the layout swap applies to rank >= 3 only.
    shape = problem.shapes.out
    if problem.layout == "BLHD" and len(shape) >= 3:
        shape = (*shape[:-3], shape[-2], shape[-3], shape[-1])
    return shape


def _check_saved_lse(lse: Array, expected: tuple[int, ...]) -> None:
    # attention(return_lse=True) gives the LSE at the batch shape of the scores, which
    # lacks batch dims that only v carries; so leading dims may be 1 or absent, while the
    # trailing (H, L) must match exactly (a per-head LSE cannot broadcast over heads).
    shape = tuple(lse.shape)
    exact = min(2, len(expected))
    ok = (
        exact <= len(shape) <= len(expected)
        and shape[len(shape) - exact:] == expected[len(expected) - exact:]
        and all(s in (1, t) for s, t in zip(shape[::-1], expected[::-1], strict=False))
    )
    if not ok:
        raise ValueError(
            f"lse of shape {shape} does not match the attention problem: expected "
            f"{expected} (..., H, L), leading dims may be 1 or left out"
        )


def _finish_grad(g: Array, x_user: Array, problem: AttentionProblem) -> Array:
    # A 2-D input got a head axis of size 1 in build_problem; to_user_form drops it only
    # when every input was 2-D, so drop it here when this one alone was.
    if x_user.ndim == 2 and problem.shapes.ndim > 2:
        g = g[0, ...]
    return problem.to_user_form(g, swap=True)


def _array_api_backward(problem: AttentionProblem, dout: Array, out: Array | None,
                        lse: Array | None) -> AttentionGrads:
    if problem.precision == "compensated":
        if out is not None or lse is not None:
            raise ValueError(
                "precision='compensated' recomputes the forward in double-float; do not "
                "pass output= or lse= (their float64 rounding is what it avoids)"
            )
        _check_materialised_memory(problem, arrays=4, what="precision='compensated'",
                                  instead="use precision='standard' with "
                                  "implementation='blocked'")
        return compensated_backward(problem, dout)
    if _use_blocked(problem):
        with _threads.worker_threads(problem.xp) as num_threads:
            return blocked_attention_backward(problem, dout, out=out, lse=lse,
                                              num_threads=num_threads)
    # The weights and dS at least (dP is formed from them).
    _check_materialised_memory(problem, arrays=2, what="implementation='direct'",
                              instead=_USE_BLOCKED)
    _threads.settle_allocator(problem.xp)
    return direct_backward(problem, dout, out=out, lse=lse)


def attention_backward(
    grad_out: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    alignment: str = "top_left",
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    rng: Any = None,
    masked_rows: str = "zero",
    layout: str = "BHLD",
    compute_dtype: Any = None,
    precision: str = "standard",
    implementation: str | None = None,
    output: Any = None,
    lse: Any = None,
    xp: Any = None,
    sinks: Any = None,
    attention_chunk: int | None = None,
    qv: Any = None,
) -> AttentionGrads:
    """Analytic gradients of ``attention`` with respect to q, k, v and bias.

    Computes, in float64 by default and without autograd, with S the final scores,
    P = softmax(S), P_drop the weights after dropout and O the output::

        dV = P_drop^T dO          dP = (dO V^T) * keep / (1 - dropout_p)
        dS = P * (dP - rowsum(dO * O))
        dQ = scale dS K           dK = scale dS^T Q          d bias = dS

    Grouped-query heads are summed back to their key/value head (key head k serves query
    heads k*G .. k*G+G-1), and gradients of broadcast inputs (batch dims, a bias of
    shape (L, S) or (H, 1, S), ...) are summed over the axes they were broadcast along.

    Parameters
    ----------
    grad_out : array
        Gradient of a loss with respect to the output: the output's shape (..., H, L, Ev)
        in ``layout``, any real floating dtype, the namespace and device of q.
    q, k, v : array
        The forward inputs, exactly as given to ``attention``.
    mask, bias, causal, alignment, scale, dropout_p, dropout_mask, rng : optional
        Exactly as given to ``attention`` for the forward pass; ``rng`` redraws the
        same keep-mask from the same seed.
    masked_rows : {"zero", "nan", "uniform"}
        The forward's policy for fully masked rows: "zero" gives them zero gradients,
        "nan" propagates the plain softmax's NaN, "uniform" (weights 1/S, a constant)
        gives dS = 0 but passes dO/S on to dV.
    layout, compute_dtype, precision : optional
        As for ``attention``. precision="compensated" recomputes the forward and every
        product of the backward in double-float and rounds each gradient once; it takes
        no ``output`` or ``lse`` (their rounding is what it avoids).
    implementation : {None, "direct", "blocked", "cuda"}
        As for ``attention``: "direct" materialises the scores; "blocked" recomputes
        the weights block by block from the LSE (FlashAttention-2's backward) with
        O(block) extra memory per worker thread; "cuda" runs the fused backward kernels
        on CuPy arrays (the same algorithm, deterministic: no atomics; see
        docs/gpu.rst); None takes "cuda" for CuPy inputs whose options the kernels
        have, else chooses by the size of the score array, as the forward does.
    output : array, optional
        The forward output to use in rowsum(dO * O) instead of recomputing it, as a
        fused backward kernel uses its saved output. Shape of ``grad_out``.
    lse : array, optional
        The forward log-sum-exp (..., H, L) to rebuild P = exp(S - lse) from instead of
        recomputing the softmax, as fused kernels do; -inf marks a fully masked row.
        Leading (batch) dims may be 1 or left out, as ``attention(return_lse=True)``
        returns them.
    xp : namespace or str, optional
        As for ``attention``: the namespace or its name (``xp="numpy"``); inferred when
        None.
    sinks, attention_chunk, qv : optional
        As for ``attention``; their gradients are ``AttentionGrads.dsinks`` and ``.dqv``.

    Returns
    -------
    AttentionGrads
        ``(dq, dk, dv, dbias)``: dq, dk, dv in the shape, layout, dtype, namespace and
        device of q, k, v; dbias in the shape and dtype of ``bias``, or None. The
        attributes ``dsinks`` (H,) and ``dqv`` (the shape of ``qv``) hold the gradients of
        ``sinks`` and ``qv`` (None without them); they are not part of the 4-tuple.

    Raises
    ------
    TypeError
        As ``attention``; also a ``grad_out``, ``output`` or ``lse`` from another library
        or device, or not of a real floating dtype.
    ValueError
        As ``attention``; also ``grad_out``, ``output`` or ``lse`` of the wrong shape, or an
        implementation or precision the backward does not have.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # B=2, H=4, L=5, E=8
    >>> k = rng.standard_normal((2, 2, 7, 8))   # K=2 key heads (grouped-query)
    >>> v = rng.standard_normal((2, 2, 7, 3))   # S=7, Ev=3
    >>> bias = rng.standard_normal((4, 1, 7))   # broadcast over batch and queries
    >>> dout = rng.standard_normal((2, 4, 5, 3))
    >>> g = refattn.attention_backward(dout, q, k, v, bias=bias, causal=True)
    >>> g.dq.shape, g.dk.shape, g.dv.shape, g.dbias.shape
    ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 3), (4, 1, 7))

    A central difference of the forward along a random direction agrees:

    >>> def loss(kk):
    ...     return np.sum(dout * refattn.attention(q, kk, v, bias=bias, causal=True))
    >>> u, h = rng.standard_normal(k.shape), 1e-5
    >>> fd = (loss(k + h * u) - loss(k - h * u)) / (2 * h)
    >>> bool(abs(fd - np.sum(g.dk * u)) < 1e-6)
    True
    """
    problem = build_problem(
        q, k, v, mask=mask, bias=bias, causal=causal, window=window, alignment=alignment,
        scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, score_mod=score_mod,
        mask_mod=mask_mod, dropout_p=dropout_p, dropout_mask=dropout_mask, rng=rng,
        masked_rows=masked_rows, layout=layout, compute_dtype=compute_dtype,
        precision=precision, implementation=implementation, xp=xp, sinks=sinks,
        attention_chunk=attention_chunk, qv=qv,
    )
    # q first, so that a mismatch is reported as "q is a ... array but grad_out is ...".
    infer_namespace({"q": q, "grad_out": grad_out, "output": output, "lse": lse}, xp=xp,
                    required=("grad_out",))
    out_shape = _user_out_shape(problem)
    for name, x in (("grad_out", grad_out), ("output", output)):
        if x is not None and tuple(x.shape) != out_shape:
            raise ValueError(
                f"{name} must have the output's shape {out_shape} (..., H, L, Ev in layout "
                f"{problem.layout!r}); got {tuple(x.shape)}"
            )
    xp = problem.xp
    lse_c = None
    if lse is not None:
        _check_saved_lse(lse, problem.shapes.user_scores[:-1])
        # Read only (weights_from_lse): a saved LSE in the compute dtype is used as it is.
        lse_c = lse if lse.dtype == problem.compute_dtype else xp.astype(
            lse, problem.compute_dtype)
        if problem.shapes.ndim == 2:
            lse_c = xp.reshape(lse_c, (1, *lse_c.shape))
    dout = problem.to_compute_form(grad_out)
    out = None if output is None else problem.to_compute_form(output)
    grads = None
    if _use_cuda(problem, return_weights=False):
        grads = _cuda_path(problem, lambda cuda: cuda.backward(problem, dout, out=out,
                                                                lse=lse_c))
    if grads is None:
        grads = _array_api_backward(problem, dout, out, lse_c)
    return AttentionGrads(
        dq=_finish_grad(grads.dq, q, problem),
        dk=_finish_grad(grads.dk, k, problem),
        dv=_finish_grad(grads.dv, v, problem),
        # The computed bias may hold ALiBi too (broadcast wider): reduce to the user's.
        dbias=None if bias is None else xp.astype(
            sum_to_shape(grads.dbias, tuple(bias.shape), xp=xp), bias.dtype),
        dsinks=None if sinks is None else xp.astype(grads.dsinks, sinks.dtype),
        dqv=None if qv is None else _finish_grad(grads.dqv, qv, problem),
    )
