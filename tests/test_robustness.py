"""Every bad input, on every public function, gets an error that names the argument,
what was seen and what was expected; and what must hold for good inputs holds whatever
their memory layout, writeability or size.

The public API is enumerated (``refattn.__all__``, ``refattn.compat.*``,
``refattn.testing``, ``refattn.mods``) and every function that takes arrays has an entry
in ``ENTRIES``: a new public function without one fails ``test_every_public_function_is
_probed``, so that the probes below cannot silently miss it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import refattn
import refattn.mods
import refattn.testing
from refattn.compat import flash_attn, flex, jax
from refattn.compat import torch as compat_torch

torch = pytest.importorskip("torch")

# --- the public API and one valid call of each function ---------------------------------


@dataclass(frozen=True)
class Entry:
    """One public function: valid arrays for it and how to call it with them.

    ``arrays(lib)`` gives the arguments that are arrays, keyed by parameter name, as
    float64 (floating) or int64 (offsets) arrays of ``lib`` ("numpy" or "torch");
    ``call(arrays, lib, **options)`` calls the function with them. ``required`` names the
    arrays that may not be None, ``floating`` those that carry the inputs' dtype.
    """

    arrays: Callable[[str], dict[str, Any]]
    call: Callable[..., Any]
    required: tuple[str, ...]
    floating: tuple[str, ...] = ()
    takes_xp: bool = True
    takes_rng: bool = False
    refuses_meta: bool = True


def _random(lib: str, *shape: int, seed: int = 0) -> Any:
    x = np.random.default_rng(seed + sum(shape)).standard_normal(shape)
    return torch.from_numpy(x) if lib == "torch" else x


def _ints(lib: str, values: list[int]) -> Any:
    x = np.asarray(values, dtype=np.int64)
    return torch.from_numpy(x) if lib == "torch" else x


def _arrays(**shapes: tuple[int, ...]) -> Callable[[str], dict[str, Any]]:
    return lambda lib: {name: _random(lib, *shape, seed=i)
                        for i, (name, shape) in enumerate(shapes.items())}


def _with_offsets(make: Callable[[str], dict[str, Any]], q_total: int,
                  k_total: int) -> Callable[[str], dict[str, Any]]:
    def arrays(lib: str) -> dict[str, Any]:
        return {**make(lib), "cu_seqlens_q": _ints(lib, [0, 1, q_total]),
                "cu_seqlens_k": _ints(lib, [0, 2, k_total])}
    return arrays


def _mha(lib: str) -> Any:
    # The module's parameters in the inputs' library: named, as xp= now accepts.
    return refattn.MultiheadAttention(4, 2, xp=lib)


def _mha_forward_call(a: dict[str, Any], lib: str, **kw: Any) -> Any:
    m = _mha(lib)
    return refattn.multi_head_attention_forward(
        a["query"], a["key"], a["value"], 4, 2, m.in_proj_weight, m.in_proj_bias, None,
        None, False, 0.0, m.out_proj.weight, m.out_proj.bias, **kw)


QKV = _arrays(q=(1, 2, 3, 4), k=(1, 2, 5, 4), v=(1, 2, 5, 4))
QKV_BLHD = _arrays(q=(1, 3, 2, 4), k=(1, 5, 2, 4), v=(1, 5, 2, 4))
PACKED = _with_offsets(_arrays(q=(3, 2, 4), k=(5, 2, 4), v=(5, 2, 4)), 3, 5)
SEQ = _arrays(query=(3, 1, 4), key=(5, 1, 4), value=(5, 1, 4))
CACHE = _arrays(q=(1, 1, 2, 4), k_cache=(1, 6, 2, 4), v_cache=(1, 6, 2, 4), k=(1, 1, 2, 4),
                v=(1, 1, 2, 4))


def _named(make: Callable[[str], dict[str, Any]], *names: str) -> Callable[[str], dict]:
    # The same arrays under torch's / JAX's parameter names.
    return lambda lib: dict(zip(names, make(lib).values(), strict=True))


ENTRIES: dict[str, Entry] = {
    "attention": Entry(
        QKV, lambda a, lib, **kw: refattn.attention(a["q"], a["k"], a["v"], **kw),
        ("q", "k", "v"), ("q", "k", "v"), takes_rng=True),
    "attention_backward": Entry(
        lambda lib: {"grad_out": _random(lib, 1, 2, 3, 4, seed=9), **QKV(lib)},
        lambda a, lib, **kw: refattn.attention_backward(a["grad_out"], a["q"], a["k"],
                                                        a["v"], **kw),
        ("grad_out", "q", "k", "v"), ("q", "k", "v"), takes_rng=True),
    "scaled_dot_product_attention": Entry(
        _named(QKV, "query", "key", "value"),
        lambda a, lib, **kw: refattn.scaled_dot_product_attention(
            a["query"], a["key"], a["value"], **kw),
        ("query", "key", "value"), ("query", "key", "value"), takes_rng=True),
    "scaled_dot_product_attention_backward": Entry(
        lambda lib: {"grad_out": _random(lib, 1, 2, 3, 4, seed=9),
                     **_named(QKV, "query", "key", "value")(lib)},
        lambda a, lib, **kw: refattn.scaled_dot_product_attention_backward(
            a["grad_out"], a["query"], a["key"], a["value"], **kw),
        ("grad_out", "query", "key", "value"), ("query", "key", "value")),
    "multi_head_attention_forward": Entry(
        SEQ, _mha_forward_call, ("query", "key", "value")),
    "MultiheadAttention.forward": Entry(
        SEQ, lambda a, lib, **kw: _mha(lib).forward(a["query"], a["key"], a["value"], **kw),
        ("query", "key", "value")),
    "attention_varlen": Entry(
        PACKED,
        lambda a, lib, **kw: refattn.attention_varlen(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], **kw),
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"), ("q", "k", "v"), takes_rng=True),
    "attention_varlen_backward": Entry(
        lambda lib: {"grad_out": _random(lib, 3, 2, 4, seed=9), **PACKED(lib)},
        lambda a, lib, **kw: refattn.attention_varlen_backward(
            a["grad_out"], a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
            **kw),
        ("grad_out", "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"), ("q", "k", "v"),
        takes_rng=True),
    "attention_with_kvcache": Entry(
        CACHE,
        lambda a, lib, **kw: refattn.attention_with_kvcache(
            a["q"], a["k_cache"], a["v_cache"], k=a["k"], v=a["v"], cache_seqlens=3, **kw),
        ("q", "k_cache", "v_cache"), ("q", "k_cache", "v_cache", "k", "v")),
    "attention_scores": Entry(
        _arrays(q=(1, 2, 3, 4), k=(1, 2, 5, 4)),
        lambda a, lib, **kw: refattn.attention_scores(a["q"], a["k"], **kw),
        ("q", "k"), ("q", "k")),
    "bmm_attention": Entry(
        _arrays(x1=(2, 3, 4), x2=(2, 5, 4)),
        lambda a, lib, **kw: refattn.bmm_attention(a["x1"], a["x2"], **kw),
        ("x1", "x2"), ("x1", "x2")),
    "attention_pooling": Entry(
        _arrays(x=(2, 5, 3), scores=(2, 5)),
        lambda a, lib, **kw: refattn.attention_pooling(a["x"], scores=a["scores"], **kw),
        ("x",)),
    "flash_attn_func": Entry(
        QKV_BLHD,
        lambda a, lib, **kw: flash_attn.flash_attn_func(a["q"], a["k"], a["v"], **kw),
        ("q", "k", "v"), ("q", "k", "v"), takes_rng=True),
    "flash_attn_varlen_func": Entry(
        PACKED,
        lambda a, lib, **kw: flash_attn.flash_attn_varlen_func(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 2, 3, **kw),
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"), ("q", "k", "v"), takes_rng=True),
    "flash_attn_with_kvcache": Entry(
        CACHE,
        lambda a, lib, **kw: flash_attn.flash_attn_with_kvcache(
            a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"], cache_seqlens=3, **kw),
        ("q", "k_cache", "v_cache"), ("q", "k_cache", "v_cache", "k", "v")),
    "apply_rotary_emb": Entry(
        _arrays(x=(1, 3, 2, 4), cos=(5, 1), sin=(5, 1)),
        lambda a, lib, **kw: refattn.apply_rotary_emb(a["x"], a["cos"], a["sin"], **kw),
        ("x", "cos", "sin"), ("x", "cos", "sin")),
    "flash_attn_qkvpacked_func": Entry(
        _arrays(qkv=(1, 3, 3, 2, 4)),
        lambda a, lib, **kw: flash_attn.flash_attn_qkvpacked_func(a["qkv"], **kw),
        ("qkv",), ("qkv",), takes_rng=True),
    "flash_attn_kvpacked_func": Entry(
        _arrays(q=(1, 3, 2, 4), kv=(1, 5, 2, 2, 4)),
        lambda a, lib, **kw: flash_attn.flash_attn_kvpacked_func(a["q"], a["kv"], **kw),
        ("q", "kv"), ("q", "kv"), takes_rng=True),
    "flash_attn_varlen_qkvpacked_func": Entry(
        lambda lib: {"qkv": _random(lib, 3, 3, 2, 4), "cu_seqlens": _ints(lib, [0, 1, 3])},
        lambda a, lib, **kw: flash_attn.flash_attn_varlen_qkvpacked_func(
            a["qkv"], a["cu_seqlens"], 2, **kw),
        ("qkv", "cu_seqlens"), ("qkv",), takes_rng=True),
    "flash_attn_varlen_kvpacked_func": Entry(
        lambda lib: {"q": _random(lib, 3, 2, 4), "kv": _random(lib, 5, 2, 2, 4, seed=1),
                     "cu_seqlens_q": _ints(lib, [0, 1, 3]),
                     "cu_seqlens_k": _ints(lib, [0, 2, 5])},
        lambda a, lib, **kw: flash_attn.flash_attn_varlen_kvpacked_func(
            a["q"], a["kv"], a["cu_seqlens_q"], a["cu_seqlens_k"], 2, 3, **kw),
        ("q", "kv", "cu_seqlens_q", "cu_seqlens_k"), ("q", "kv"), takes_rng=True),
    "flex_attention": Entry(
        _named(QKV, "query", "key", "value"),
        lambda a, lib, **kw: flex.flex_attention(a["query"], a["key"], a["value"], **kw),
        ("query", "key", "value"), ("query", "key", "value")),
    "dot_product_attention": Entry(
        _named(QKV_BLHD, "query", "key", "value"),
        lambda a, lib, **kw: jax.dot_product_attention(a["query"], a["key"], a["value"],
                                                       **kw),
        ("query", "key", "value"), ("query", "key", "value")),
    "exact_attention": Entry(
        _arrays(q=(1, 1, 2, 2), k=(1, 1, 3, 2), v=(1, 1, 3, 2)),
        lambda a, lib, **kw: refattn.testing.exact_attention(a["q"], a["k"], a["v"],
                                                             digits=20, **kw),
        ("q", "k", "v")),
    "assert_attention_close": Entry(
        lambda lib: {"actual": refattn.attention(*QKV(lib).values()), **QKV(lib)},
        lambda a, lib, **kw: refattn.testing.assert_attention_close(
            a["actual"], a["q"], a["k"], a["v"], **kw),
        ("actual", "q", "k", "v"), takes_xp=False),
    "assert_close": Entry(
        lambda lib: {"actual": _random(lib, 2, 3), "desired": _random(lib, 2, 3)},
        lambda a, lib, **kw: refattn.testing.assert_close(a["actual"], a["desired"], **kw),
        # A meta tensor's device is compared with the other's and reported: that is
        # assert_close's answer (tests/testing), not a refusal.
        ("actual", "desired"), takes_xp=False, refuses_meta=False),
    "decode_flash_dropout_mask": Entry(
        _arrays(S_dmask=(1, 2, 3)),
        lambda a, lib, **kw: refattn.testing.decode_flash_dropout_mask(a["S_dmask"], **kw),
        ("S_dmask",)),
    "mods.alibi": Entry(
        _arrays(slopes=(2,)), lambda a, lib: refattn.mods.alibi(a["slopes"]), ("slopes",),
        takes_xp=False),
    "mods.relative_position_bias": Entry(
        _arrays(table=(2, 3)),
        lambda a, lib: refattn.mods.relative_position_bias(a["table"]), ("table",),
        takes_xp=False),
    "mods.document_mask": Entry(
        lambda lib: {"doc_ids_q": _ints(lib, [0, 0, 1])},
        lambda a, lib: refattn.mods.document_mask(a["doc_ids_q"]), ("doc_ids_q",),
        takes_xp=False),
}

# Public callables that take no array argument (classes, mod factories of ints, the
# thread settings): nothing above applies to them.
NO_ARRAYS = {
    "AttentionGrads", "AttentionResult", "KVCacheResult", "MultiheadAttention",
    "get_num_threads", "set_num_threads", "create_block_mask", "BlockMask", "AuxOutput",
    "ExactResult", "mods.causal", "mods.sliding_window", "mods.softcap", "mods.prefix_lm",
    "MultiheadAttention.from_torch",
}


def _public_callables() -> set[str]:
    names = set()
    for prefix, module in (("", refattn), ("", compat_torch), ("", flash_attn), ("", flex),
                           ("", jax), ("", refattn.testing), ("mods.", refattn.mods)):
        for name in module.__all__:
            if callable(getattr(module, name)) and not name.startswith("__"):
                names.add(prefix + name)
    names.add("MultiheadAttention.forward")
    names.add("MultiheadAttention.from_torch")
    return names


def test_every_public_function_is_probed():
    missing = _public_callables() - set(ENTRIES) - NO_ARRAYS
    assert not missing, f"public functions without a probe entry: {sorted(missing)}"


def _each(predicate: Callable[[Entry], bool] = lambda e: True) -> list[Any]:
    return [pytest.param(name, id=name) for name, e in ENTRIES.items() if predicate(e)]


def _each_required(predicate: Callable[[Entry], bool] = lambda e: True) -> list[Any]:
    return [pytest.param(name, arg, id=f"{name}-{arg}")
            for name, e in ENTRIES.items() if predicate(e) for arg in e.required]


def _options(name: str) -> dict[str, Any]:
    # The option a call needs to be a valid call; none, for most.
    return {"factor": 2.0} if name == "assert_attention_close" else {}


@pytest.mark.parametrize("name", _each())
def test_the_valid_call_works(name):
    # The probes below change one argument of this call: it must be valid as it stands,
    # or their errors could come from something else.
    entry = ENTRIES[name]
    entry.call(entry.arrays("numpy"), "numpy", **_options(name))


# --- None for a required array -----------------------------------------------------------


@pytest.mark.parametrize("name,arg", _each_required())
def test_none_for_a_required_array(name, arg):
    entry = ENTRIES[name]
    arrays = {**entry.arrays("numpy"), arg: None}
    with pytest.raises(TypeError, match=rf"^{arg} must be an array \(NumPy, torch, CuPy or "
                       r"array-API\); got None$"):
        entry.call(arrays, "numpy")


# --- arrays that look like arrays but are not what they seem ---------------------------


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("name,arg", _each_required())
def test_numpy_matrix(name, arg):
    # Any np.matrix: the refusal comes before the shapes are looked at.
    entry = ENTRIES[name]
    arrays = {**entry.arrays("numpy"), arg: np.asmatrix(np.ones((2, 2)))}
    with pytest.raises(TypeError, match=rf"^{arg} is a numpy\.matrix .*pass "
                       rf"np\.asarray\({arg}\)"):
        entry.call(arrays, "numpy")


@pytest.mark.parametrize("name,arg", _each_required())
def test_numpy_masked_array(name, arg):
    entry = ENTRIES[name]
    arrays = entry.arrays("numpy")
    x = arrays[arg]
    arrays[arg] = np.ma.masked_array(x, mask=np.zeros(x.shape, dtype=bool))
    with pytest.raises(TypeError, match=rf"^{arg} is a NumPy masked array.*"
                       rf"{arg}\.filled\(.*boolean mask="):
        entry.call(arrays, "numpy")


@pytest.mark.parametrize("name,arg", _each_required(lambda e: e.refuses_meta))
def test_torch_meta_tensor(name, arg):
    # One meta tensor among cpu tensors: named before the device mismatch is seen.
    entry = ENTRIES[name]
    arrays = entry.arrays("torch")
    arrays[arg] = torch.empty(arrays[arg].shape, dtype=arrays[arg].dtype, device="meta")
    with pytest.raises(TypeError, match=rf"^{arg} is a torch meta tensor \(no values\)"):
        entry.call(arrays, "torch")


@pytest.mark.parametrize("name,implementation", [
    ("attention", "direct"), ("attention", "blocked"), ("attention_backward", "direct"),
    ("attention_backward", "blocked"), ("attention_varlen", None),
    ("attention_with_kvcache", None)])
def test_all_meta_tensors(name, implementation):
    # Every input on meta: the direct path used to return a meta "result" with no values,
    # the blocked path, varlen and the cache to fail in .item().
    entry = ENTRIES[name]
    arrays = {n: torch.empty(x.shape, dtype=x.dtype, device="meta")
              for n, x in entry.arrays("torch").items()}
    kw = {} if implementation is None else {"implementation": implementation}
    with pytest.raises(TypeError, match=r"is a torch meta tensor \(no values\): refattn "
                       r"computes values; pass tensors on cpu or cuda"):
        entry.call(arrays, "torch", **kw)


# --- xp: a namespace or its name ----------------------------------------------------------


def _as_numpy(x: Any) -> Any:
    return x if isinstance(x, np.ndarray) or x is None else np.asarray(x)


@pytest.mark.parametrize("name", _each(lambda e: e.takes_xp))
def test_xp_by_name(name):
    entry = ENTRIES[name]
    arrays = entry.arrays("numpy")
    by_module = entry.call(arrays, "numpy", xp=np, **_options(name))
    by_name = entry.call(arrays, "numpy", xp="numpy", **_options(name))
    # The same call: the same results, bit for bit.
    for a, b in zip(by_module if isinstance(by_module, tuple) else (by_module,),
                    by_name if isinstance(by_name, tuple) else (by_name,), strict=True):
        if hasattr(a, "shape"):
            np.testing.assert_array_equal(_as_numpy(a), _as_numpy(b))


@pytest.mark.parametrize("name", _each(lambda e: e.takes_xp))
def test_xp_name_of_another_library(name):
    entry = ENTRIES[name]
    with pytest.raises(TypeError, match=r"xp is the torch namespace but \w+ is a numpy"):
        entry.call(entry.arrays("numpy"), "numpy", xp="torch", **_options(name))


@pytest.mark.parametrize("name", _each(lambda e: e.takes_xp))
@pytest.mark.parametrize("xp,error", [("nump", ValueError), (3, TypeError)])
def test_xp_that_is_no_namespace(name, xp, error):
    entry = ENTRIES[name]
    with pytest.raises(error, match=r"xp must be an array namespace \(a module such as "
                       r"numpy\) or one of the names 'numpy', 'torch', 'cupy', "
                       r"'array_api_strict', 'jax'; got "):
        entry.call(entry.arrays("numpy"), "numpy", xp=xp, **_options(name))


def test_xp_name_alone_makes_arrays_of_that_library():
    # MultiheadAttention creates its parameters without an input to infer from.
    m = refattn.MultiheadAttention(4, 2, xp="torch")
    assert isinstance(m.in_proj_weight, torch.Tensor)
    with pytest.raises(ValueError, match=r"xp must be an array namespace.*got 'pytorch'"):
        refattn.MultiheadAttention(4, 2, xp="pytorch")


# --- dtypes are compared as given, before any widening ----------------------------------

DTYPES = ["float16", "bfloat16", "float32", "float64"]
WIDENING = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
            "flex_attention", "attention", "attention_varlen", "scaled_dot_product_attention",
            "dot_product_attention"]


@pytest.mark.parametrize("name", WIDENING)
@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_dtype_pairs(name, q_dtype, kv_dtype):
    entry = ENTRIES[name]
    arrays = entry.arrays("torch")
    first = entry.floating[0]
    for n in entry.floating:
        arrays[n] = arrays[n].to(getattr(torch, q_dtype if n == first else kv_dtype))
    if q_dtype == kv_dtype:
        out = entry.call(arrays, "torch")
        out = out[0] if isinstance(out, tuple) else out
        assert out.dtype == getattr(torch, q_dtype)
        return
    # The first input and both dtypes named, as given (in either order: JAX's front-end
    # words it as JAX does); a 16-bit q widened first used to pass silently.
    named = rf"^(?=.*\b{first}\b)(?=.*\b{q_dtype}\b)(?=.*\b{kv_dtype}\b).* must .*dtype"
    with pytest.raises((TypeError, ValueError), match=named):
        entry.call(arrays, "torch")


# --- options whose errors used to come from elsewhere -----------------------------------


@pytest.mark.parametrize("name", _each(lambda e: e.takes_rng))
def test_negative_rng(name):
    entry = ENTRIES[name]
    with pytest.raises(ValueError, match=r"^rng must be a non-negative int seed or a "
                       r"numpy\.random\.Generator; got -1$"):
        entry.call(entry.arrays("numpy"), "numpy", dropout_p=0.5, rng=-1)


def test_negative_rng_and_seed_of_multihead_attention():
    with pytest.raises(ValueError, match=r"^seed must be a non-negative int seed"):
        refattn.MultiheadAttention(4, 2, seed=-1)
    m = refattn.MultiheadAttention(4, 2, dropout=0.5)  # training mode: dropout applies
    x = _random("numpy", 3, 4)
    with pytest.raises(ValueError, match=r"^rng must be a non-negative int seed"):
        m.forward(x, x, x, rng=-1)


@pytest.mark.parametrize("module,shown", [
    (lambda: torch.nn.Linear(3, 3), r"torch\.nn\.modules\.linear\.Linear"),
    (lambda: "mha", r"builtins\.str"),
])
def test_from_torch_of_another_object(module, shown):
    with pytest.raises(TypeError, match=rf"^module must be a torch\.nn\.MultiheadAttention; "
                       rf"got {shown}$"):
        refattn.MultiheadAttention.from_torch(module())


def _first_key(score, b, h, q_idx, kv_idx):
    return score[..., :1]


def _wider(score, b, h, q_idx, kv_idx):
    return score + 0 * b[..., None]


@pytest.mark.parametrize("mod,returned", [(_first_key, r"\(1, 2, 3, 1\)"),
                                          (_wider, r"\(1, 1, 2, 3, 5\)")])
@pytest.mark.parametrize("name,implementation", [
    ("attention", "direct"), ("attention", None), ("attention_backward", "direct"),
    ("flex_attention", None)])
def test_score_mod_of_the_wrong_shape(name, implementation, mod, returned):
    # The direct path called the score (1, 2, 3, 5) and met the mod's result in a matmul.
    entry = ENTRIES[name]
    kw = {"score_mod": mod}
    if implementation is not None:
        kw["implementation"] = implementation
    with pytest.raises(ValueError, match=r"score_mod must return an array of its score "
                       r"argument's shape; on the scores of shape \(1, 2, 3, 5\) it "
                       rf"returned shape {returned}"):
        entry.call(entry.arrays("numpy"), "numpy", **kw)


def test_score_mod_of_the_wrong_shape_on_the_blocked_path():
    # The same check, with the blocked path's block shape and its once-per-block hint.
    with pytest.raises(ValueError, match=r"score_mod must return an array of its score "
                       r"argument's shape; on a block of scores of shape \(1, 1, 3, 5\) it "
                       r"returned shape \(1, 1, 3, 1\) \(the blocked path calls it once per "
                       r"block"):
        refattn.attention(*QKV("numpy").values(), score_mod=_first_key,
                          implementation="blocked")


# --- inputs are never written, whatever their layout ------------------------------------


def _layouts(x: np.ndarray) -> dict[str, np.ndarray]:
    """``x``'s values in other memory layouts, each read-only."""
    doubled = np.empty((*x.shape[:-1], 2 * x.shape[-1]))
    doubled[..., ::2] = x
    flipped = np.ascontiguousarray(x[..., ::-1, :])
    views = {
        "read-only": x.copy(),
        "strided": doubled[..., ::2],
        "fortran": np.asfortranarray(x),
        "negative-stride": flipped[..., ::-1, :],
    }
    for v in views.values():
        v.flags.writeable = False
    return views


