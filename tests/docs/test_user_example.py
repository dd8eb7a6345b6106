"""Testing your kernel: the complete example file of docs/testing.rst.

Copy it next to your own attention implementation, replace ``my_attention`` with an
import of yours, and run pytest. It needs nothing but refattn with its ``testing`` extra,
torch and pytest: refattn's suite copies it into an empty temporary directory and runs
pytest there, with hypothesis's default settings but for the deadline below.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn.testing import assert_attention_close
from refattn.testing import strategies as ras


def my_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The kernel under test, in torch SDPA's conventions.

    Here: logits and softmax in float32 whatever the input dtype, output rounded back to
    it, as fused kernels do. Replace this function with yours.
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dtype = q.dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask.to(work)
    # A fully masked row has max -inf: shift it by 0 so that its weights are 0 (torch's
    # convention) instead of NaN.
    m = s.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    p = torch.exp(s - m)
    # A row shifted by its max sums to at least 1; only a fully masked row sums to 0.
    # Clamping at 1 leaves the others alone and keeps the backward finite there (a
    # clamp at a tiny value would divide the gradient by it, overflow, and meet
    # exp(-inf) = 0 as inf * 0 = NaN).
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return (p @ v).to(dtype)


# No deadline: hypothesis's default (200 ms per example) is meant for quick pure functions.
# The first example of a test pays for imports and the oracle's set-up, and a gradient
# check runs three backward passes, so a deadline would fail a correct kernel at random
# (DeadlineExceeded, then FlakyFailure when the rerun is quicker).
NO_DEADLINE = settings(deadline=None)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@NO_DEADLINE
@given(data=st.data())
def test_forward_matches_the_oracle(dtype, data):
    # min_len=1: this kernel has no answer for empty sequences (L or S = 0); drop it to
    # test those too.
    case = data.draw(ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                                         dropout=False, shape=ras.shapes(min_len=1)))
    out = my_attention(case.q, case.k, case.v, **case.kwargs)
    # The case's options say what was computed (mask, causal, scale, ...) in the terms of
    # refattn.attention; the budget follows from the dtype of `out`.
    assert_attention_close(out, case.q, case.k, case.v, **case.options())


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@NO_DEADLINE
@given(data=st.data())
def test_gradients_match_the_oracle(dtype, data):
    case = data.draw(ras.attention_cases(convention="torch", library="torch", dtype=dtype,
                                         dropout=False, shape=ras.shapes(min_len=1,
                                                                         max_len=8)))
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    out = my_attention(q, k, v, **case.kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    out.backward(grad_out)
    assert_attention_close(out.detach(), case.q, case.k, case.v,
                           grads=(q.grad, k.grad, v.grad), grad_out=grad_out,
                           **case.options())
