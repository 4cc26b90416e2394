"""Per-GPU memory, FLOPs and communication of a DiT-MoE training layout, estimated in closed form.

Nothing is allocated: parameter counts come from a meta-device model. Memory model (bytes per parameter,
b = 2 for bf16, 4 for fp32), partitioned over the data-parallel group of each parameter:

- parameters b (partitioned at ZeRO-3), gradients b (partitioned at ZeRO-2/3);
- optimizer: AdamW moments 8, plus when the optimizer keeps its own fp32 master copy (bf16, or fp32 with
  ZeRO-1/2 where DeepSpeed clones the partition) master weights 4 and their fp32 gradients 4
  (partitioned at ZeRO-1/2/3);
- EMA: the trainer's fp32 copy of the parameters this rank holds; at each checkpoint
  ``gather_full_state_dict`` assembles the full fp32 EMA on every rank (a transient peak between steps);
- expert parallelism over ``ep`` ranks: each rank owns E/ep experts, partitioned over the
  expert-data-parallel group of world/ep ranks; dense parameters over all ranks.

Activations are the tensors autograd saves, counted per block in :func:`block_activation_bytes`.
"""

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from ..model import DiT, DiTConfig
from ..model.card import attention_macs, count_parameters, experts_per_token, linear_macs
from ..model.moe import GroupedExperts
from .activation_checkpointing import checkpointed_blocks
from .expert_parallel import check_ep_model

PERSISTENT = ("parameters", "gradients", "optimizer", "ema")  # what outlives a step, present at a checkpoint


@dataclass(frozen=True)
class Layout:
    """How a run is spread: world = nodes × gpus_per_node ranks, one micro-batch per rank per step."""

    nodes: int
    gpus_per_node: int
    zero_stage: int
    ep_size: int
    micro_batch: int
    act_ckpt: int = 0  # recompute every n-th block (0: off, 1: every block)
    precision: str = "bf16"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def expert_dp(self) -> int:
        """Size of the expert-data-parallel group: the ranks that hold the same experts."""
        return self.world // self.ep_size

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def check_layout(config: DiTConfig, layout: Layout):
    """Raise a ValueError naming the command-line option for a layout the trainer cannot run."""
    for name, value in (("--nodes", layout.nodes), ("--gpus-per-node", layout.gpus_per_node),
                        ("--ep-size", layout.ep_size), ("--micro-batch-size", layout.micro_batch)):
        if value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage {layout.zero_stage} must be 0, 1, 2 or 3")
    if layout.act_ckpt < 0:
        raise ValueError(f"--activation-checkpointing {layout.act_ckpt} must be >= 0 (0: off, n: every n-th block)")
    if layout.precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision {layout.precision!r} must be bf16 or fp32")
    if layout.ep_size == 1:
        return
    if not config.is_moe:
        raise ValueError(f"--ep-size {layout.ep_size} needs a mixture-of-experts preset; this one is dense")
    check_ep_model(layout.ep_size, config)
    if config.num_experts % layout.ep_size:
        raise ValueError(f"--ep-size {layout.ep_size} does not divide the number of experts ({config.num_experts})")
    if layout.world % layout.ep_size:
        raise ValueError(
            f"--ep-size {layout.ep_size} does not divide the world size {layout.world} "
            f"(--nodes {layout.nodes} x --gpus-per-node {layout.gpus_per_node})"
        )


