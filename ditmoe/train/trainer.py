"""The trainer: DeepSpeed engine, EMA, metrics and checkpoints with exact resume.

``Trainer.train`` runs ``train_step`` (one optimizer step: every micro-batch of this rank's part of
the global batch, then the EMA update) until ``config.steps``, logging and checkpointing between
steps; ``forward_backward_step`` is one micro-batch.

A steady-state step never waits for the device: losses, expert loads and the count of non-finite losses
accumulate on it and are read on logging and checkpoint steps only; the gradient norm is read only when
logged; the micro-batch noise comes from a per-micro-batch ``torch.Generator``; preemption is agreed
without blocking (``PreemptionGuard``).
"""

import math
import time
import warnings
from pathlib import Path

import torch

from ..diffusion import objective_for
from ..model import DiT, DiTConfig
from ..model.conditioning import Caption, Condition, condition_to, index_condition
from ..model.grouped_gemm import expert_gemm_waits, set_expert_gemm
from ..parallel import engine as ds_engine
from ..parallel.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from ..parallel.compile import apply_compile, compile_loss
from ..parallel.distributed import init_distributed, on_rank0
from ..parallel.expert_parallel import (
    adapt_autoep_layers,
    autoep_config,
    check_ep_model,
    moe_param_groups,
    prepare_for_autoep,
    validate_ep,
)
from ..parallel.planner import fitting_zero_stage
from .checkpointer import Checkpointer
from .config import TrainConfig, write_run_config
from .data import build_loader, validation_set
from .divergence import DivergenceGuard, check_finite_weights
from .ema import EMA
from .evaluator import TrainingEvaluator, sample_conditions
from .init_from import load_init_weights
from .metrics import MetricsWriter, expert_load_stats
from .preemption import PreemptionGuard
from .resume import Resume
from .run_dir import RunFolder
from .step_metrics import StepMetrics


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the noise, timesteps and label dropout of one micro-batch: independent of world size."""
    return (seed * 1_000_003 + step) * 4099 + micro_index


def model_fn(engine, dtype: torch.dtype, drop_labels: torch.Tensor | None = None):
    """model(x, t, y) on the engine with inputs cast to its dtype, the given label dropout and fp32 outputs."""

    def call(x, t, y):
        if isinstance(y, Caption):  # caption embeddings in the model's dtype too
            y = Caption(y.tokens.to(dtype), y.mask)
        return engine(x.to(dtype), t, y, drop_labels).float()

    return call


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``lr_warmup_steps``, then constant or
    a cosine from ``lr`` down to ``lr_final_fraction · lr`` at the last step."""
    if step < config.lr_warmup_steps:
        return config.lr * (step + 1) / config.lr_warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.lr_warmup_steps) / max(1, config.steps - 1 - config.lr_warmup_steps)
    final = config.lr_final_fraction
    return config.lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer, config: TrainConfig, step: int):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(config, step)


def parameter_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """2-norm of all gradients held by ``module``'s parameters (a 0-d tensor on their device).

    Needed at ZeRO-0 only: ``engine.get_global_grad_norm()`` returns the ``_global_grad_norm`` of
    DeepSpeed's optimizer wrappers (ZeRO-1/2/3, bf16, fp16), but at ZeRO-0 in fp32 our torch AdamW
    runs unwrapped and the engine's fp32 clipping drops the norm it computes, so it stays None.
    """
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, dtype=torch.float32)))


