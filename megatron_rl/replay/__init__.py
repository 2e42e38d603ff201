"""Routing replay (R2, R3): fixing the experts megatron-core's routers use per token.

* ``config``: ``--routing-replay {none,r2,r3}`` and the start-up checks;
* ``routes``: route tensors (compact dtype, padding routes, validation);
* ``split``: cutting routes like tokens (pipeline stage layers, CP chunks, SP slices);
* ``binding``: finding each router's global layer in the model chunks;
* ``bound_router``: megatron-core's RouterReplay of one layer, fed per micro-batch;
* ``chunk_routes``: one micro-batch's routes prepared for one chunk's routers;
* ``metrics``: router agreement and replay fidelity counters;
* ``router_replay``: :class:`RoutingReplay`, what the RL loop drives per pass.

Nothing is imported here eagerly: ``data.packing`` imports ``replay.routes`` and the
replay driver imports ``data.packing``.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "RoutingReplay": "megatron_rl.replay.router_replay",
    "ReplayConfig": "megatron_rl.replay.config",
    "RouteError": "megatron_rl.replay.routes",
    "ReplayError": "megatron_rl.replay.bound_router",
    "ReplayBindingError": "megatron_rl.replay.binding",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_rl.replay' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