PATHS = [{"implementation": "direct"}, {"implementation": "blocked"},
         {"precision": "compensated"}]


@pytest.mark.parametrize("layout", ["read-only", "strided", "fortran", "negative-stride"])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: next(iter(p.values())))
def test_layouts_give_the_contiguous_answer(path, layout):
    arrays = {"grad_out": _random("numpy", 1, 2, 3, 4, seed=9), **QKV("numpy")}
    bias = _random("numpy", 3, 5, seed=5)
    given = {n: _layouts(x)[layout] for n, x in arrays.items()}
    saved = {n: x.copy() for n, x in given.items()}
    q, k, v = (given[n] for n in "qkv")
    out = refattn.attention(q, k, v, bias=bias, causal=True, **path)
    grads = refattn.attention_backward(given["grad_out"], q, k, v, bias=bias, causal=True,
                                       **path)
    want = refattn.attention(*(arrays[n] for n in "qkv"), bias=bias, causal=True, **path)
    want_grads = refattn.attention_backward(arrays["grad_out"], *(arrays[n] for n in "qkv"),
                                            bias=bias, causal=True, **path)
    # Another layout may take BLAS another summation order over E = 4 terms: a few ulps
    # of float64, far below 1e-12 of values of order 1.
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    for g, w in zip(grads[:3], want_grads[:3], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    for n, x in given.items():
        np.testing.assert_array_equal(x, saved[n])


# flash-attn's KV-cache functions append the new keys into the caches in place, as
# flash-attn does (docs/conventions.rst): only their caches are written.
IN_PLACE = {"flash_attn_with_kvcache": ("k_cache", "v_cache")}


@pytest.mark.parametrize("name", _each())
def test_inputs_are_never_written(name):
    # Every array read-only: a path that wrote into an input would raise; values are
    # compared too, for arrays of libraries without read-only flags.
    entry = ENTRIES[name]
    arrays = entry.arrays("numpy")
    written = IN_PLACE.get(name, ())
    saved = {n: x.copy() for n, x in arrays.items() if n not in written}
    for n, x in arrays.items():
        x.flags.writeable = n in written
    entry.call(arrays, "numpy", **_options(name))
    for n, x in saved.items():
        np.testing.assert_array_equal(arrays[n], x)


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_read_only_caches_are_refused_by_name(name):
    entry = ENTRIES[name]
    arrays = entry.arrays("numpy")
    arrays[IN_PLACE[name][0]].flags.writeable = False
    with pytest.raises(TypeError, match=f"^{IN_PLACE[name][0]} cannot be written in place"):
        entry.call(arrays, "numpy", **_options(name))


# --- memory: the bounded path stays small, the materialised ones refuse at once ---------

L_BIG = 116_000  # L x S float64 scores: 108 GB


def _big(L: int, S: int, E: int = 8) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    return tuple(rng.standard_normal((1, 1, n, E)) for n in (L, S, S))


def _score_bytes(L: int, S: int) -> int:
    return L * S * 8


# Run in a fresh interpreter: its peak resident memory (ru_maxrss) after the inputs exist
# is what the calls add, which the test process's own history would hide. tracemalloc
# would see the same but slows the block loop several-fold.
_BOUNDED_SCRIPT = """
import resource, sys
import numpy as np
import refattn
L, E = int(sys.argv[1]), 8
rng = np.random.default_rng(1)
q, k, v = (rng.standard_normal((1, 1, L, E)) for _ in range(3))
dout = v.copy()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = refattn.attention(q, k, v, window=(16, 0), return_lse=True)
assert res.out.shape == (1, 1, L, E) and bool(np.all(np.isfinite(res.out)))
refattn.attention_backward(dout, q, k, v, implementation="blocked", window=(16, 0))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * (1 if sys.platform == "darwin" else 1024))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="resource.getrusage is POSIX only")
def test_blocked_path_memory_does_not_grow_with_l_times_s():
    # A band of 16 keys lets the blocked path skip the blocks it hides, so L = S = 116000
    # runs in seconds; what it holds at once is the outputs and gradients (L x E) and
    # per-block scratch, never anything at L x S. The forward leaves the choice to
    # implementation=None, which must take the bounded path at this size.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(refattn.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _BOUNDED_SCRIPT, str(L_BIG)], env=env,
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    added = int(done.stdout.split()[-1])
    # 300 MB: a few dozen (L, E) float64 arrays (7.4 MB each) and the threads' scratch;
    # the direct path would need 108 GB for one score array.
    limit = 300 * 2**20
    assert added < limit, f"the blocked path added {added / 2**20:.0f} MiB"
    assert limit < _score_bytes(L_BIG, L_BIG) / 300


# The refusals run in a fresh interpreter under a time limit: without them the blocked
# path with return_weights would compute for hours before failing to allocate, and a
# regression must fail the test rather than hang the suite. Each case reports its
# exception and the memory traced until it was raised.
_REFUSAL_SCRIPT = """
import json, sys, tracemalloc
import numpy as np
import refattn
L, E = int(sys.argv[1]), 8
rng = np.random.default_rng(1)
# A batch of 8 broadcast views (no memory) on top of L = S: 0.86 TB of float64 scores at
# L = S = 116000, more than any host has, so the refusal does not depend on the machine.
q, k, v = (np.broadcast_to(rng.standard_normal((1, 1, L, E)), (8, 1, L, E))
           for _ in range(3))
cases = json.loads(sys.argv[2])
for name, kw, backward in cases:
    tracemalloc.start()
    try:
        if backward:
            refattn.attention_backward(q, q, k, v, **kw)
        else:
            refattn.attention(q, k, v, **kw)
        kind, message = None, ""
    except Exception as exc:
        kind, message = type(exc).__name__, str(exc)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps([name, kind, message, peak]), flush=True)
