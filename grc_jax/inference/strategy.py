"""How the decode loop runs on each attention implementation (`impl`).

The loop's body is the same for every implementation; what pays off on one only lives here and
is chosen by `impl` (None: the backend's default, `pallas_kernels.hybrid_paged_attention`):

- page-table widths: the XLA reference gathers every page-table entry of a row, used or not, so
  on the CPU a loop that attends over only the pages in use so far is several times faster; it
  costs one compiled loop body per width. The Pallas kernels skip unused pages themselves.
- per-layer weights: XLA:CPU copies a layer's weights out of the stacked arrays on every step
  of a scan over them, which at batch 1 doubles the bytes a decode step moves (100M model,
  layers and head alone: 34 ms per step scanned, 20 ms unstacked; benchmarks/layer_loop_bench.py);
  separate arrays are read in place. It costs a second copy of the layer weights, which device
  memory can seldom spare, and has not been measured on accelerators.
- an empty memory table where no row reads a memory, so the reference gathers no memory page.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax

from grc_jax import model
from pallas_kernels.hybrid_paged_attention.dispatch import default_impl

State = TypeVar("State")
WIDTH_STEPS, WIDTH_FLOOR = 4, 4


def is_reference(impl: str | None) -> bool:
    """Whether the loop attends with the plain-XLA reference (the CPU's default)."""
    return (impl or default_impl()) == "reference"


def table_widths(num_tok_pages: int, impl: str | None) -> tuple[int, ...]:
    """Token page-table widths the loops step through as rows grow: four on the reference, one
    (the whole table) on the Pallas kernels."""
    if not is_reference(impl):
        return (num_tok_pages,)
    return tuple(
        sorted(
            {
                min(num_tok_pages, max(WIDTH_FLOOR, -(-num_tok_pages * i // WIDTH_STEPS)))
                for i in range(1, WIDTH_STEPS + 1)
            }
        )
    )


def while_loop(
    cond: Callable[[State], jax.Array],
    body: Callable[..., State],
    need: Callable[[State], jax.Array],
    state: State,
    num_tok_pages: int,
    impl: str | None,
) -> State:
    """`while cond(state): state = body(state, width=w)`, w the token page-table width each step
    attends over: one while loop per width of `table_widths`, the loop of width w running while
    the next step needs (`need`) at most w token pages."""
    widths = table_widths(num_tok_pages, impl)
    for w in widths[:-1]:
        state = jax.lax.while_loop(lambda s, w=w: cond(s) & (need(s) <= w), functools.partial(body, width=w), state)
    return jax.lax.while_loop(cond, functools.partial(body, width=widths[-1]), state)


def layer_weights(params: model.Params, impl: str | None, per_layer: bool | None = None) -> model.Params:
    """The parameters as the loop should hold them: the layers as separate per-layer arrays
    (`model.unstack_layers`) when `per_layer`, by default with the reference on the CPU."""
    if per_layer is None:
        per_layer = is_reference(impl) and jax.default_backend() == "cpu"
    return model.unstack_layers(params) if per_layer else params


def memory_table_width(pages: int, impl: str | None) -> int:
    """Entries of the memory page table for rows that read at most `pages` memory pages: the
    next power of two (few shapes, few compilations), and none at all on the reference when no
    row reads a memory."""
    if pages == 0 and is_reference(impl):
        return 0
    return 1 << max(0, pages - 1).bit_length()
