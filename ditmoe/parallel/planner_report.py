"""The planner's answer for one preset and layout, as text lines or one JSON object (tools/plan.py)."""

from dataclasses import dataclass
from functools import cached_property

from ..model import DiTConfig
from .planner import Layout, peak_memory, plan

GIB = 2**30
MEMORY_LINES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer": "optimizer (fp32 master, its grads, moments)",
    "ema": "EMA (fp32, this rank's part)",
    "zero3_gathered": "ZeRO-3 gathered parameters (2 blocks)",
    "activations": "activations",
    "workspace": "backward workspace",
}
COMM_LINES = {
    "ep_all_to_all": "EP all-to-all (dispatch + combine)",
    "zero3_param_all_gather": "ZeRO-3 parameter all-gathers",
    "grad_reduce_scatter": "gradient reduce-scatter",
    "param_all_gather_after_step": "parameter all-gather after the step",
}


@dataclass(frozen=True)
class PlanReport:
    """``preset`` (its ``config`` at ``resolution`` pixels) trained with ``layout`` on GPUs of ``gpu_memory`` GiB."""

    preset: str
    resolution: int
    config: DiTConfig
    layout: Layout
    gpu_memory: float = 80.0

    @cached_property
    def result(self) -> dict:
        """:func:`plan`'s estimates; a ValueError names the option of a layout the trainer cannot run."""
        return plan(self.config, self.layout)

    @property
    def fits(self) -> bool:
        """Both the training step and the checkpoint fit in ``gpu_memory``."""
        return peak_memory(self.result) <= self.gpu_memory * GIB

    def to_json(self) -> dict:
        return {"preset": self.preset, "image_size": self.resolution, "layout": vars(self.layout), **self.result,
                "fits": self.fits}

    def lines(self) -> list[str]:
        """The report as text: model, layout, memory, compute and communication per GPU."""
        result, layout = self.result, self.layout
        step, ckpt_total = result["memory_step_total"] / GIB, result["memory_checkpoint_total"] / GIB
        memory, comm, flops = result["memory"], result["communication"], result["flops_per_gpu"]
        return [
            *self._model_and_layout_lines(),
            "memory per GPU (GiB)",
            *(f"  {label:<45} {memory[key] / GIB:8.2f}" for key, label in MEMORY_LINES.items()),
            f"  {'training step total':<45} {step:8.2f}",
            f"  {'EMA export at each checkpoint (device peak)':<45} {result['ema_export'] / GIB:8.2f}   "
            "note: gathered one parameter at a time to rank 0's host memory",
            f"  {'checkpoint total (persistent state + export)':<45} {ckpt_total:8.2f}   "
            "parameters, gradients, optimizer, EMA, export",
            f"  fits in {self.gpu_memory:g} GB: {'yes' if self.fits else 'no'} "
            "(CUDA context, NCCL buffers and fragmentation not included)",
            f"compute per step: {flops / 1e12:.1f} TFLOPs per GPU, {flops * layout.world / 1e15:.2f} PFLOPs in all "
            f"(forward + backward{' + recomputation' if layout.act_ckpt else ''})",
            "communication per GPU per step (GB sent)",
            *(f"  {label:<45} {comm[key] / 1e9:8.2f}" for key, label in COMM_LINES.items()),
            f"  {'total':<45} {sum(comm.values()) / 1e9:8.2f}",
            "all numbers are estimates (docs/planner.md)",
        ]

    def _model_and_layout_lines(self) -> list[str]:
        config, layout, params = self.config, self.layout, self.result["params"]
        ckpt = {0: "off", 1: "every block"}.get(layout.act_ckpt, f"every {layout.act_ckpt}-th block")
        experts = (f"EP {layout.ep_size}: {config.num_experts // layout.ep_size} of {config.num_experts} experts "
                   f"per rank, expert-data-parallel {layout.expert_dp}" if layout.ep_size > 1 else "no EP")
        total_params, size = params["expert"] + params["dense"], config.input_size
        return [
            f"{self.preset} at {self.resolution}x{self.resolution} ({config.in_channels}x{size}x{size} latents, "
            f"{config.num_tokens} tokens): {total_params / 1e9:.2f}B parameters ({params['expert'] / 1e9:.2f}B in "
            f"routed experts), {self.result['params_activated'] / 1e9:.2f}B activated",
            f"layout: {layout.nodes} nodes x {layout.gpus_per_node} GPUs = {layout.world} ranks, "
            f"ZeRO-{layout.zero_stage}, {experts}, {layout.precision}, micro-batch {layout.micro_batch} "
            f"(global {layout.micro_batch * layout.world}), activation checkpointing {ckpt}",
        ]