"""

REFUSALS = {
    "direct": ({"implementation": "direct"}, False, "implementation='direct'",
               "implementation='blocked'"),
    "direct-backward": ({"implementation": "direct"}, True, "implementation='direct'",
                        "implementation='blocked'"),
    "compensated": ({"precision": "compensated"}, False, "precision='compensated'",
                    "implementation='blocked'"),
    "compensated-backward": ({"precision": "compensated"}, True, "precision='compensated'",
                             "implementation='blocked'"),
    "blocked-weights": ({"implementation": "blocked", "return_weights": True}, False,
                        "return_weights=True", "return_lse=True"),
}


@pytest.fixture(scope="module")
def refusals() -> dict[str, list[Any]]:
    cases = [[name, kw, backward] for name, (kw, backward, _, _) in REFUSALS.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(refattn.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _REFUSAL_SCRIPT, str(L_BIG), json.dumps(cases)],
            env=env, capture_output=True, text=True, check=False, timeout=120)
        lines = done.stdout
    except subprocess.TimeoutExpired as exc:
        # Cases that did not report in time are missing below, and fail.
        lines = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
    return {row[0]: row[1:] for row in map(json.loads, lines.splitlines())}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_materialised_paths_refuse_what_cannot_fit(refusals, case):
    _, _, what, instead = REFUSALS[case]
    assert case in refusals, f"{case}: no answer within 120 s (computing, not refusing)"
    kind, message, peak = refusals[case]
    assert kind == "MemoryError", (kind, message)
    assert re.match(rf"{re.escape(what)} materialises the \(\.\.\., H, L, S\) scores: "
                    rf"score shape \(8, 1, {L_BIG}, {L_BIG}\) needs at least \d+ arrays of "
                    r"[\d.]+ GiB \([\d.]+ GiB\) but [\d.]+ GiB of memory is available; ",
                    message), message
    assert instead in message  # what to do about it
    # The size named is that of one score array (8 x L x S float64), worked out here.
    assert f"{8 * _score_bytes(L_BIG, L_BIG) / 2**30:.1f} GiB" in message
    # Refused before anything of the score shape was allocated: the traced peak is the
    # gradient's compute copy at most (8 x L x E float64, 59 MB).
    assert peak < 8 * L_BIG * 8 * 8 * 1.5, peak
