"""``MultiheadAttention``: torch's module around :func:`multi_head_attention_forward`.

Parameters are arrays of any library, initialised as torch initialises them but from a
seeded NumPy generator; ``from_torch`` and ``to_torch`` copy weights to and from a
``torch.nn.MultiheadAttention``.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import array_api_compat
import numpy as np

from ..._arrays import to_numpy
from ..._namespace import library_name
from ..._types import Array, Device, Namespace
from ._checks import check_bool, check_positive_int
from ._functional import multi_head_attention_forward
from ._params import Linear, dtype_name, generator, resolve_dtype, resolve_namespace

__all__ = ["MultiheadAttention"]


class MultiheadAttention:
    """``torch.nn.MultiheadAttention`` without torch: parameters are arrays of any library.

    The constructor takes torch's arguments in torch's order; the forward pass is
    :func:`multi_head_attention_forward` (torch 2.13's reference path) in float64, with
    ``batch_first`` handled as torch does. Parameters are initialised as torch does
    (xavier_uniform in-projection, U(-1/sqrt(E), 1/sqrt(E)) out-projection weight, zero
    biases, xavier_normal ``bias_k``/``bias_v``) but from a NumPy generator seeded by
    ``seed``, so they are reproducible; copy a torch module's weights with
    :meth:`from_torch`.

    Parameters
    ----------
    embed_dim : int
        E, the model dimension (query features and output features).
    num_heads : int
        H; must divide E. Each head has D = E // H features.
    dropout : float
        Dropout probability on the attention weights, used in training mode only.
    bias : bool
        Give the in- and out-projections biases.
    add_bias_kv : bool
        Learnable ``bias_k``/``bias_v`` (1, 1, E) appended to the keys/values.
    add_zero_attn : bool
        Append an all-zero key/value.
    kdim, vdim : int, optional
        Key and value feature counts (default E); when either differs from E the
        projections are three separate weights ``q_proj_weight`` (E, E),
        ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim) instead of
        ``in_proj_weight`` (3E, E).
    batch_first : bool
        Batched inputs and outputs are (N, L, E) instead of (L, N, E); ignored for
        unbatched inputs.
    seed : int or numpy.random.Generator
        refattn extra: seeds the initialiser (draw order: projection weights q, k, v or
        packed, out-projection weight, bias_k, bias_v).
    dtype : dtype or str, optional
        refattn extra: dtype of the parameters (default float64).
    like : array, optional
        refattn extra: put the parameters in this array's library and on its device.
    xp : namespace or str, optional
        refattn extra: the parameters' array library or its name, e.g. ``xp="torch"``
        (default NumPy).

    Attributes
    ----------
    in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight, bias_k, \