def build_deepspeed_config(config: TrainConfig, model_config: DiTConfig, world: int) -> dict:
    """The run's DeepSpeed config (batch sizes, ZeRO, precision, AutoEP section); bad EP layouts raise."""
    micro = config.micro_batch_size or config.global_batch_size // world
    ds_config = ds_engine.deepspeed_config(
        base=ds_engine.load_config_file(config.deepspeed_config),
        global_batch_size=config.global_batch_size, micro_batch_size=micro, world_size=world,
        zero_stage=config.zero_stage, precision=config.precision, grad_clip=config.grad_clip,
    )
    if ds_config["zero_optimization"]["stage"] == -1:  # the stage that fits
        device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
            if torch.cuda.is_available() else None
        ds_config["zero_optimization"]["stage"] = fitting_zero_stage(
            model_config, world=world, micro_batch=micro, act_ckpt=config.activation_checkpointing,
            precision="bf16" if ds_engine.uses_bf16(ds_config) else "fp32", ep_size=config.ep_size,
            device_bytes=device_bytes)
    zero = ds_config["zero_optimization"]
    check_ep_model(config.ep_size, model_config)
    validate_ep(config.ep_size, model_config.num_experts, world, zero["stage"], zero)
    if ds_config.get("expert_parallel", {}).get("enabled") and config.ep_size == 1:
        raise ValueError(f"--deepspeed-config {config.deepspeed_config} enables expert_parallel: pass --ep-size N > 1")
    ds_config["expert_parallel"] = {**ds_config.get("expert_parallel", {}),
                                    **autoep_config(config.ep_size, model_config)}
    return ds_config


