"""Server side of SGLang's distributed weight update, for the embedded server.

Three endpoints with SGLang 0.5.23's request bodies (``InitWeightsUpdateGroupReqInput``,
``UpdateWeightsFromDistributedReqInput``) and answers (``{"success", "message"}``, 400
with ``success: false`` on a refusal):

- ``POST /init_weights_update_group`` ``{master_address, master_port, rank_offset,
  world_size, group_name, backend}``: join the trainer's group as rank ``rank_offset +
  tp_rank`` (this server has one rank, tp_rank 0). Blocks until every rank joined.
- ``POST /update_weights_from_distributed`` ``{names, dtypes, shapes, group_name,
  flush_cache, weight_version, ...}``: receive each tensor by broadcast from rank 0, in
  the order given, in the given dtype and shape, then load it.
- ``POST /destroy_weights_update_group`` ``{group_name}``.

Plus ``GET /weights_checksum`` (not SGLang's): a SHA-256 of every served parameter, to
check that two servers, or two ways of updating one, serve the same bits.

Names are the Hugging Face checkpoint's (what ``/update_weights_from_disk`` reads); the
per-expert tensors of a MoE layer land in their slices of transformers' fused expert
parameters. Atomicity: SGLang loads each request's tensors at once. Here the tensors of
requests with ``flush_cache: false`` are held until a request with ``flush_cache: true``
(SGLang's default, which the trainer sends with the last bucket), which loads them all
with its own between two batches under its ``weight_version``: a multi-request update is
served whole or not at all. A request that fails (unknown name, wrong shape) still takes
part in the broadcast -- the trainer is blocked in it -- then drops everything held and
answers 400; the served weights do not change. A request whose group is unknown, or whose
names, dtypes and shapes do not parse, is refused without joining the broadcast, so the
trainer's broadcast times out (SGLang has the same limitation). Destroying or rebuilding a
group drops whatever was held.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from megatron_rl.inference.engine import GenerationEngine
from megatron_rl.inference.hf_model import WeightUpdateError
from megatron_rl.weight_sync.group import BACKENDS, UpdateGroup

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "weight_update_group"
"""SGLang's default ``group_name``."""
SERVER_LAYOUT = {"tp_size": 1, "pp_size": 1, "dp_size": 1, "device": "cpu"}
"""What ``/get_server_info`` reports of this server's ranks: one, on the CPU."""


class InitGroupIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP
    backend: str = "nccl"


class UpdateFromDistributedIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class DestroyGroupIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    group_name: str = DEFAULT_GROUP


class UpdateRefused(ValueError):
    """An update this server refuses (answered with 400, success false)."""


def checkpoint_slots(engine: GenerationEngine) -> dict[str, tuple[str, tuple]]:
    """Checkpoint name -> (state-dict name, index into that tensor) for every tensor a
    Hugging Face checkpoint of the served model holds."""
    slots: dict[str, tuple[str, tuple]] = {}
    state = engine.model.state_dict()
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, half = name.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                slots[f"{prefix}.{e}.gate_proj.weight"] = (name, (e, slice(0, half)))
                slots[f"{prefix}.{e}.up_proj.weight"] = (name, (e, slice(half, None)))
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                slots[f"{prefix}.{e}.down_proj.weight"] = (name, (e,))
        else:
            slots[name] = (name, ())
    return slots


