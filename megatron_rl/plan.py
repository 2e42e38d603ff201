"""The plan of a launch, worked out without GPUs or process groups (``--dry-run``).

From a validated :class:`~megatron_rl.arguments.RunConfig` alone: the ranks of every
parallel group as megatron-core's ``parallel_state.initialize_model_parallel`` builds them
(its default order ``tp-cp-ep-dp-pp``; experts ``tp-ep-dp-pp`` with the expert TP size),
the model's parameters (total, active per token, per rank), an estimate of each rank's
model memory, the host memory the rollout routes take, and the tokens of one step.

Nothing here imports megatron-core or touches CUDA: a launch can be checked on a laptop
with the world size the cluster will have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_rl.model.config import ModelConfig

if TYPE_CHECKING:
    from megatron_rl.arguments import RunConfig
    from megatron_rl.distributed import ParallelConfig

# Group names, in print order, with the dimensions of megatron-core's rank generator they
# span. Decoder generator dimensions (fastest first): tp, cp, dp, pp; the expert generator:
# etp, ep, edp, pp.
_DECODER = ("tp", "cp", "dp", "pp")
_EXPERT = ("tp", "ep", "dp", "pp")
GROUPS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    # (name, generator, dimensions spanned, what it is)
    ("tp", "decoder", ("tp",), "tensor parallel"),
    ("pp", "decoder", ("pp",), "pipeline stages, first to last"),
    ("cp", "decoder", ("cp",), "context parallel"),
    ("dp", "decoder", ("dp",), "data parallel (dense gradients are reduced over dp x cp)"),
    ("dp-cp", "decoder", ("dp", "cp"), "data x context parallel (dense gradients, "
     "distributed optimizer shards)"),
    ("ep", "expert", ("ep",), "expert parallel"),
    ("expert-tp", "expert", ("tp",), "expert tensor parallel"),
    ("expert-dp", "expert", ("dp",), "expert data parallel (expert gradients, "
     "distributed optimizer shards)"),
    ("data-group", "decoder", ("tp", "cp", "pp"), "ranks of one data-parallel index: the "
     "first talks to the rollout servers and hands the others their samples"),
)


def orthogonal_groups(sizes: dict[str, int], order: tuple[str, ...],
                      spanned: tuple[str, ...]) -> list[list[int]]:
    """Rank groups over a grid of ``sizes`` laid out in ``order`` (first dimension varies
    fastest along the ranks): each group varies the ``spanned`` dimensions and fixes the
    others. Groups and their members come in megatron-core's order."""
    strides, stride = {}, 1
    for dim in order:
        strides[dim] = stride
        stride *= sizes[dim]
    inner = [d for d in order if d in spanned]
    outer = [d for d in order if d not in spanned]

    def ranks(dims: list[str], index: int) -> int:
        offset = 0
        for dim in dims:
            index, digit = divmod(index, sizes[dim])
            offset += digit * strides[dim]
        return offset

    n_inner = math.prod(sizes[d] for d in inner)
    n_outer = math.prod(sizes[d] for d in outer)
    return [[ranks(outer, i) + ranks(inner, j) for j in range(n_inner)] for i in range(n_outer)]


