"""The blocked path: online softmax over key blocks, bounded memory, forward and backward.

The forward visits the keys of each block of query rows block by block, keeping running
sums relative to a per-row shift (the online softmax, as in FlashAttention; see
``_online``). The backward rebuilds the weights per block from the saved LSE
(FlashAttention-2's recomputation; see ``_backward``). Only (rows x keys) blocks of
scores exist at any time, so the extra memory is O(block_L x block_S) per worker instead
of O(L x S); this is also the algorithm the CUDA kernel runs, so it is tested here on the
CPU.

The causal structure arrives as ``(causal, alignment)``, not as an (L, S) mask, so that
blocks no query of a block may attend are never computed, and blocks entirely on the
visible side of the diagonal need no mask. The user's mask, bias and dropout keep-mask
arrive broadcastable to (..., H, L, S) and are sliced per block without materialising the
broadcast. Grouped-query heads are not repeated: the query heads that share one key head
and one value head are stacked into one block of rows.

Work items and the order of every sum depend on the shapes only, and each item is
computed by one thread start to end, so the results are the same bits whatever the
thread count. Everything here is array-API code; what is library-specific about CPU
speed (the worker count, the one-thread BLAS) is decided by the caller, which passes
``num_threads``.

The modules, in the order they build on each other:

* ``_plan``: block sizes, key spans and query blocks, the plan of one problem;
* ``_items``: slicing broadcastable arrays per item, ordered sums, the threads;
* ``_inputs``: the inputs as the workers read them, the rows of one item;
* ``_block_scores``: one block's scores, masks, mods, exp and dropout;
* ``_bounds``: the Cauchy-Schwarz bounds of the scores, the zero-shift decision;
* ``_online``: the forward's work item (the online softmax);
* ``_forward``: ``blocked_attention``;
* ``_backward``: ``blocked_attention_backward``.
"""

from ._backward import blocked_attention_backward
from ._forward import blocked_attention
from ._online import RESCALE_THRESHOLD
from ._plan import SCORE_BLOCK_ELEMENTS, Span, choose_blocks, key_spans, query_blocks

__all__ = [
    "RESCALE_THRESHOLD",
    "SCORE_BLOCK_ELEMENTS",
    "Span",
    "blocked_attention",
    "blocked_attention_backward",
    "choose_blocks",
    "key_spans",
    "query_blocks",
]