class DistributedUpdates:
    """The groups this server belongs to and the tensors held for the next load."""

    def __init__(self, engine: GenerationEngine):
        self.engine = engine
        self.groups: dict[str, UpdateGroup] = {}
        self.slots = checkpoint_slots(engine)
        self.held: dict[str, torch.Tensor] = {}
        self.version: str | None = None
        # One collective at a time: group set-up, receives and loads never interleave.
        self.lock = threading.Lock()

    def init_group(self, body: InitGroupIn, timeout_s: float = 600.0) -> str:
        if body.backend not in BACKENDS:
            raise UpdateRefused(f"backend {body.backend!r} is not one of {BACKENDS}")
        rank = body.rank_offset + 0  # SGLang: rank_offset + tp_rank; one rank here
        if not 0 < rank < body.world_size:
            raise UpdateRefused(
                f"rank_offset {body.rank_offset} gives rank {rank}, outside 1..world_size-1 "
                f"(world_size {body.world_size}; rank 0 is the trainer)"
            )
        with self.lock:
            self._drop(body.group_name)
            try:
                self.groups[body.group_name] = UpdateGroup(
                    backend=body.backend, master_address=body.master_address,
                    master_port=body.master_port, rank=rank, world_size=body.world_size,
                    group_name=body.group_name, timeout_s=timeout_s,
                )  # fmt: skip
            except (ValueError, RuntimeError) as exc:
                raise UpdateRefused(f"Failed to initialize custom process group: {exc}") from exc
        logger.info("joined weight-update group %s as rank %d of %d (%s)", body.group_name,
                    rank, body.world_size, body.backend)  # fmt: skip
        return "Succeeded to initialize custom process group."

    def destroy_group(self, group_name: str) -> str:
        with self.lock:
            if group_name not in self.groups:
                raise UpdateRefused("The group to be destroyed does not exist.")
            self._drop(group_name)
        return "Succeeded to destroy custom process group."

    def _drop(self, group_name: str) -> None:
        group = self.groups.pop(group_name, None)
        if group is not None:
            group.close()
        self.held, self.version = {}, None

    def update(self, body: UpdateFromDistributedIn) -> str:
        """Receive, check, hold or load; returns the served version."""
        with self.lock:
            group = self.groups.get(body.group_name)
            if group is None:
                raise UpdateRefused(
                    f"Group {body.group_name} not in {sorted(self.groups)}. Please call "
                    "`init_weights_update_group` first."
                )
            specs = _parse_specs(body)
            received = []
            for name, dtype, shape in specs:
                buffer = torch.empty(shape, dtype=dtype, device=group.device)
                received.append((name, buffer, group.broadcast(buffer)))
            try:
                for _, _, work in received:
                    work.wait()
            except RuntimeError as exc:  # a peer died or timed out: the group is unusable
                self._drop(body.group_name)
                raise UpdateRefused(
                    f"broadcast in group {body.group_name} failed ({exc}); the group is "
                    "destroyed, the served weights are unchanged"
                ) from exc
            try:
                self._hold([(n, b.cpu()) for n, b, _ in received])
            except UpdateRefused:
                self.held, self.version = {}, None
                raise
            if body.weight_version is not None:
                self.version = body.weight_version
            if not body.flush_cache:
                return self.engine.weight_version
            held, version = self.held, self.version
            self.held, self.version = {}, None
            if not held:
                return self.engine.weight_version
            try:
                return self.engine.update_weights_from_tensors(held, version)
            except WeightUpdateError as exc:  # e.g. non-finite weights refused by FP8
                raise UpdateRefused(f"{exc}. The served weights are unchanged.") from exc

    def _hold(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Write each tensor into a copy of its parameter (made on first touch)."""
        problems = []
        served = None  # the served state dict, read once per bucket and only if needed
        for name, tensor in tensors:
            slot = self.slots.get(name)
            if slot is None:
                problems.append(f"{name}: not a tensor of the served model's checkpoint")
                continue
            key, index = slot
            if key not in self.held:
                if served is None:
                    served = self.engine.model.state_dict()
                self.held[key] = served[key].detach().clone()
            target = self.held[key][index]
            if target.shape != tensor.shape:
                problems.append(
                    f"{name}: shape {list(tensor.shape)}, the served model has {list(target.shape)}"
                )
                continue
            target.copy_(tensor)  # casts to the served dtype, as a checkpoint load does
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise UpdateRefused(
                "Failed to update parameter online: "
                + "; ".join(problems[:5])
                + more
                + ". The served weights are unchanged."
            )

    def checksum(self) -> dict:
        """Meaningful between updates (a swap in progress would mix two versions)."""
        version, state = self.engine.weight_version, self.engine.model.state_dict()
        digest = hashlib.sha256()
        for name in sorted(state):
            tensor = state[name].detach().contiguous().cpu()
            digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        return {"weight_version": version, "sha256": digest.hexdigest()}


def _parse_specs(body: UpdateFromDistributedIn) -> list[tuple[str, torch.dtype, list[int]]]:
    if body.load_format is not None:
        raise UpdateRefused(f"load_format {body.load_format!r} is not supported (use none)")
    if not len(body.names) == len(body.dtypes) == len(body.shapes):
        raise UpdateRefused(
            f"names, dtypes and shapes differ in length ({len(body.names)}, "
            f"{len(body.dtypes)}, {len(body.shapes)})"
        )
    specs = []
    for name, dtype_name, shape in zip(body.names, body.dtypes, body.shapes, strict=True):
        dtype = getattr(torch, dtype_name.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UpdateRefused(f"{name}: dtype {dtype_name!r} is not a floating-point dtype")
        if any(d < 0 for d in shape):
            raise UpdateRefused(f"{name}: shape {shape} has a negative size")
        specs.append((name, dtype, shape))
    return specs


def _answer(call, *args) -> JSONResponse | dict:
    try:
        message = call(*args)
    except UpdateRefused as exc:
        logger.warning("weight update refused: %s", exc)
        return JSONResponse({"success": False, "message": str(exc)}, status_code=400)
    return {"success": True, "message": message}


def add_distributed_weight_update(app: FastAPI, engine: GenerationEngine) -> DistributedUpdates:
    """Register the endpoints on ``app`` (the app's API-key check covers them)."""
    updates = DistributedUpdates(engine)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(body: InitGroupIn):
        return await asyncio.to_thread(_answer, updates.init_group, body)

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(body: UpdateFromDistributedIn):
        def run() -> str:
            version = updates.update(body)
            return f"Succeeded to update parameter online (weight version {version})."

        return await asyncio.to_thread(_answer, run)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(body: DestroyGroupIn):
        return await asyncio.to_thread(_answer, updates.destroy_group, body.group_name)

    @app.get("/weights_checksum")
    async def weights_checksum():
        return await asyncio.to_thread(updates.checksum)

    return updates
