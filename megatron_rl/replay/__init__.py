"""Routing replay (R2, R3): fixing the experts megatron-core's routers use per token.

* ``config``: ``--routing-replay {none,r2,r3}``, the start-up checks, each pass's mode;
* route tensors themselves (compact dtype, padding routes, validation) are data: ``data.routes``;
* ``split``: cutting routes like tokens (pipeline stage layers, CP chunks, SP slices);
* ``binding``: finding each router's global layer in the model chunks;
* ``bound_router``: megatron-core's RouterReplay of one layer, fed per micro-batch;
* ``chunk_routes``: one micro-batch's routes prepared for one chunk's routers;
* ``metrics``: router agreement and replay fidelity counters;
* ``router_replay``: :class:`RoutingReplay`, what the RL loop drives per pass.

Import from the modules themselves; this package face re-exports nothing, so importing
``data.routes`` (as ``data.packing`` does) never pulls in the replay driver.
"""
