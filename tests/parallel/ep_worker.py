"""Train a tiny model a few steps with DeepSpeed (ZeRO stage S, EP size E) under torchrun, or in one process
without DeepSpeed (the reference): same global batches, same micro-batches.

torchrun ... ep_worker.py OUT ZERO:EP:ROUTING [...] writes OUT/zZERO_epEP_ROUTING.pt on rank 0: per-step loss
and balance loss, expert loads, the gathered parameters in ditmoe's names, and the bytes each rank's expert-choice
all-to-alls sent to other ranks per micro-batch. ROUTING names a model of ``MODELS``.
"""

import sys

import torch
import torch.nn.functional as F

from ditmoe.model import DiT, get_preset
from ditmoe.parallel.distributed import shutdown_distributed

STEPS, GLOBAL_BATCH, MICRO_BATCH, LR = 5, 8, 2, 3e-3
MODELS = {  # routing -> model
    "tc": get_preset("tiny"),  # token choice top-2
    "ec": get_preset("tiny-ec"),  # expert choice per sample
    "ecbatch": get_preset("tiny-ec").replace(routing_pool="batch"),  # over each rank's micro-batch (DiffMoE)
}


def batch(step: int):
    """The global batch of a step: (x, t, y, target)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    return x, t, y, torch.randn(GLOBAL_BATCH, 8, 8, 8, generator=g)


def build(routing: str, ep: int = 1, zero: int = 0):
    from ditmoe.parallel.expert_parallel import moe_param_groups

    torch.manual_seed(0)
    model = DiT(MODELS[routing])
    return model, torch.optim.AdamW(moe_param_groups(model, ep, zero), lr=LR, weight_decay=0.01)


def counts(model) -> torch.Tensor:
    """(MoE layers, E) int64 expert assignments of the last forward."""
    layers = model.moe_layers()
    return torch.stack([m.expert_counts for m in layers])


def micro_loss(forward, model, micro, seed: int):
    """MSE to the target plus the balance loss; ``seed`` fixes the label dropout of this micro-batch."""
    x, t, y, target = micro
    torch.manual_seed(seed)
    out = forward(x, t, y)
    bal = model.balance_loss()
    return F.mse_loss(out, target) + bal, bal


def reference(routing: str) -> dict:
    """One process, plain PyTorch: accumulate the mean over all micro-batches of the global batch."""
    model, opt = build(routing)
    model.train()
    n = GLOBAL_BATCH // MICRO_BATCH
    losses, bals, loads = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        load = 0
        data = batch(step)
        total, total_bal = 0.0, 0.0
        for i in range(n):
            micro = [d[i * MICRO_BATCH:(i + 1) * MICRO_BATCH] for d in data]
            loss, bal = micro_loss(model, model, micro, 100 * step + i)
            (loss / n).backward()
            load = load + counts(model)
            total, total_bal = total + loss.item() / n, total_bal + bal.item() / n
        opt.step()
        losses.append(total)
        bals.append(total_bal)
        loads.append(load)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"loss": losses, "balance": bals, "loads": loads, "params": params}


class OffRankBytes:
    """Counts what ``torch.distributed.all_to_all_single`` with equal splits sends to other ranks."""

    def __init__(self):
        self.total, self.original = 0, None

    def __enter__(self):
        import torch.distributed as dist

        self.original = original = dist.all_to_all_single

        def counted(output, input, *args, group=None, **kwargs):
            share = (dist.get_world_size(group) - 1) / dist.get_world_size(group)
            self.total += input.numel() * input.element_size() * share
            return original(output, input, *args, group=group, **kwargs)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_to_all_single = self.original


def distributed(zero: int, ep: int, routing: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from ditmoe.parallel.expert_choice_ep import use_expert_choice
    from ditmoe.parallel.expert_parallel import attach_balance_loss, autoep_config, gather_full_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(routing, ep, zero)
    gas = GLOBAL_BATCH // (MICRO_BATCH * world)
    config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero}, "steps_per_print": 10**9,
        "expert_parallel": autoep_config(ep, model.config),
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    expert_choice = model.config.routing == "expert_choice"
    hooked = use_expert_choice(engine.module, model.config) if expert_choice else attach_balance_loss(engine.module)
    engine.train()
    per_rank = GLOBAL_BATCH // world
    losses, bals, loads = [], [], []
    sent = OffRankBytes()
    for step in range(STEPS):
        load = 0
        data = [d[rank * per_rank:(rank + 1) * per_rank] for d in batch(step)]
        sums = torch.zeros(2)
        for i in range(gas):
            micro = [d[i * MICRO_BATCH:(i + 1) * MICRO_BATCH] for d in data]
            with sent:
                loss, bal = micro_loss(engine, engine.module, micro, 100 * step + rank * gas + i)
                engine.backward(loss)
            engine.step()
            sums += torch.stack([loss.detach(), bal.detach()]) / gas
            load = load + counts(engine.module)
        dist.all_reduce(sums)
        dist.all_reduce(load)
        loads.append(load)
        losses.append(sums[0].item() / world)
        bals.append(sums[1].item() / world)
    params = gather_full_state_dict(engine)
    engine.destroy()
    return {"loss": losses, "balance": bals, "loads": loads, "autoep_layers": hooked, "params": params,
            "sent_per_micro_batch": sent.total / (STEPS * gas)}


def main(out: str, runs: list[str]):
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for run in runs:
        zero, ep, routing = run.split(":")
        result = distributed(int(zero), int(ep), routing)
        if dist.get_rank() == 0:
            torch.save(result, f"{out}/z{zero}_ep{ep}_{routing}.pt")
    shutdown_distributed()  # barrier, then exit without gloo's teardown, which aborts a rank now and then


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