class Trainer:
    def __init__(self, config: TrainConfig):
        """Set up distributed, output directory, DeepSpeed config, data, engine, EMA, resume, metrics, checkpoints."""
        self.config = config
        self.rank, self.world, self.device = init_distributed()
        self.is_rank0 = self.rank == 0  # writes config, metrics, EMA and meta files, prints
        set_expert_gemm(config.expert_gemm)
        self.out = Path(config.out)
        self.model_config = config.model_config()
        self.run_folder = RunFolder(self.out)
        on_rank0(self._claim_run_folder)  # one training per folder, never silently over an earlier run
        self.ds_config = build_deepspeed_config(config, self.model_config, self.world)
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.loader = build_loader(config, self.model_config, self.rank, self.world)
        resume = Resume.detect(config, self.run_folder, self.ds_config, self.rank, self.loader_text_encoder())
        self._build_engine()
        self.step = 0 if resume is None else resume.restore(self.engine, self.ema, self.loader, self.rank)
        on_rank0(lambda: write_run_config(config, self.out))  # only once every check of the run has passed
        self.moe_layers = self.engine.module.moe_layers()
        self.moe_blocks = [i for i in range(self.model_config.depth) if self.model_config.moe_in_block(i)]
        if self.is_rank0:
            self._warn_if_experts_wait_for_the_gpu()
        self.writer = MetricsWriter(self.out, config.tensorboard, resume_step=self.step) if self.is_rank0 else None
        self.checkpointer = Checkpointer(config, self.run_folder.ckpt_root, rank=self.rank, world_size=self.world,
                                         zero_stage=self.zero_stage, guard=PreemptionGuard(),
                                         verify=self.check_saveable, text_encoder=self.loader_text_encoder(),
                                         vae={"name": self.loader.manifest["vae"],
                                              "scaling_factor": self.loader.manifest["scaling_factor"]})
        validation = validation_set(config, self.model_config)
        self.evaluator = TrainingEvaluator(
            config, self.engine, self.ema, self.objective, self.dtype,
            validation_set=None if validation is None else validation[:2],
            sample_conditions=sample_conditions(config, validation, self.model_config.num_classes,
                                                self.loader.has_captions),
            rank=self.rank, world=self.world, device=self.device, writer=self.writer, manifest=self.loader.manifest)
        self.window_start, self.window_samples = time.perf_counter(), 0  # throughput since the last log
        self.divergence = DivergenceGuard(config.max_nonfinite_steps, self.device, self.step)

    def _warn_if_experts_wait_for_the_gpu(self):
        """Say so when the experts' grouped GEMMs (with or without EP) run PyTorch's fallback on this GPU and dtype,
        which reads the group offsets back to the host on every call (expert_gemm=torch, or auto without Triton)."""
        if not self.moe_blocks or not expert_gemm_waits(self.dtype, self.device):
            return
        capability = torch.cuda.get_device_capability(self.device)
        warnings.warn(f"the experts' grouped GEMMs in {self.dtype} on this GPU (compute capability "
                      f"{capability[0]}.{capability[1]}) run PyTorch's fallback, which copies the group offsets "
                      "to the host: 6 device synchronisations per MoE layer and micro-batch (8 with activation "
                      f"checkpointing). expert_gemm={self.config.expert_gemm!r}: use 'auto' or 'triton' (with "
                      "Triton installed) for steps that never wait for the device.", stacklevel=2)

    def loader_text_encoder(self) -> dict | None:
        """The text encoder the training captions were embedded with (None for class labels): sampling uses it."""
        if not self.loader.has_captions:
            return None
        return {"name": self.loader.text_encoder, "max_length": self.loader.text_len}

    def _claim_run_folder(self):
        """Rank 0: lock the run folder, refuse (or with --overwrite clear) an earlier run."""
        self.run_folder.lock()
        self.run_folder.prepare(resume=self.config.resume, overwrite=self.config.overwrite)

    def _build_engine(self):
        """Model (same initial weights on every rank), objective, optimizer, DeepSpeed engine, EMA."""
        config = self.config
        torch.manual_seed(config.seed)
        model = DiT(self.model_config).to(self.device)
        if config.init_from:  # e.g. an upcycled dense checkpoint: weights only, before any wrapping
            model.load_state_dict(load_init_weights(config.init_from, self.model_config))
        if config.compile:  # inside the checkpointing wrapper, so recomputation runs the compiled code too
            apply_compile(model, zero3=self.zero_stage == 3,
                          checkpointed=checkpointed_blocks(len(model.blocks), config.activation_checkpointing))
        apply_activation_checkpointing(model, config.activation_checkpointing)
        prepare_for_autoep(model, config.ep_size)  # GELU experts as AutoEP reads them, before the optimizer
        self.objective = objective_for(config.objective, self.model_config)
        if config.compile:
            compile_loss(self.objective)
        optimizer = ds_engine.build_optimizer(
            moe_param_groups(model, config.ep_size, self.zero_stage), config.lr, config.weight_decay,
            (config.adam_beta1, config.adam_beta2), cpu_offload=ds_engine.offloads_optimizer(self.ds_config),
        )
        self.engine, self.optimizer = ds_engine.initialize(model, optimizer, self.ds_config)
        adapt_autoep_layers(self.engine.module, self.model_config)  # EP > 1: ditmoe's experts GEMM and routing
        self.ema = EMA(self.engine.module, config.ema_decay)
        self.dtype = torch.bfloat16 if ds_engine.uses_bf16(self.ds_config) else torch.float32

    def train(self) -> dict:
        """Train to ``config.steps`` (or a preemption); returns the last logged record (rank 0's view)."""
        record = {}
        batches = iter(self.loader)
        try:
            while self.step < self.config.steps:
                x_local, y_local = next(batches)  # entries rank, rank + W, ... of the global batch
                metrics = self.train_step(x_local, y_local)
                if self.is_log_step(self.step):
                    record = self.log_step(metrics)
                record = {**record, **self.evaluate()}
                if self.checkpointer.after_step(self.step, self.engine, self.ema, self.loader):
                    break
        finally:
            self.checkpointer.guard.close()
            if self.is_rank0:
                self.writer.close()
            self.run_folder.unlock()
        return {**record, "preempted": self.step < self.config.steps}

    def evaluate(self) -> dict:
        """Collective: the evaluations due after this step (``TrainingEvaluator``), kept out of the throughput."""
        start = time.perf_counter()
        record = self.evaluator.after_step(self.step)
        self.window_start += time.perf_counter() - start
        return record

    def is_log_step(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.config.steps

    def train_step(self, x_local: torch.Tensor, y_local: Condition) -> StepMetrics:
        """One optimizer step on this rank's part of the global batch; returns its metrics (on the device)."""
        metrics = StepMetrics(len(self.moe_layers), self.model_config.num_experts, self.device)
        set_lr(self.optimizer, self.config, self.step)
        x_local = x_local.to(self.device, non_blocking=True)  # pinned by the loader on GPU
        y_local = condition_to(y_local, self.device, non_blocking=True)  # labels, or a caption
        for a in range(self.accumulation):
            # micro-batch j = rank + a·W of the global batch g is g[j::G/m], i.e. x_local[a::accumulation]:
            # the same samples whatever the world size
            x, y = x_local[a::self.accumulation], index_condition(y_local, slice(a, None, self.accumulation))
            self.forward_backward_step(x, y, self.rank + a * self.world, metrics)
            last = a == self.accumulation - 1
            if last and self.zero_stage == 0 and self.is_log_step(self.step + 1):
                metrics.grad_norm = parameter_grad_norm(self.engine.module)  # before engine.step() clears them
            self.engine.step()  # DeepSpeed steps the optimizer after the last micro-batch only
        self.divergence.record(metrics.nonfinite_losses, self.engine.get_global_grad_norm(), self.engine.skipped_steps)
        self.ema.update(self.step)
        self.step += 1
        self.window_samples += self.config.global_batch_size
        return metrics

    def forward_backward_step(self, x: torch.Tensor, y: Condition, micro_index: int, metrics: StepMetrics):
        """Loss and gradients of micro-batch ``micro_index`` of the global batch, added to ``metrics``.

        Its timesteps, noise and label dropout come from its own generator: the same on any world size.
        """
        generator = torch.Generator(self.device).manual_seed(micro_batch_seed(self.config.seed, self.step, micro_index))
        drop = torch.rand(len(x), device=self.device, generator=generator) < self.model_config.class_dropout_prob
        forward = model_fn(self.engine, self.dtype, drop)
        losses = self.objective.training_losses(forward, x, y, generator=generator)
        balance = self.engine.module.balance_loss().float()
        loss = losses["loss"].mean() + balance
        self.engine.backward(loss)
        metrics.add(loss=loss, mse=losses["mse"].mean(), vb=losses["vb"].mean(), balance_loss=balance,
                    expert_counts=[layer.expert_counts for layer in self.moe_layers])

    def check_saveable(self):
        """Collective, before every checkpoint: raise ``TrainingDiverged`` after too many bad steps in a row, or
        when a weight or EMA tensor is not finite (a checkpoint of such a state would replace a good one)."""
        self.divergence.check(self.step)
        check_finite_weights(self.ema.local_weights() + list(self.ema.state_dict().values()), self.step)

    def log_step(self, metrics: StepMetrics) -> dict:
        """Collective, reads the device: this step's record (losses averaged over ranks, expert loads summed),
        written by rank 0; stops with ``TrainingDiverged`` after ``max_nonfinite_steps`` bad steps in a row."""
        bad_steps = self.divergence.check(self.step)
        losses, loads = metrics.reduce()
        norm = metrics.grad_norm if metrics.grad_norm is not None else self.engine.get_global_grad_norm()
        grad_norm = float(norm)
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": self.step, **losses, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": self.window_samples / elapsed, "nonfinite_steps": bad_steps,
            **expert_load_stats(loads.tolist(), self.moe_blocks),
        }
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.is_rank0:
            self.writer.log(record)
            print(f"step {self.step}/{self.config.steps} loss {record['loss']:.4f} mse {record['mse']:.4f} "
                  f"vb {record['vb']:.4f} balance {record['balance_loss']:.5f} "
                  f"grad_norm {grad_norm:.3f} {record['samples_per_s']:.1f} samples/s", flush=True)
        self.window_start, self.window_samples = time.perf_counter(), 0
        return record


def train(config: TrainConfig) -> dict:
    """Run training; returns the final metrics record (rank 0's view)."""
    return Trainer(config).train()