def _split(module: torch.nn.Module) -> dict[str, int]:
    """{"expert": routed-expert parameters, "dense": all others} of a module."""
    total = sum(p.numel() for p in module.parameters())
    expert = sum(p.numel() for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    return {"expert": expert, "dense": total - expert}


@lru_cache(maxsize=64)
def parameter_split(config: DiTConfig) -> dict[str, int]:
    """Parameter counts from a meta-device model: routed-expert and dense parameters, buffers, the
    largest block's expert and dense parameters, and the largest expert and dense tensors."""
    with torch.device("meta"):
        model = DiT(config)
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    sizes = {kind: [p.numel() for p in model.parameters() if (id(p) in experts) == (kind == "expert")]
             for kind in ("expert", "dense")}
    split = {kind: sum(n) for kind, n in sizes.items()} | {"buffers": sum(b.numel() for b in model.buffers())}
    assert sum(split.values()) == count_parameters(config)["total"]
    largest = max((_split(block) for block in model.blocks), key=lambda c: c["dense"] + c["expert"])
    return split | {"block_expert": largest["expert"], "block_dense": largest["dense"],
                    "tensor_expert": max(sizes["expert"], default=0), "tensor_dense": max(sizes["dense"])}


def local_parameters(config: DiTConfig, layout: Layout, partitioned: bool) -> float:
    """Parameters one rank holds: its experts and the dense ones, ZeRO-partitioned or not."""
    split = parameter_split(config)
    expert = split["expert"] / layout.ep_size
    if partitioned:
        return split["dense"] / layout.world + expert / layout.expert_dp
    return split["dense"] + expert


def ffn_activation_bytes(config: DiTConfig, tokens: int, dtype_bytes: int, moe: bool) -> float:
    """Bytes a block's feed-forward itself saves (freed as backward passes through it).

    Per token, in D working-dtype elements: its output, kept by the gate multiply, 1; each routed
    assignment 3 + 3·F/D (gathered input, gate and up projections kept by the SwiGLU op, its output,
    expert output, weighted output; GELU experts 3 + 2·F/D: the up projection and its GELU); shared
    experts 4·S/D; a dense GELU MLP 2·M/D. Plus fp32 router probabilities per token, and int64 indices and
    an fp32 weight per assignment.
    """
    d = config.hidden_size
    if not moe:
        return tokens * (d + 2 * int(config.mlp_ratio * d)) * dtype_bytes
    routed = experts_per_token(config)
    per_token = d + routed * (3 * d + config.expert_matrices * config.expert_hidden) + 4 * config.shared_hidden
    return tokens * (per_token * dtype_bytes + config.num_experts * 4 + routed * (3 * 8 + 4))


def block_activation_bytes(config: DiTConfig, tokens: int, dtype_bytes: int, moe: bool) -> float:
    """Bytes one DiTBlock saves for backward on ``tokens`` = micro-batch × T tokens.

    Per token, in D working-dtype elements: attention 8 (norm input and output, modulated input,
    q, k, v, attention output, projection output), the FFN's input side 3 (norm input and output,
    modulated input), fp32 norm statistics and attention log-sum-exp, and :func:`ffn_activation_bytes`.
    Text models add cross-attention's (an estimate; the calibration in docs/planner.md is of class models).
    """
    d = config.hidden_size
    kept = tokens * (11 * d * dtype_bytes + (config.num_heads + 4) * 4)
    if config.is_text:  # cross-attention: input, q, attention and projection outputs per image token; k, v of
        # the caption per sample (the upper bound: tokens / T samples x text_len caption tokens)
        kept += tokens * 4 * d * dtype_bytes + (tokens // config.num_tokens) * config.text_len * 2 * d * dtype_bytes
    return kept + ffn_activation_bytes(config, tokens, dtype_bytes, moe)


def outside_blocks_bytes(config: DiTConfig, tokens: int, dtype_bytes: int) -> float:
    """Final layer (norm input and output, modulated input: 3·D per token) and the fp32 loss terms
    over the output (about 16 tensors of p²·C_out per token)."""
    return tokens * (3 * config.hidden_size * dtype_bytes + 16 * config.patch_size**2 * config.out_channels * 4)


def _block_bytes(config: DiTConfig, tokens: int, dtype_bytes: int, act_ckpt: int) -> tuple[list, list]:
    """Per block: (bytes held after the forward, bytes of its full activations)."""
    chosen = set(checkpointed_blocks(config.depth, act_ckpt))
    full = [block_activation_bytes(config, tokens, dtype_bytes, config.moe_in_block(i)) for i in range(config.depth)]
    held = [tokens * config.hidden_size * dtype_bytes if i in chosen else a for i, a in enumerate(full)]
    return held, full


def saved_activation_bytes(config: DiTConfig, micro_batch: int, dtype_bytes: int, act_ckpt: int) -> float:
    """Bytes autograd holds at the end of the forward; a checkpointed block keeps only its input."""
    tokens = micro_batch * config.num_tokens
    held, _ = _block_bytes(config, tokens, dtype_bytes, act_ckpt)
    return sum(held) + outside_blocks_bytes(config, tokens, dtype_bytes)


def activation_bytes(config: DiTConfig, micro_batch: int, dtype_bytes: int, act_ckpt: int) -> float:
    """Peak activation bytes in forward+backward: the saved ones at the end of the forward, or, while
    backward recomputes checkpointed block i, the blocks before it as saved plus block i in full."""
    tokens = micro_batch * config.num_tokens
    held, full = _block_bytes(config, tokens, dtype_bytes, act_ckpt)
    recomputing = [sum(held[:i]) + full[i] for i in checkpointed_blocks(config.depth, act_ckpt)]
    return max([saved_activation_bytes(config, micro_batch, dtype_bytes, act_ckpt), *recomputing])


def memory_per_gpu(config: DiTConfig, layout: Layout) -> dict[str, float]:
    """Bytes per GPU by kind during a training step (the checkpoint-time EMA export: :func:`ema_export_bytes`)."""
    b, stage = layout.dtype_bytes, layout.zero_stage
    split = parameter_split(config)
    separate_master = layout.precision == "bf16" or stage in (1, 2)
    optimizer_bytes = 8 + (8 if separate_master else 0)
    # ZeRO-3 all-gathers a block's dense parameters and this rank's experts of it; the next block is prefetched
    gathered = 2 * b * (split["block_dense"] + split["block_expert"] / layout.ep_size) if stage == 3 else 0.0
    return {
        "parameters": b * local_parameters(config, layout, stage == 3) + b * split["buffers"],
        "gradients": b * local_parameters(config, layout, stage >= 2),
        "optimizer": optimizer_bytes * local_parameters(config, layout, stage >= 1),
        "ema": 4 * local_parameters(config, layout, stage == 3),
        "zero3_gathered": gathered,
        "activations": activation_bytes(config, layout.micro_batch, b, layout.act_ckpt),
        "workspace": backward_workspace_bytes(config, layout),
    }


def fitting_zero_stage(config: DiTConfig, *, world: int, micro_batch: int, act_ckpt: int, precision: str,
                       ep_size: int = 1, device_bytes: int | None = None, headroom: float = 0.9) -> int:
    """The ZeRO stage a run needs: 0 on one rank (partitioning over one rank saves nothing and in fp32
    adds a master copy); on several, the lowest of 1, 2, 3 whose planned step memory fits ``headroom``
    of ``device_bytes`` (1 when the device size is unknown, e.g. on CPU; 3 when none fits)."""
    if world == 1:
        return 0
    if device_bytes is None:
        return 1
    for stage in (1, 2, 3):
        layout = Layout(1, world, stage, ep_size, micro_batch, act_ckpt, precision)
        if sum(memory_per_gpu(config, layout).values()) <= headroom * device_bytes:
            return stage
    return 3


def ema_export_bytes(config: DiTConfig) -> float:
    """Device memory of the checkpoint-time EMA export: it is gathered one parameter at a time and
    moved to rank 0's host memory, so the peak is the largest full fp32 parameter (an expert weight
    of all experts, (E, F, D), or a dense MLP weight)."""
    d = config.hidden_size
    largest = max(config.num_experts * config.expert_hidden * d, int(config.mlp_ratio * d) * d, 6 * d * d)
    return 4.0 * largest


def backward_workspace_bytes(config: DiTConfig, layout: Layout) -> float:
    """Gradients and temporaries that exist beside the activations during backward.

    The largest of: a dense weight's gradient, whole; an expert weight's gradient, whole (the grouped
    GEMM writes it in the fused layout), by when about half of its block's feed-forward activations are
    freed; the experts' SwiGLU backward, two (A, F) temporaries for A routed assignments (calibrated
    against measured fp32 peaks, tests/parallel/test_planner.py).
    """
    b, split = layout.dtype_bytes, parameter_split(config)
    if not config.is_moe:
        return b * split["tensor_dense"]
    tokens = layout.micro_batch * config.num_tokens
    ffn = ffn_activation_bytes(config, tokens, b, True)
    swiglu = 2 * b * tokens * experts_per_token(config, layout.micro_batch) * config.expert_hidden
    return max(b * split["tensor_dense"], b * split["tensor_expert"] / layout.ep_size - ffn / 2, swiglu)


def forward_flops_per_image(config: DiTConfig) -> float:
    """2 FLOPs per multiply-accumulate of the linear layers and attention products."""
    return 2 * (linear_macs(config) + attention_macs(config))


def flops_per_gpu(config: DiTConfig, layout: Layout) -> float:
    """Forward + backward (2× forward) + recomputation of the checkpointed blocks, one micro-batch."""
    forward = forward_flops_per_image(config) * layout.micro_batch
    recomputed = len(checkpointed_blocks(config.depth, layout.act_ckpt)) / config.depth
    return forward * (3 + recomputed)


def communication_per_gpu(config: DiTConfig, layout: Layout) -> dict[str, float]:
    """Bytes each GPU sends per step (ring collectives: a fraction (n-1)/n of the buffer per pass)."""
    b, stage, world = layout.dtype_bytes, layout.zero_stage, layout.world
    split = parameter_split(config)
    chosen = checkpointed_blocks(config.depth, layout.act_ckpt)

    def ring(n: int) -> float:
        return (n - 1) / n

    moe_blocks = [i for i in range(config.depth) if config.moe_in_block(i)]
    tokens = layout.micro_batch * config.num_tokens
    routed = tokens * experts_per_token(config, layout.micro_batch)  # rows sent per dispatch (C per expert and pool)
    per_pass = routed * config.hidden_size * b * ring(layout.ep_size) * 2
    all_to_all = sum(per_pass * (3 if i in chosen else 2) for i in moe_blocks) if layout.ep_size > 1 else 0.0
    dense_bytes = b * split["dense"] * ring(world)
    expert_bytes = b * split["expert"] / layout.ep_size * ring(layout.expert_dp)
    gathers = 2 + len(chosen) / config.depth if stage == 3 else 0.0
    return {
        "ep_all_to_all": all_to_all,
        "zero3_param_all_gather": gathers * (dense_bytes + expert_bytes),
        "grad_reduce_scatter": dense_bytes + expert_bytes,
        # ZeRO-0: all-reduce; ZeRO-1/2: all-gather of the updated parameter partitions
        "param_all_gather_after_step": 0.0 if stage == 3 else dense_bytes + expert_bytes,
    }


def peak_memory(result: dict) -> float:
    """Bytes per GPU a :func:`plan` result needs: the larger of the training step and the checkpoint."""
    return max(result["memory_step_total"], result["memory_checkpoint_total"])


def smallest_fitting_nodes(config: DiTConfig, layout: Layout, device_bytes: float, max_nodes: int) -> int | None:
    """The fewest nodes, at most ``max_nodes``, on which ``layout`` (its node count replaced) needs at most
    ``device_bytes`` per GPU (:func:`peak_memory`); None if none does. Node counts whose world size the EP size
    does not divide are skipped; any other layout error is raised."""
    for nodes in range(1, max_nodes + 1):
        candidate = replace(layout, nodes=nodes)
        if candidate.world % candidate.ep_size == 0 and peak_memory(plan(config, candidate)) <= device_bytes:
            return nodes
    return None


def plan(config: DiTConfig, layout: Layout) -> dict:
    """Everything the planner reports, in bytes and FLOPs (see :func:`memory_per_gpu`)."""
    check_layout(config, layout)
    split = parameter_split(config)
    memory = memory_per_gpu(config, layout)
    return {
        "tokens_per_image": config.num_tokens,
        "params": split,
        "params_activated": count_parameters(config)["activated"],
        "memory": memory,
        "memory_step_total": sum(memory.values()),
        "ema_export": ema_export_bytes(config),
        "memory_checkpoint_total": sum(memory[k] for k in PERSISTENT) + ema_export_bytes(config),
        "flops_per_gpu": flops_per_gpu(config, layout),
        "communication": communication_per_gpu(config, layout),
    }