bias_v : array or None
        As in torch (None where torch registers None).
    out_proj : object
        With ``weight`` (E, E) and ``bias`` (E,) or None.
    training : bool
        Dropout is applied only when True (see :meth:`train`, :meth:`eval`).

    Notes
    -----
    torch's module takes an inference fast path (``torch._native_multi_head_attention``)
    in eval mode without autograd for batch_first self-attention with an even head count,
    bool masks, no bias_kv/zero_attn and packed biased projections. It agrees with this
    reference path except that with ``need_weights=False`` a query that sees no key gets
    NaN there, where the reference (SDPA) path and refattn give 0 before the
    out-projection.

    Examples
    --------
    >>> import numpy as np
    >>> import refattn
    >>> mha = refattn.MultiheadAttention(8, 2, batch_first=True, seed=0)
    >>> x = np.random.default_rng(1).standard_normal((3, 5, 8))   # N=3, L=5, E=8
    >>> causal = np.triu(np.ones((5, 5), dtype=bool), k=1)          # True = masked out
    >>> out, w = mha(x, x, x, attn_mask=causal)
    >>> out.shape, w.shape
    ((3, 5, 8), (3, 5, 5))
    >>> bool(np.allclose(w.sum(axis=-1), 1.0)), float(w[0, 0, 1])
    (True, 0.0)
    >>> out2, none = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    >>> bool(np.allclose(out, out2)), none is None
    (True, True)
    """

    embed_dim: int
    num_heads: int
    head_dim: int
    kdim: int
    vdim: int
    dropout: float
    add_zero_attn: bool
    batch_first: bool
    training: bool
    in_proj_weight: Array | None
    in_proj_bias: Array | None
    q_proj_weight: Array | None
    k_proj_weight: Array | None
    v_proj_weight: Array | None
    bias_k: Array | None
    bias_v: Array | None
    out_proj: Linear
    _qkv_same_embed_dim: bool
    _xp: Namespace
    _device: Device
    _dtype: Any

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        *,
        seed: Any = 0,
        dtype: Any = None,
        like: Array | None = None,
        xp: Namespace | None = None,
    ) -> None:
        E = check_positive_int("embed_dim", embed_dim)
        H = check_positive_int("num_heads", num_heads)
        if E % H:
            raise ValueError(f"embed_dim {E} must be divisible by num_heads {H}")
        for name, flag in (("bias", bias), ("add_bias_kv", add_bias_kv),
                           ("add_zero_attn", add_zero_attn), ("batch_first", batch_first)):
            check_bool(name, flag)
        self.embed_dim = E
        self.num_heads = H
        self.head_dim = E // H
        self.kdim = E if kdim is None else check_positive_int("kdim", kdim)
        self.vdim = E if vdim is None else check_positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == E and self.vdim == E
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
            0.0 <= dropout <= 1.0
        ):
            raise ValueError(f"dropout must be a probability in [0, 1]; got {dropout!r}")
        self.dropout = float(dropout)
        self.add_zero_attn = add_zero_attn
        self.batch_first = batch_first
        self.training = True
        self._xp, self._device = resolve_namespace(like, xp)
        self._dtype = resolve_dtype(dtype, self._xp)

        gen = generator(seed)

        def uniform(shape: tuple[int, ...], bound: float) -> np.ndarray:
            return gen.uniform(-bound, bound, size=shape)

        def xavier_uniform(shape: tuple[int, int]) -> np.ndarray:
            # torch.nn.init.xavier_uniform_: fan_out = rows, fan_in = columns.
            return uniform(shape, math.sqrt(6.0 / (shape[0] + shape[1])))

        if self._qkv_same_embed_dim:
            self.in_proj_weight = self._param(xavier_uniform((3 * E, E)))
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = self._param(xavier_uniform((E, E)))
            self.k_proj_weight = self._param(xavier_uniform((E, self.kdim)))
            self.v_proj_weight = self._param(xavier_uniform((E, self.vdim)))
        # nn.Linear's default (kaiming_uniform with a = sqrt(5)) is U(-1/sqrt(E), 1/sqrt(E));
        # MultiheadAttention leaves the out-projection weight at that.
        out_weight = self._param(uniform((E, E), 1.0 / math.sqrt(E)))
        self.in_proj_bias = self._param(np.zeros(3 * E)) if bias else None
        self.out_proj = Linear(out_weight, self._param(np.zeros(E)) if bias else None)
        if add_bias_kv:
            # xavier_normal_ on (1, 1, E): fan_in = fan_out = E, std = sqrt(2 / 2E).
            std = math.sqrt(1.0 / E)
            self.bias_k = self._param(gen.normal(0.0, std, size=(1, 1, E)))
            self.bias_v = self._param(gen.normal(0.0, std, size=(1, 1, E)))
        else:
            self.bias_k = self.bias_v = None

    def _param(self, host: np.ndarray) -> Array:
        return self._xp.asarray(host, dtype=self._dtype, device=self._device)

    def __repr__(self) -> str:
        return (
            f"MultiheadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"dropout={self.dropout}, kdim={self.kdim}, vdim={self.vdim}, "
            f"batch_first={self.batch_first})"
        )

    # -- training mode, as torch.nn.Module --

    def train(self, mode: bool = True) -> MultiheadAttention:
        """Set training mode (dropout applied) and return self.

        Examples
        --------
        >>> import refattn
        >>> refattn.MultiheadAttention(4, 2).eval().train().training
        True
        """
        check_bool("mode", mode)
        self.training = mode
        return self

    def eval(self) -> MultiheadAttention:
        """Set evaluation mode (no dropout) and return self.

        Examples
        --------
        >>> import refattn
        >>> refattn.MultiheadAttention(4, 2).eval().training
        False
        """
        return self.train(False)

    # -- forward --

    def forward(
        self,
        query: Array,
        key: Array,
        value: Array,
        key_padding_mask: Array | None = None,
        need_weights: bool = True,
        attn_mask: Array | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        dropout_mask: Array | None = None,
        rng: Any = None,
        xp: Namespace | None = None,
    ) -> tuple[Array, Array | None]:
        """torch's ``MultiheadAttention.forward`` (reference path), in float64.

        Parameters
        ----------
        query, key, value : array
            (L, E), (S, kdim), (S, vdim) unbatched; (L, N, E) etc. batched, or (N, L, E)
            etc. with ``batch_first``. The parameters' library.
        key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            As in :func:`multi_head_attention_forward`: bool masks are True = masked out,
            ``need_weights=True`` gives NaN for queries that see no key, False gives 0.
        dropout_mask, rng
            refattn extras: the keep-mask (N, H, L, S_final) or a seed; one of them is
            required in training mode with ``dropout > 0``, and neither may be given
            otherwise.
        xp : namespace or str, optional
            Array namespace of the inputs or its name, e.g. ``xp="numpy"``; inferred
            when None.

        Returns
        -------
        attn_output, attn_output_weights
            As torch: the output in the input layout and the query's dtype; the weights
            (N, L, S_final), (N, H, L, S_final) unaveraged, or None.

        Examples
        --------
        >>> import numpy as np
        >>> import refattn
        >>> mha = refattn.MultiheadAttention(4, 2, add_zero_attn=True).eval()
        >>> x = np.random.default_rng(0).standard_normal((3, 4))   # unbatched (L, E)
        >>> out, w = mha.forward(x, x, x, average_attn_weights=False)
        >>> out.shape, w.shape   # S_final = 3 keys + 1 zero key
        ((3, 4), (2, 3, 4))
        """
        # torch transposes batched inputs to sequence-first and back; unbatched ones stay.
        swap = self.batch_first and getattr(query, "ndim", None) == 3
        if swap:
            query, key, value = (_swap01(x) for x in (query, key, value))
        out, weights = multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights,
            is_causal=is_causal, dropout_mask=dropout_mask, rng=rng, xp=xp,
        )
        if swap:
            out = _swap01(out)
        return out, weights

    __call__ = forward

    # -- weights to and from torch --

    _PARAMETERS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                   "v_proj_weight", "bias_k", "bias_v")

    def _named_parameters(self) -> dict[str, Array]:
        # torch's state_dict keys.
        named = {name: getattr(self, name) for name in self._PARAMETERS}
        named["out_proj.weight"] = self.out_proj.weight
        named["out_proj.bias"] = self.out_proj.bias
        return {name: p for name, p in named.items() if p is not None}

    @classmethod
    def from_torch(
        cls, module: Any, *, dtype: Any = None, like: Array | None = None,
        xp: Namespace | None = None,
    ) -> MultiheadAttention:
        """Copy a ``torch.nn.MultiheadAttention``: its configuration, weights and mode.

        Parameters
        ----------
        module : torch.nn.MultiheadAttention
            The module to copy; it is not modified.
        dtype : dtype or str, optional
            Dtype of the copies; default the module's own dtype.
        like : array, optional
            Put the copies in this array's library and on its device.
        xp : namespace or str, optional
            The copies' library or its name, e.g. ``xp="torch"``; default NumPy (host
            copies).

        Returns
        -------
        MultiheadAttention
            Independent copies of the weights (later changes to either side do not
            propagate), with the module's ``training`` flag.

        Raises
        ------
        TypeError
            ``module`` is not a ``torch.nn.MultiheadAttention``.

        Examples
        --------
        >>> import torch, refattn
        >>> tmod = torch.nn.MultiheadAttention(4, 2, kdim=3, dtype=torch.float64)
        >>> mha = refattn.MultiheadAttention.from_torch(tmod)
        >>> mha.k_proj_weight.shape, mha.in_proj_weight is None
        ((4, 3), True)
        """
        torch = sys.modules.get("torch")  # a torch module exists only once torch is imported
        if torch is None or not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(
                "module must be a torch.nn.MultiheadAttention; got "
                f"{type(module).__module__}.{type(module).__qualname__}"
            )
        host = {name: to_numpy(p) for name, p in module.state_dict().items()}
        if dtype is None:
            dtype = str(next(iter(module.state_dict().values())).dtype).removeprefix("torch.")
        new = cls(
            module.embed_dim, module.num_heads, module.dropout,
            bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
            batch_first=module.batch_first, seed=0, dtype=dtype, like=like, xp=xp,
        )
        for name in new._named_parameters():
            value = new._param(np.array(host[name], copy=True))
            if name.startswith("out_proj."):
                setattr(new.out_proj, name.removeprefix("out_proj."), value)
            else:
                setattr(new, name, value)
        new.training = bool(module.training)
        return new

    def to_torch(self, *, device: Any = None) -> Any:
        """A ``torch.nn.MultiheadAttention`` with this configuration, weights and mode.

        Parameters
        ----------
        device : torch.device or str, optional
            Where to put the module; default the parameters' device for torch
            parameters, else the CPU.

        Returns
        -------
        torch.nn.MultiheadAttention
            In the parameters' dtype, holding copies of the weights.

        Examples
        --------
        >>> import torch, refattn
        >>> mha = refattn.MultiheadAttention(4, 2, add_bias_kv=True, seed=3)
        >>> tmod = mha.to_torch()
        >>> tmod.bias_k.dtype, bool((tmod.bias_k.detach().numpy() == mha.bias_k).all())
        (torch.float64, True)
        """
        import torch

        params = self._named_parameters()
        first = next(iter(params.values()))
        if device is None:
            device = first.device if library_name(first) == "torch" else "cpu"
        dtype = getattr(torch, dtype_name(first.dtype, self._xp))
        module = torch.nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
            kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=device,
            dtype=dtype,
        )
        state = {}
        for name, p in params.items():
            if library_name(p) == "torch":
                state[name] = p.detach().clone()
            else:
                state[name] = torch.from_numpy(np.array(to_numpy(p), copy=True))
        module.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in state.items()})
        module.train(self.training)
        return module


def _swap01(x: Array) -> Array:
    # (N, L, E) <-> (L, N, E) for batch_first; 2-D arrays (unbatched) pass unchanged.
    if getattr(x, "ndim", None) != 3:
        return x
    return array_api_compat.array_namespace(x).permute_dims(x, (1, 0, 2))
