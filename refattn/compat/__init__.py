"""Drop-in front-ends that keep another library's exact signature and conventions.

Each is a thin translation into :func:`refattn.attention`; no semantics live here.

* :mod:`refattn.compat.torch`: ``scaled_dot_product_attention`` (and its backward),
  ``multi_head_attention_forward``, ``MultiheadAttention`` (also at the package root);
* :mod:`refattn.compat.flash_attn`: ``flash_attn_func``, ``flash_attn_varlen_func``,
  ``flash_attn_with_kvcache`` (flash-attn 2: layout (B, L, H, E), bottom-right causal and
  windows, softcap, ALiBi, LSE +inf or -inf on empty rows);
* :mod:`refattn.compat.jax`: ``dot_product_attention`` (``jax.nn``'s: layout
  (B, T, N, H), bias before masks, finite mask fill, fully masked rows = mean of V);
* :mod:`refattn.compat.flex`: ``flex_attention``, ``create_block_mask``, ``BlockMask``,
  ``AuxOutput`` (torch's FlexAttention: ``score_mod``, ``mask_mod``, LSE -inf on empty
  rows).

Import the submodule of the library you check against, e.g.
``from refattn.compat.flash_attn import flash_attn_func``; importing them loads no other
array library (JAX is imported only when JAX arrays are given). The conventions side by
side: docs/conventions.rst.
"""