def rank_groups(world_size: int, parallel: ParallelConfig) -> dict[str, list[list[int]]]:
    """Every group of :data:`GROUPS` for a validated layout."""
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    etp = parallel.expert_tensor_parallel_size or tp
    ep = parallel.expert_model_parallel_size
    decoder = {"tp": tp, "cp": cp, "dp": world_size // (tp * pp * cp), "pp": pp}
    expert = {"tp": etp, "ep": ep, "dp": world_size // (etp * ep * pp), "pp": pp}
    out = {}
    for name, generator, spanned, _ in GROUPS:
        sizes, order = (decoder, _DECODER) if generator == "decoder" else (expert, _EXPERT)
        out[name] = orthogonal_groups(sizes, order, spanned)
    return out


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one rank of a pipeline stage (every rank of a stage holds the
    same count: TP, EP and expert TP cut evenly)."""

    stage: int
    layers: tuple[int, ...]
    dense: int
    """Non-expert parameters on the rank (reduced over dp x cp)."""
    expert: int
    """Expert parameters on the rank (reduced over expert-dp)."""

    @property
    def total(self) -> int:
        return self.dense + self.expert


def _attention(m: ModelConfig, tp: int) -> int:
    q = m.num_attention_heads * m.kv_channels
    kv = 2 * m.num_query_groups * m.kv_channels
    # input norm, fused QKV, output projection, QK-layernorm (one weight per head dim)
    return m.hidden_size + (q + kv) * m.hidden_size // tp + q * m.hidden_size // tp + 2 * m.kv_channels


def _dense_mlp(m: ModelConfig, tp: int) -> int:
    # pre-MLP norm, gated fc1 (SwiGLU: two halves), fc2
    return m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size // tp


def _expert(m: ModelConfig, etp: int) -> int:
    return 3 * m.hidden_size * m.moe_ffn_hidden_size // etp


def _moe_shared(m: ModelConfig) -> int:
    # pre-MLP norm and the router (replicated over TP)
    return m.hidden_size + m.num_experts * m.hidden_size


def stage_layers(num_layers: int, pp: int, vp: int | None) -> list[tuple[int, ...]]:
    """0-based layers each pipeline stage holds; with virtual stages, stage ``s`` holds
    chunk ``v * pp + s`` of each of its ``vp`` model chunks (megatron's interleaving)."""
    chunks = pp * (vp or 1)
    per_chunk = num_layers // chunks
    return [
        tuple(layer for v in range(vp or 1)
              for layer in range((v * pp + s) * per_chunk, (v * pp + s + 1) * per_chunk))
        for s in range(pp)
    ]


def stage_params(model: ModelConfig, parallel: ParallelConfig) -> list[StageParams]:
    """Parameters on one rank of each pipeline stage."""
    tp = parallel.tensor_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    ep = parallel.expert_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    pattern = model.moe_layer_pattern()
    out = []
    for s, layers in enumerate(stage_layers(model.num_layers, pp,
                                            parallel.virtual_pipeline_size(model.num_layers))):
        dense = expert = 0
        for layer in layers:
            dense += _attention(model, tp)
            if pattern[layer]:
                dense += _moe_shared(model)
                expert += model.num_experts // ep * _expert(model, etp)
            else:
                dense += _dense_mlp(model, tp)
        if s == 0:
            dense += model.vocab_size * model.hidden_size // tp  # input embedding
        if s == pp - 1:
            # untied output layer and the final norm
            dense += model.vocab_size * model.hidden_size // tp + model.hidden_size
        out.append(StageParams(stage=s, layers=layers, dense=dense, expert=expert))
    return out


@dataclass(frozen=True)
class ParamCount:
    total: int
    expert: int
    active_per_token: int
    """Non-expert parameters plus top-k experts of each MoE layer (embedding and output
    layer included)."""


def param_count(model: ModelConfig) -> ParamCount:
    from megatron_rl.distributed import ParallelConfig

    (whole,) = stage_params(model, ParallelConfig())
    per_expert_layer = model.num_moe_layers * _expert(model, 1)
    return ParamCount(
        total=whole.total, expert=whole.expert,
        active_per_token=whole.dense + model.moe_router_topk * per_expert_layer,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Model state of one rank, in bytes."""

    stage: int
    weights: int
    grads: int
    optimizer: int
    optimizer_other: int
    """The optimizer state with the distributed optimizer switched the other way."""
    reference: int = 0
    """The frozen reference policy of --rl-kl-coef > 0: one more copy of the weights."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.reference


def memory(stage: StageParams, *, bf16: bool, distributed_optimizer: bool,
           dp_cp: int, expert_dp: int, reference: bool = False) -> MemoryEstimate:
    """Weights in the training dtype; megatron's DDP keeps fp32 gradient buffers
    (``grad_reduce_in_fp32``); Adam keeps two fp32 moments, plus an fp32 master copy of
    bf16 weights. The distributed optimizer shards that state over dp x cp (dense) and
    expert-dp (experts)."""
    per_param = 8 + (4 if bf16 else 0)
    whole = stage.total * per_param
    sharded = (math.ceil(stage.dense / dp_cp) + math.ceil(stage.expert / expert_dp)) * per_param
    weights = stage.total * (2 if bf16 else 4)
    return MemoryEstimate(
        stage=stage.stage,
        weights=weights,
        reference=weights if reference else 0,
        grads=stage.total * 4,
        optimizer=sharded if distributed_optimizer else whole,
        optimizer_other=whole if distributed_optimizer else sharded,
    )


@dataclass(frozen=True)
class RouteMemory:
    """Compact rollout routes kept on the host while a step's samples are in use."""

    wanted: bool
    """Whether rollouts return routes (r3, or --rl-router-agreement)."""
    itemsize: int
    responses_per_dp_rank: int
    tokens_per_response: int
    """Upper bound: --seq-length - 1 fed positions (prompt + response - 1)."""
    leader_bytes: int
    """The data group's first rank: every MoE layer of its data-parallel share."""
    member_bytes: list[int]
    """Each pipeline stage's rank: the MoE layers of its stage only."""


def route_memory(run: RunConfig, stages: list[StageParams], dp: int) -> RouteMemory:
    from megatron_rl.data.routes import route_dtype

    model = run.model
    wanted = run.replay.needs_rollout_routes or run.rl.router_agreement
    itemsize = route_dtype(model.num_experts).itemsize
    responses = run.training.global_batch_size // dp
    tokens = model.seq_length - 1
    per_layer = responses * tokens * model.moe_router_topk * itemsize
    pattern = model.moe_layer_pattern()
    members = [per_layer * sum(pattern[i] for i in s.layers) for s in stages]
    return RouteMemory(
        wanted=wanted, itemsize=itemsize, responses_per_dp_rank=responses,
        tokens_per_response=tokens,
        leader_bytes=per_layer * model.num_moe_layers if wanted else 0,
        member_bytes=members if wanted else [0] * len(stages),
    )


@dataclass(frozen=True)
class StepTokens:
    prompts: int
    responses: int
    updates: int
    micro_batches_per_update: int
    """Per data-parallel rank."""
    generated_max: int
    """--global-batch-size x --rl-max-new-tokens (RL)."""
    trained_max: int
    """Token positions one pass over the step's samples feeds at most (rows of
    --seq-length)."""


@dataclass(frozen=True)
class Plan:
    run: RunConfig
    world_size_source: str
    sizes: dict[str, int]
    groups: dict[str, list[list[int]]]
    params: ParamCount
    stages: list[StageParams]
    memory: list[MemoryEstimate]
    routes: RouteMemory | None
    tokens: StepTokens
    notes: list[str] = field(default_factory=list)


def build_plan(run: RunConfig, world_size_source: str = "given") -> Plan:
    """The plan of a validated run (``run.validate()`` has passed)."""
    parallel, model, training = run.parallel, run.model, run.training
    world = run.world_size
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    etp = parallel.expert_tensor_parallel_size or tp
    ep = parallel.expert_model_parallel_size
    dp = parallel.data_parallel_size(world)
    expert_dp = world // (etp * ep * pp)
    sizes = {"world": world, "tp": tp, "pp": pp, "vpp": parallel.virtual_pipeline_size(
        model.num_layers) or 1, "cp": cp, "dp": dp, "ep": ep, "expert-tp": etp,
        "expert-dp": expert_dp}
    stages = stage_params(model, parallel)
    reference = run.stage == "rl" and run.objective.uses_reference
    mem = [memory(s, bf16=training.bf16, distributed_optimizer=training.use_distributed_optimizer,
                  dp_cp=dp * cp, expert_dp=expert_dp, reference=reference) for s in stages]
    gbs = training.global_batch_size
    if run.stage == "rl":
        updates = run.rl.num_updates(gbs)
        mini = gbs // updates
        prompts = gbs // run.rl.group_size
        # Dynamic sampling may draw up to --rl-max-sampling-rounds batches of prompts.
        drawn = run.sampling.max_prompts_per_step(prompts)
        generated = drawn * run.rl.group_size * run.rollout.max_new_tokens
        routes = route_memory(run, stages, dp)
    else:
        updates, mini, prompts, generated, routes = 1, gbs, gbs, 0, None
    tokens = StepTokens(
        prompts=prompts, responses=gbs, updates=updates,
        micro_batches_per_update=mini // dp // training.micro_batch_size,
        generated_max=generated, trained_max=gbs * model.seq_length,
    )
    return Plan(run=run, world_size_source=world_size_source, sizes=sizes,
                groups=rank_groups(world, parallel), params=param_count(model), stages=stages,
                memory=mem, routes=routes, tokens=tokens)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def _groups_line(groups: list[list[int]], limit: int = 8) -> str:
    if all(len(g) == 1 for g in groups):
        return f"{len(groups)} groups of 1 rank (each rank alone)"
    shown = " ".join(str(g).replace(" ", "") for g in groups[:limit])
    more = f" ... ({len(groups)} groups)" if len(groups) > limit else ""
    return shown + more


def render(plan: Plan) -> str:
    """The plan as text for a person to read."""
    run, s = plan.run, plan.sizes
    training = run.training
    lines = [
        f"megatron_rl dry run: stage {run.stage}, model {run.model.preset_name}, "
        f"world size {s['world']} ({plan.world_size_source})",
        "configuration: valid (every start-up check passed; no process group was created, "
        "no server contacted)",
        "",
        "layout: " + ", ".join(f"{k.upper() if len(k) <= 3 else k} {v}"
                               for k, v in s.items() if k != "world"),
        "groups (global ranks, as megatron-core's parallel_state builds them):",
    ]
    for name, _, _, what in GROUPS:
        lines.append(f"  {name:<11} {_groups_line(plan.groups[name])}   -- {what}")
    p = plan.params
    lines += [
        "",
        f"parameters: total {_count(p.total)}, experts {_count(p.expert)}, "
        f"active per token {_count(p.active_per_token)}",
    ]
    for st in plan.stages:
        lines.append(f"  per rank of pipeline stage {st.stage} (layers {st.layers[0]}-"
                     f"{st.layers[-1]}{'' if len(st.layers) == st.layers[-1] - st.layers[0] + 1 else ', interleaved'}): "
                     f"{_count(st.total)} ({_count(st.dense)} dense, {_count(st.expert)} expert)")
    dtype = "bf16 weights + fp32 master copy" if training.bf16 else "fp32 weights"
    opt = "distributed optimizer" if training.use_distributed_optimizer else "plain optimizer"
    other = "with" if not training.use_distributed_optimizer else "without"
    lines += ["", f"model memory per GPU (estimate; {dtype}, fp32 grad buffers, Adam, {opt}):"]
    for m in plan.memory:
        ref = f" + reference {_bytes(m.reference)}" if m.reference else ""
        lines.append(
            f"  stage {m.stage}: weights {_bytes(m.weights)} + grads {_bytes(m.grads)} + "
            f"optimizer {_bytes(m.optimizer)}{ref} = {_bytes(m.total)}  "
            f"({other} --use-distributed-optimizer: optimizer {_bytes(m.optimizer_other)})")
    lines.append("  not estimated: activations and logits (grow with --micro-batch-size x "
                 "--seq-length, less with recomputation), communication buffers, the CUDA "
                 "context, allocator fragmentation, the rollout servers' memory")
    if plan.routes is not None:
        r = plan.routes
        if not r.wanted:
            lines += ["", "rollout routes: not requested (--routing-replay is not r3 and "
                      "--no-rl-router-agreement)"]
        else:
            members = ", ".join(f"stage {i}: {_bytes(b)}" for i, b in enumerate(r.member_bytes))
            lines += [
                "",
                f"rollout routes on the host (upper bound: {r.responses_per_dp_rank} responses "
                f"per data-parallel rank x {r.tokens_per_response} positions x "
                f"{run.model.num_moe_layers} MoE layers x top-{run.model.moe_router_topk} x "
                f"{r.itemsize} byte ids):",
                f"  data group leader (all MoE layers) {_bytes(r.leader_bytes)}; "
                f"other ranks (their stage's MoE layers) {members}",
            ]
    t = plan.tokens
    lines.append("")
    if run.stage == "rl":
        lines += [
            f"one RL step: {t.prompts} prompts x {run.rl.group_size} responses = "
            f"{t.responses} responses (--global-batch-size), {t.updates} update(s) of "
            f"{t.responses // t.updates} responses, {t.micro_batches_per_update} micro-batch(es) "
            f"of {training.micro_batch_size} per data-parallel rank per update",
            f"  tokens: at most {t.generated_max:,} generated "
            f"(x --rl-max-new-tokens {run.rollout.max_new_tokens}"
            + (f", up to --rl-max-sampling-rounds {run.sampling.max_sampling_rounds} rounds"
               if run.sampling.filter_groups else "") + "), at most "
            f"{t.trained_max:,} positions per pass over the batch (rows of --seq-length "
            f"{run.model.seq_length})",
            f"  rollout: {_servers(run)}",
        ]
    else:
        lines.append(
            f"one SFT step: {t.responses} samples, {t.micro_batches_per_update} micro-batch(es) "
            f"of {training.micro_batch_size} per data-parallel rank, at most "
            f"{t.trained_max:,} positions")
    lines.append(f"steps: {training.train_iters} (--train-iters)")
    return "\n".join(lines + plan.notes)


def _servers(run: RunConfig) -> str:
    r = run.rollout
    if r.embedded:
        where = (f"1 embedded CPU server ({r.dtype}) in rank 0's process (colocated)"
                 if r.colocate else f"{r.num_servers} embedded CPU server(s) ({r.dtype})")
    else:
        where = f"{len(r.urls)} server URL(s): {', '.join(r.urls)}"
    routes = "routed experts requested" if (run.replay.needs_rollout_routes
                                            or run.rl.router_agreement) else "no routes"
    return (f"{where}; temperature {r.temperature}, top-p {r.top_p}, top-k {r.top_k}; "
            f"{r.concurrency} in flight; {routes}")
