"""Build the policy: megatron-core's ``GPTModel`` shaped like Qwen3-MoE.

RMSNorm, QK-layernorm, SwiGLU experts, RoPE, no biases, untied embeddings, softmax
top-k routing with renormalised gates (megatron's top-k-then-softmax equals Qwen3's
softmax-then-renormalise), optional dense layers. Transformer Engine's layer spec on
GPU; megatron-core's local modules on CPU, with :class:`~megatron_rl.model.norm.RMSNorm`
so tensor parallelism (which MoE couples to sequence parallelism) works there too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_mlp_module_spec_for_backend,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_rl.distributed import ParallelConfig
from megatron_rl.model.config import ModelConfig
from megatron_rl.model.grouped_experts import GroupedExpertsSpecProvider, supports_grouped_experts
from megatron_rl.model.norm import RMSNorm
from megatron_rl.model.rope_positions import use_position_ids
from megatron_rl.model.sdpa_attention import FusedCoreAttention, computes
from megatron_rl.replay.binding import forget_global_instances
from megatron_rl.replay.config import check_model_supports_replay


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    bf16: bool = False,
    routing_replay: bool = False,
    use_te: bool | None = None,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for this model and layout.

    ``routing_replay``: the routers will replay routes (R2/R3); settings under which the
    replay cannot be exact are refused (replay.config.check_model_supports_replay)."""
    model.check()
    use_te = transformer_engine_available() if use_te is None else use_te
    if routing_replay:
        check_model_supports_replay(model)
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = model.recompute_granularity
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_layer_freq=model.moe_layer_pattern(),
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_dtype=None if model.moe_router_dtype == "none" else model.moe_router_dtype,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_fusion=model.moe_router_fusion,
        # Always on: every TopKRouter then gets a RouterReplay, through which
        # replay.RoutingReplay records, replays or merely observes the routes.
        moe_enable_routing_replay=True,
        moe_grouped_gemm=use_te,
        moe_permute_fusion=False,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(model.num_layers),
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        calculate_per_token_loss=True,
        recompute_granularity=recompute,
        recompute_method=model.recompute_method if recompute == "full" else None,
        recompute_num_layers=model.recompute_num_layers if recompute == "full" else None,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=False,
        # gloo matches point-to-point messages between two ranks in posting order; the
        # batched exchange posts send-to-prev before send-to-next on every rank, which with
        # PP=2 (prev == next) crosses activations and gradients. The unbatched exchange
        # orders its operations by rank parity and pairs them correctly.
        batch_p2p_comm=torch.cuda.is_available(),
    )


def _local_layer_spec(num_experts: int | None, grouped_experts: bool = False,
                      fused_attention: bool = False) -> ModuleSpec:
    """megatron-core's local modules with a sequence-parallel-capable RMSNorm, the
    routed experts as :class:`~megatron_rl.model.grouped_experts.GroupedExperts` where
    ``grouped_experts`` (same parameters as SequentialMLP's), and the core attention as
    :class:`~megatron_rl.model.sdpa_attention.FusedCoreAttention` where ``fused_attention``
    (no parameters)."""
    backend = GroupedExpertsSpecProvider() if grouped_experts else LocalSpecProvider()
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if num_experts is None:
        # Same checkpoint keys as Transformer Engine's fused norm+linear modules, so a
        # checkpoint written on CPU loads into the TE spec on GPU and back.
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=FusedCoreAttention if fused_attention else DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm,
                    k_layernorm=RMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def layer_spec(config: TransformerConfig, use_te: bool, vp_stage: int | None = None):
    """The block spec of this pipeline stage (and virtual stage)."""
    if use_te:
        return get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage
        )
    fused = computes(config)
    moe = _local_layer_spec(config.num_moe_experts, supports_grouped_experts(config), fused)
    dense = _local_layer_spec(None, fused_attention=fused)
    specs = [moe if is_moe else dense for is_moe in config.moe_layer_freq]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=RMSNorm)


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    bf16: bool = False,
    routing_replay: bool = False,
    use_te: bool | None = None,
) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage of this rank (a list of one without VPP).

    parallel_state must be initialised (see :func:`megatron_rl.distributed.init_distributed`).
    """
    use_te = transformer_engine_available() if use_te is None else use_te
    config = transformer_config(
        model, parallel, bf16=bf16, routing_replay=routing_replay, use_te=use_te
    )
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, use_te, vp_stage=stage),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            vp_stage=stage,
        )
        if not use_te:
            # Local attention takes any mask, so prompts may be shared (data.packing);
            # their responses need rotary positions of their own.
            use_position_ids(chunk)
        if bf16:
            chunk = chunk.to(torch.bfloat16)
        chunks.append(chunk)
    # megatron lists every RouterReplay in a process-global list; ours are driven by
    # layer identity (replay.RoutingReplay), so they must not accumulate there.
    forget_global_instances(chunks)
    return chunks


def describe(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """Parameter counts of this rank's chunks (for logs)."""
    total = sum(p.numel() for c in chunks for p in c.parameters())
    experts = sum(
        p.numel() for c in chunks for n, p in c.named_parameters() if ".experts." in n
    )
    return {"params_on_rank": total, "expert_params_on_rank": experts}

