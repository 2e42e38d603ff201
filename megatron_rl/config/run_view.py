"""What a component config sees of the whole run when it validates itself.

``RunConfig`` (``megatron_rl.arguments``) holds every component's config, so it sits
above them all; a component's ``validate(run)`` reads its neighbours through this
protocol instead of importing ``RunConfig``, which keeps the import graph one-way.
"""

from __future__ import annotations

from typing import Any, Protocol


class RunView(Protocol):
    """The run as one component's checks see it (``RunConfig`` satisfies it)."""

    stage: str
    world_size: int
    model: Any
    parallel: Any
    training: Any
    checkpoint: Any
    logging: Any
    evaluation: Any
    task: Any
    rl: Any
    sampling: Any
    objective: Any
    replay: Any
    rollout: Any
