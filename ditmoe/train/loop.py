"""The training loop: DeepSpeed engine, EMA, checkpoints with exact resume, metrics."""

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..diffusion import build_objective
from ..model import DiT
from ..parallel import engine as ds_engine
from ..parallel.activation_checkpointing import apply_activation_checkpointing
from ..parallel.distributed import all_reduce, all_reduce_mean, init_distributed
from ..parallel.expert_parallel import (attach_balance_loss, autoep_config, gather_full_state_dict,
                                        moe_param_groups, validate_ep)
from . import checkpoint, universal
from .config import TrainConfig
from .data import build_loader
from .ema import EMA
from .metrics import MetricsWriter, expert_load_stats
from .preemption import PreemptionGuard


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the noise, timesteps and label dropout of one micro-batch: independent of world size."""
    return (seed * 1_000_003 + step) * 4099 + micro_index


def model_fn(engine, dtype: torch.dtype):
    """model(x, t, y) on the engine with inputs cast to its dtype and fp32 outputs."""

    def call(x, t, y):
        return engine(x.to(dtype), t, y).float()

    return call


def check_resume_compatible(meta: dict, config: TrainConfig, tag_dir: Path):
    saved = meta["model_config"]
    current = config.model_config().to_dict()
    diff = sorted(k for k in current if saved.get(k) != current[k])
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in diff)
        raise ValueError(f"checkpoint {tag_dir} was trained with another model config ({details})")


def check_universal_compatible(meta: dict, zero_stage: int, tag_dir: Path):
    """DeepSpeed's universal checkpoints of ZeRO-1/2 and of ZeRO-3 have different layouts: a run may
    change world size and EP size, but not cross between the two families."""
    saved = meta.get("zero_stage")
    if saved is None:
        raise ValueError(f"checkpoint {tag_dir} does not record its ZeRO stage (saved by an older ditmoe); "
                         "resume it with the same topology instead of --resume-universal")
    if (saved == 3) != (zero_stage == 3):
        raise ValueError(f"checkpoint {tag_dir} was saved with ZeRO-{saved}; DeepSpeed's universal checkpoint "
                         f"cannot move it to ZeRO-{zero_stage} (ZeRO-1/2 and ZeRO-3 layouts differ): "
                         f"use --zero-stage {3 if saved == 3 else saved}")


def find_resume(config: TrainConfig, ckpt_root: Path) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        return checkpoint.latest_tag_dir(ckpt_root)
    return checkpoint.resolve_checkpoint(config.resume)


def train(config: TrainConfig) -> dict:
    """Run training; returns the final metrics record (rank 0's view)."""
    rank, world, device = init_distributed()
    out = Path(config.out)
    ckpt_root = out / "checkpoints"
    model_config = config.model_config()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps({"train": config.to_dict(), "model": model_config.to_dict()}, indent=2)
        )

    micro = config.micro_batch_size or config.global_batch_size // world
    ds_config = ds_engine.deepspeed_config(
        base=ds_engine.load_config_file(config.deepspeed_config),
        global_batch_size=config.global_batch_size, micro_batch_size=micro, world_size=world,
        zero_stage=config.zero_stage, precision=config.precision, grad_clip=config.grad_clip,
    )
    accumulation = ds_config["gradient_accumulation_steps"]
    zero = ds_config["zero_optimization"]
    validate_ep(config.ep_size, model_config.num_experts, world, model_config.routing, zero["stage"], zero)
    if ds_config.get("expert_parallel", {}).get("enabled") and config.ep_size == 1:
        raise ValueError(f"--deepspeed-config {config.deepspeed_config} enables expert_parallel: pass --ep-size N > 1")
    ds_config["expert_parallel"] = {**ds_config.get("expert_parallel", {}), **autoep_config(config.ep_size, model_config)}
    loader = build_loader(config, model_config, rank, world)
    resume_dir = find_resume(config, ckpt_root)
    if resume_dir is not None:
        resume_meta = checkpoint.read_meta(resume_dir)
        check_resume_compatible(resume_meta, config, resume_dir)
        if config.resume_universal:
            check_universal_compatible(resume_meta, zero["stage"], resume_dir)
            if rank == 0:
                universal.convert(resume_dir)
            if dist.is_initialized():
                dist.barrier()
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = DiT(model_config).to(device)
    apply_activation_checkpointing(model, config.activation_checkpointing)
    objective = build_objective(config.objective)
    optimizer = ds_engine.build_optimizer(
        moe_param_groups(model, config.ep_size, zero["stage"]), config.lr, config.weight_decay,
        (config.adam_beta1, config.adam_beta2), cpu_offload=ds_engine.offloads_optimizer(ds_config),
    )
    engine, optimizer = ds_engine.initialize(model, optimizer, ds_config)
    attach_balance_loss(engine.module)
    ema = EMA(engine.module, config.ema_decay)
    dtype = torch.bfloat16 if ds_engine.uses_bf16(ds_config) else torch.float32
    forward = model_fn(engine, dtype)

    step = 0
    if resume_dir is not None:
        if config.resume_universal:  # another topology: re-shard the engine state, cut the EMA from ema.pt
            meta = checkpoint.load_universal(engine, resume_dir)
            ema.load_full(checkpoint.load_ema_model_state(resume_dir), engine.module)
        else:
            meta, ema_state = checkpoint.load(engine, resume_dir, rank)
            ema.load_state_dict(ema_state)
        loader.load_state_dict(meta["data"])
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
        step = meta["step"]
        if rank == 0:
            print(f"resumed from {resume_dir} at step {step}", flush=True)

    moe_layers = engine.module.moe_layers()
    moe_blocks = [i for i in range(model_config.depth) if model_config.moe_in_block(i)]
    writer = MetricsWriter(out, config.tensorboard) if rank == 0 else None
    record = {}
    window_start, window_samples = time.perf_counter(), 0
    guard = PreemptionGuard()
    batches = iter(loader)
    while step < config.steps:
        x_local, y_local = next(batches)  # entries rank, rank + W, ... of the global batch
        sums = torch.zeros(4)
        loads = torch.zeros(len(moe_layers), model_config.num_experts)
        grad_norm = None
        set_lr(optimizer, config, step)
        for a in range(accumulation):
            # micro-batch j = rank + a·W of the global batch g is g[j::G/m], i.e. x_local[a::accumulation]:
            # the same samples whatever the world size
            x, y = x_local[a::accumulation].to(device), y_local[a::accumulation].to(device)
            torch.manual_seed(micro_batch_seed(config.seed, step, rank + a * world))
            losses = objective.training_losses(forward, x, y)
            balance = engine.module.balance_loss().float()
            loss = losses["loss"].mean() + balance
            engine.backward(loss)
            if a == accumulation - 1 and zero["stage"] == 0:
                grad_norm = parameter_grad_norm(engine.module)
            engine.step()
            sums += torch.stack([loss, losses["mse"].mean(), losses["vb"].mean(), balance]).detach().cpu()
            for i, layer in enumerate(moe_layers):
                loads[i] += layer.expert_counts.float().cpu()
        ema.update(engine.module, step)
        step += 1
        window_samples += config.global_batch_size
        if grad_norm is None:
            grad_norm = float(engine.get_global_grad_norm())

        if step % config.log_every == 0 or step == config.steps:
            mean = all_reduce_mean(sums) / accumulation
            loads = all_reduce(loads)
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step, "loss": mean[0].item(), "mse": mean[1].item(), "vb": mean[2].item(),
                "balance_loss": mean[3].item(), "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": window_samples / elapsed,
                **expert_load_stats(loads.tolist(), moe_blocks),
            }
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if writer is not None:
                writer.log(record)
                print(f"step {step}/{config.steps} loss {record['loss']:.4f} mse {record['mse']:.4f} "
                      f"vb {record['vb']:.4f} balance {record['balance_loss']:.5f} "
                      f"grad_norm {grad_norm:.3f} {record['samples_per_s']:.1f} samples/s", flush=True)
            window_start, window_samples = time.perf_counter(), 0

        preempted = guard.should_stop()
        if step % config.ckpt_every == 0 or step == config.steps or preempted:
            meta = {
                "model_config": model_config.to_dict(), "train_config": config.to_dict(),
                "data": loader.state_dict(), "rng": torch.get_rng_state().tolist(), "world_size": world,
                "zero_stage": zero["stage"],
            }
            ema_state = ema.state_dict()
            ema_full = gather_full_state_dict(engine, ema_state)  # collective
            ema_local = ema_state if ema.partitioned or config.ep_size > 1 else None
            checkpoint.save(engine, ckpt_root, step, ema_full=ema_full, ema_local=ema_local, meta=meta, rank=rank)
        if preempted:
            if rank == 0:
                print(f"preempted: saved checkpoint at step {step}; rerun with --resume auto to continue", flush=True)
            break
    if writer is not None:
        writer.close()
    return {**record, "preempted": step < config.steps}


def set_lr(optimizer, config: TrainConfig, step: int):
    """Linear warm-up over ``lr_warmup_steps``, then constant."""
    scale = min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * scale


def parameter_grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
