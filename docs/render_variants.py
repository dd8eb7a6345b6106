"""Render the mask pictures of docs/variants.rst from the masks refattn itself builds.

Every picture is the boolean "may attend" array that ``refattn.attention`` receives:
the mods of ``refattn.mods`` evaluated on the index grids attention passes them, the
block-diagonal mask ``refattn.attention_varlen`` hands to attention, and the mask of
``refattn.attention_with_kvcache``. Nothing is drawn by hand, so a change of semantics
shows up in the pictures.

Run from the repository root (needs matplotlib, the ``plot`` extra)::

    python docs/render_variants.py

It writes small PNGs into docs/_static/variants/.
"""

from __future__ import annotations

from pathlib import Path

import array_api_compat.numpy as xnp
import numpy as np

from refattn import kvcache, mods, varlen
from refattn._window import Window, chunk_mask

OUT = Path(__file__).resolve().parent / "_static" / "variants"


def evaluate(mod, L: int, S: int) -> np.ndarray:
    """A mask_mod on the grids attention builds: b (1, 1, 1), h (1, 1, 1), (L, 1), (1, S)."""
    grid = mod(np.zeros((1, 1, 1), dtype=np.int64), np.zeros((1, 1, 1), dtype=np.int64),
               np.arange(L)[:, None], np.arange(S)[None, :])
    return np.broadcast_to(grid, (1, L, S))[0]


def varlen_mask(cu_q: list[int], cu_k: list[int], **options) -> np.ndarray:
    """The (total_q, total_k) mask attention_varlen passes to attention."""
    tq, tk = cu_q[-1], cu_k[-1]
    packed = varlen._pack(
        np.zeros((tq, 1, 1)), np.zeros((tk, 1, 1)), np.zeros((tk, 1, 1)),
        np.asarray(cu_q), np.asarray(cu_k), scale=None, softcap=None, alibi_slopes=None,
        dropout_p=0.0, dropout_mask=None, rng=None, masked_rows="zero", compute_dtype=None,
        xp=None, **options,
    )
    return np.asarray(packed.options["mask"])


def kvcache_mask(valid: list[int], Lq: int, capacity: int, causal: bool) -> np.ndarray:
    """The mask attention_with_kvcache passes to attention, sequences stacked: (B Lq, S)."""
    window = Window.merge(causal=causal, window=None)
    mask, _ = kvcache._visibility(np.asarray(valid), Lq, capacity, window, xp=xnp, device="cpu")
    return mask.reshape(len(valid) * Lq, capacity)


def draw(name: str, mask: np.ndarray, title: str, *, row_groups=(), col_groups=(),
         row_labels=None, ylabel: str = "query i") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, S = mask.shape
    fig, ax = plt.subplots(figsize=(0.28 * S + 0.9, 0.28 * L + 0.95), dpi=100)
    ax.imshow(mask, cmap="Blues", vmin=-0.25, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, S, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="both", length=0, labelsize=6)
    ax.set_xticks(range(S))
    ax.set_yticks(range(L), labels=row_labels)
    for r in row_groups:
        ax.axhline(r - 0.5, color="black", linewidth=1.2)
    for c in col_groups:
        ax.axvline(c - 0.5, color="black", linewidth=1.2)
    ax.set_xlabel("key j", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_title(title, fontsize=7)
    fig.tight_layout(pad=0.3)
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / f"{name}.png")
    plt.close(fig)


def main() -> None:
    draw("causal_top_left", evaluate(mods.causal(), 4, 7), "causal, top_left (L=4, S=7)")
    draw("causal_bottom_right", evaluate(mods.causal("bottom_right", L=4, S=7), 4, 7),
         "causal, bottom_right (L=4, S=7)")
    draw("sliding_window", evaluate(mods.sliding_window(2, 0), 8, 8), "window (2, 0)")
    draw("prefix_lm", evaluate(mods.prefix_lm(3), 8, 8), "prefix_lm(3)")
    # attention(attention_chunk=3, causal=True): the problem's chunk mask AND its window.
    chunked = (chunk_mask(8, 8, 3, shift=0, xp=xnp, device="cpu")
               & Window.merge(causal=True, window=None).mask(8, 8, shift=0, xp=xnp,
                                                             device="cpu"))
    draw("chunked_causal", np.asarray(chunked), "attention_chunk=3, causal",
         row_groups=(3, 6), col_groups=(3, 6))
    doc = np.asarray([0, 0, 0, 1, 1, 2, 2, 2])
    both = evaluate(mods.document_mask(doc), 8, 8) & evaluate(mods.causal(), 8, 8)
    draw("document_causal", both, "document_mask & causal")
    cu_q, cu_k = [0, 2, 3, 6], [0, 4, 6, 9]
    draw("varlen_causal", varlen_mask(cu_q, cu_k, causal=True, alignment="bottom_right",
                                      window=None),
         "varlen, causal bottom_right", row_groups=cu_q[1:-1], col_groups=cu_k[1:-1])
    draw("kvcache_decode", kvcache_mask([3, 8, 5], 2, 8, causal=True),
         "KV cache: valid 3, 8, 5; Lq=2", row_groups=(2, 4),
         row_labels=[f"{b}, {i}" for b in range(3) for i in range(2)],
         ylabel="sequence b, query i")


if __name__ == "__main__":
    main()
