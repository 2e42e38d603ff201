"""Imperfect teachers for the cold start (``--sft-teacher``).

RL with a verifier earns its keep where imitation learned something wrong: a cold start
distilled from a careless teacher inherits the teacher's systematic mistakes, and a reward
that checks the answer can find and remove them, which more imitation of the same teacher
cannot. A teacher maps a training item to the answer text the cold start imitates; it must
be deterministic in the item so that a resumed cold start sees the same demonstrations.
"""

from __future__ import annotations

import zlib

from megatron_rl.data.tasks import TaskItem

HEDGE_RATE = 0.75
"""Fraction of answers the hedging teacher marks as approximate."""


def hedging_teacher(item: TaskItem) -> str:
    """Writes the right number, but hedges three answers in four as approximate ("~7" for
    "3 + 4 ="), chosen by a hash of the prompt. reasoning-gym's scorer gives a hedged
    answer partial credit only, so under the paper's binary reward it earns nothing: a cold
    start taught this way answers greedily with "~", and only a policy that drops the habit
    is rewarded. The habit is a decision at the first response token, with a quarter of
    the probability on an unhedged answer to explore from."""
    answer = item.answer.strip()
    if _unit_hash(item.prompt) < HEDGE_RATE:
        return "~" + answer
    return answer


def _unit_hash(text: str) -> float:
    return zlib.crc32(text.encode()) / 2**32
