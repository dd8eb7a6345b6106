"""Dropout a target draws itself: what can be checked without being told its keep-mask.

torch's SDPA and user functions in the torch convention draw their own keep-mask and do
not return it. They are checked on a *probe*: the case's batch, heads and head dims
with L = S = 16 (so 256 weights or more per call, enough for the statistics below to
have power) and values ``V = [I | v]``: the first S columns of the output are then the
dropped weights themselves, ``keep * P / (1 - p)``, so the keep-mask of each call is
read back as the non-zero weights (the probe's queries are small, logits of about
N(0, 1/4), so every softmax weight is within a small factor of 1/S and a kept one never
rounds to zero, even in float16). The
target is called ``DRAWS`` times (its RNG seeded per case when the library has a global
one, torch's or NumPy's, and restored afterwards), and:

(iii) a target none of whose calls dropped a weight, and whose outputs equal the
      no-dropout output, ignores ``dropout_p``; a correct kernel keeps all n N weights of
      N calls with probability (1 - p)^(n N) (under 1e-40 for p >= 0.1, n N >= 1024);
(i)   the number kept, K over the n N weights, is Binomial(n N, 1 - p) for a correct
      kernel: it must lie in the exact two-sided binomial interval outside which a
      correct kernel falls with probability under ``FALSE_FAILURE`` (1e-9), computed
      from the binomial's own tails (no normal approximation);
(ii)  the mean of the N outputs estimates the no-dropout output (kept weights are scaled
      by 1 / (1 - p), so E[keep / (1 - p)] = 1). The statistic
      ``T = sum(sign(mu) * (mean - mu))`` over every output entry (mu: the oracle without
      dropout, fixed before the draws) is a mean over the N calls of sums of independent
      terms ``a_w (keep_w / (1 - p) - 1)``, one per weight w = (b, h, i, j), with
      ``a_w = P_ij sum_d sign(mu_id) V_jd``; each term lies in an interval of width
      ``c_w = |a_w| / (1 - p)``. Hoeffding's inequality gives
      ``P(|T| >= t) <= 2 exp(-2 N t^2 / sum_w c_w^2)``, so a correct kernel exceeds
      ``t = sqrt(sum_w c_w^2 ln(2 / FALSE_FAILURE) / (2 N))`` with probability under
      1e-9; the outputs' rounding is allowed for on top (``_rounding``).

Then the first call is judged exactly like any other case, against the oracle given the
keep-mask read back from it (a kernel that drops but forgets to rescale, or drops logits
before the softmax, fails there by far more than rounding).
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..testing._baseline import EPS
from .cases import Case

__all__ = ["DRAWS", "FALSE_FAILURE", "DropoutFinding", "binomial_interval", "judge_draws",
           "probe_case", "refuses", "seeded"]

DRAWS = 4
PROBE_LENGTH = 16
#: The probability with which a correct kernel may fail one probe's check (each of them).
FALSE_FAILURE = 1e-9


def probe_case(case: Case) -> Case:
    """The case a self-drawing target's dropout is checked on.

    The case's batch, heads, head dims and ``dropout_p``; L = S = 16; small queries;
    values ``[I | v]`` so that the first S output columns are the dropped weights.

    Examples
    --------
    >>> from refattn._audit.cases import make_case
    >>> probe = probe_case(make_case("dropout", 0, 0))
    >>> probe.q.shape[-2], probe.k.shape[-2], probe.v.shape[-1] - probe.v.shape[-2] > 0
    (16, 16, True)
    """
    B, H, _, E = case.q.shape
    Ev = case.v.shape[-1]
    n = PROBE_LENGTH
    rng = np.random.default_rng(zlib.crc32(case.describe().encode()))
    # Queries of half size: logits scale * q.k of about N(0, 1/4), so the weights stay
    # within a small factor of 1 / S and a kept one is never rounded to zero.
    q = rng.standard_normal((B, H, n, E)) * 0.5
    k = rng.standard_normal((B, H, n, E))
    eye = np.broadcast_to(np.eye(n), (B, H, n, n))
    v = np.concatenate([eye, rng.standard_normal((B, H, n, Ev))], axis=-1)
    # A keep-mask stands in until the target's own is read back from its output.
    keep = rng.random((B, H, n, n)) >= case.dropout_p
    return Case(case.group, q, k, v, scale=case.scale, dropout_p=case.dropout_p,
                dropout_mask=keep)


def refuses(exc: BaseException) -> bool:
    """Whether ``exc`` is a target's refusal of dropout rather than a crash.

    Examples
    --------
    >>> refuses(NotImplementedError("no dropout")), refuses(ValueError("dropout_p > 0"))
    (True, True)
    >>> refuses(RuntimeError("dropout exploded")), refuses(ValueError("bad shape"))
    (False, False)
    """
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, (ValueError, TypeError)) and "dropout" in str(exc).lower()


@contextlib.contextmanager
def seeded(library: str, seed: int) -> Iterator[None]:
    """Seed the library's global RNG (torch's, NumPy's) for the draws; restore it after.

    Only reproducibility hangs on it: the bounds hold for any independent keep-masks.
    """
    if library == "torch":
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
        return
    if library == "numpy":
        # The legacy global generator is the one a kernel calling np.random.* draws from
        # (a Generator of the kernel's own is out of reach, and needs no seed for the
        # bounds to hold).
        state = np.random.get_state()  # noqa: NPY002 - the global generator is the point
        np.random.seed(seed % 2**32)  # noqa: NPY002
        try:
            yield
        finally:
            np.random.set_state(state)  # noqa: NPY002
        return
    yield


@functools.lru_cache(maxsize=64)  # the same (n, q) recur across cases and dtypes
def binomial_interval(n: int, q: float, alpha: float) -> tuple[int, int]:
    """The smallest [lo, hi] with P(X < lo) <= alpha / 2 and P(X > hi) <= alpha / 2 for
    X ~ Binomial(n, q), from the exact probabilities.

    Examples
    --------
    >>> binomial_interval(256, 0.9, 1e-9)[1] < 256   # keeping all 256: too unlikely
    True
    >>> binomial_interval(10, 0.5, 0.01)
    (1, 9)
    """
    if not 0 < q < 1:
        return (n, n) if q >= 1 else (0, 0)
    k = np.arange(n + 1)
    log_choose = math.lgamma(n + 1) - np.array(
        [math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in range(n + 1)])
    pmf = np.exp(log_choose + k * math.log(q) + (n - k) * math.log1p(-q))
    below = np.cumsum(pmf)  # P(X <= k), nondecreasing
    above = np.cumsum(pmf[::-1])  # P(X >= n - k), nondecreasing
    # lo: the number of k with P(X <= k) <= alpha / 2, so P(X < lo) <= alpha / 2 and
    # P(X < lo + 1) is not; hi likewise from the top.
    lo = int(np.searchsorted(below, alpha / 2, side="right"))
    hi = n - int(np.searchsorted(above, alpha / 2, side="right"))
    return lo, hi


@dataclass
class DropoutFinding:
    """What the draws say: the first call's keep-mask, and a failure where there is one
    (``brief`` for the table, ``detail`` for the report)."""

    keep: np.ndarray
    brief: str = ""
    detail: str = ""
    kept: int = 0
    weights: int = 0


def _rounding(dtype_name: str, P: np.ndarray, v: np.ndarray, p: float, E: int
              ) -> np.ndarray:
    # A first-order bound on one output entry's rounding for a kernel computing in the
    # dtype itself: gamma_m (m = E + S + 4 operations in a row: the E-long score sums,
    # the scale, the softmax's exp and division, the S-long output sums) times the sum
    # of the magnitudes that enter the entry.
    u = EPS[dtype_name] / 2
    m = E + P.shape[-1] + 4
    return m * u * (np.abs(P) @ np.abs(v)) / (1 - p)


def judge_draws(probe: Case, inputs: dict[str, np.ndarray], expected: np.ndarray,
                outs: list[np.ndarray], dtype_name: str) -> DropoutFinding:
    """Checks (iii), (i) and (ii) of the module's docstring on a probe's outputs.

    ``expected`` is the oracle's output without dropout on ``inputs`` (the probe in the
    convention's layout, heads before positions); ``outs`` the target's N outputs.
    """
    p, S = probe.dropout_p, probe.k.shape[-2]
    keeps = [out[..., :S] != 0 for out in outs]
    finding = DropoutFinding(keeps[0], kept=int(sum(k.sum() for k in keeps)),
                             weights=sum(k.size for k in keeps))
    P, v = expected[..., :S], inputs["v"]
    allowance = _rounding(dtype_name, P, v, p, inputs["q"].shape[-1])
    N, K, nN = len(outs), finding.kept, finding.weights
    # (iii) nothing dropped, as the no-dropout output.
    if K == nN and nN * math.log1p(-p) < math.log(FALSE_FAILURE):
        if all(np.all(np.abs(out - expected) <= allowance) for out in outs):
            finding.brief = "dropout_p is ignored"
            finding.detail = (f"dropout_p is ignored: {N} calls with dropout_p={p} kept all "
                              f"{nN // N} weights each and returned the no-dropout output")
        else:
            finding.brief = "nothing dropped"
            finding.detail = (f"no weight dropped: {N} calls with dropout_p={p} kept all "
                              f"{nN // N} weights each (chance for a correct kernel: "
                              f"(1 - p)^{nN})")
        return finding
    # (i) the number kept.
    lo, hi = binomial_interval(nN, 1 - p, FALSE_FAILURE)
    if not lo <= K <= hi:
        finding.brief = "kept fraction"
        finding.detail = (f"kept {K} of {nN} weights ({K / nN:.3f}) over {N} calls with "
                          f"dropout_p={p}: outside [{lo / nN:.3f}, {hi / nN:.3f}], where a "
                          f"correct kernel keeping each with probability {1 - p:g} lands "
                          f"with probability over 1 - {FALSE_FAILURE:g}")
        return finding
    # (ii) the mean against the no-dropout output.
    sign = np.sign(expected)
    a = P * (sign @ np.swapaxes(v, -1, -2))
    t = math.sqrt(float(np.sum((a / (1 - p)) ** 2)) * math.log(2 / FALSE_FAILURE) / (2 * N))
    mean = np.mean(outs, axis=0)
    T = float(np.sum(sign * (mean - expected)))
    bound = t + float(np.sum(allowance))
    if abs(T) > bound:
        finding.brief = "biased mean"
        finding.detail = (f"the mean of {N} calls with dropout_p={p} is not the no-dropout "
                          f"output: sum(sign(oracle) * (mean - oracle)) = {T:.3g}, over its "
                          f"bound {bound:.3g} (Hoeffding at {FALSE_FAILURE:g}, plus rounding)")
    return finding
