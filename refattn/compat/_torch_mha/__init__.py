"""torch's multi-head attention: ``multi_head_attention_forward`` and ``MultiheadAttention``.

Reproduces torch 2.13's reference path (``torch.nn.functional.multi_head_attention_forward``,
which ``torch.nn.MultiheadAttention.forward`` calls outside its inference fast path). What
torch does, and so what this does, in order:

1. in-projection: packed ``in_proj_weight`` (q, k, v stacked along dim 0) or three separate
   weights when kdim/vdim differ from embed_dim; ``in_proj_bias`` split in three;
2. boolean masks are True = masked OUT (the inverse of SDPA) and become additive
   0/-inf; float masks are additive; ``attn_mask`` and ``key_padding_mask`` merge by adding;
3. ``bias_k``/``bias_v`` append one key/value (after the projection), ``add_zero_attn`` then
   one zero key/value; the masks are padded with 0 so the new positions take part;
4. ``need_weights=True`` runs a plain softmax (fully masked rows are NaN) and returns the
   weights after dropout; ``need_weights=False`` runs SDPA (fully masked rows are 0);
5. out-projection.

All of it is array-API arithmetic around one ``refattn.attention`` call, in float64; the
results are cast back to the query's dtype.

Modules: ``_functional`` (the functional form: projections, masks, extra keys),
``_weights`` (the attention step, with or without the weights), ``_checks`` (argument
checks) and ``_module`` (the ``MultiheadAttention`` class, ``from_torch``/``to_torch``).
"""

from ._functional import multi_head_attention_forward
from ._module import MultiheadAttention

__all__ = ["MultiheadAttention", "multi_head_attention_forward"]
