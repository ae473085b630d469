"""The documents a memory-QA reader sees: the right one among distractors.

The one builder of those lists, for the evaluation CLI's memory QA (`tasks.qa_contexts`) and the
held-out evaluation of training (`world.memory_qa_figures`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def with_distractors(
    positive: str,
    negatives: Sequence[str],
    pool: Sequence[str],
    num: int,
    rng: np.random.Generator,
    lookalike: bool = True,
) -> list[str]:
    """The positive and `num` distractors, shuffled so the positive has no fixed place.

    With `lookalike`, the distractors are the record's own `negatives` first (its look-alikes,
    hard negatives: in order, without repeats or the positive), topped up with documents drawn
    at random from `pool`; without, all are drawn from `pool`. Never a document twice; fewer than
    `num` when the pool runs out. The draws and the shuffle use `rng` only, so a seed fixes them.
    """
    distractors = [d for d in dict.fromkeys(negatives) if d != positive][:num] if lookalike else []
    taken = {positive, *distractors}
    # A small pool (a small held-out split) may have fewer other documents than `num`.
    wanted = min(num, len(distractors) + len(set(pool) - taken))
    while len(distractors) < wanted:  # rejection sampling: listing the rest of the pool per record is quadratic
        extra = pool[int(rng.integers(len(pool)))]
        if extra not in taken:
            taken.add(extra)
            distractors.append(extra)
    texts = distractors + [positive]
    rng.shuffle(texts)
    return texts
