"""Train a tiny model a few steps with DeepSpeed (ZeRO stage S, EP size E) under torchrun, or in one process
without DeepSpeed (the reference): same global batches, same micro-batches.

torchrun ... ep_worker.py OUT ZERO:EP:MODEL [...] writes OUT/zZERO_epEP_MODEL.pt on rank 0: per-step loss
and balance loss (with a capacity predictor's loss), expert loads, the gathered parameters in ditmoe's names, and
the bytes each rank's expert-choice all-to-alls sent to other ranks per micro-batch. MODEL names one of ``MODELS``.
"""

import sys

import torch
import torch.nn.functional as F

from ditmoe.model import DiT, get_preset
from ditmoe.model.conditioning import Caption, index_condition
from ditmoe.parallel.distributed import shutdown_distributed

STEPS, GLOBAL_BATCH, MICRO_BATCH, LR = 5, 8, 2, 3e-3
MODELS = {  # name -> model
    "tc": get_preset("tiny"),  # token choice top-2
    "ec": get_preset("tiny-ec"),  # expert choice per sample
    "ecbatch": get_preset("tiny-ec").replace(routing_pool="batch"),  # over each rank's micro-batch (DiffMoE)
    "tcgelu": get_preset("tiny").replace(expert_activation="gelu"),  # GELU routed and shared experts
    # EC-DiT's experts (GELU, no shared experts) with DiffMoE's capacity predictor
    "ecgelu": get_preset("tiny-ec").replace(expert_activation="gelu", num_shared_experts=0, capacity_predictor=True),
    "ecdit": get_preset("EC-DiT-tiny"),  # the preset as it is: text-conditioned, GELU experts in every other block
}


def batch(step: int, config):
    """The global batch of a step for a model of ``config``: (x, t, y, target); y: labels or a caption."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
    if config.is_text:  # caption embeddings, 1..L real tokens each
        lengths = torch.randint(1, config.text_len + 1, (GLOBAL_BATCH, 1), generator=g)
        y = Caption(torch.randn(GLOBAL_BATCH, config.text_len, config.text_dim, generator=g),
                    torch.arange(config.text_len) < lengths)
    else:
        y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    target = torch.randn(GLOBAL_BATCH, config.out_channels, config.input_size, config.input_size, generator=g)
    return x, t, y, target


def rows(data, start: int, stop: int):
    """Samples [start, stop) of every part of a batch."""
    return [index_condition(d, slice(start, stop)) for d in data]


def build(name: str, ep: int = 1, zero: int = 0):
    from ditmoe.parallel.expert_parallel import moe_param_groups, prepare_for_autoep

    torch.manual_seed(0)
    model = DiT(MODELS[name])
    prepare_for_autoep(model, ep)  # GELU experts as AutoEP reads them (the trainer does the same)
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


def reference(name: str) -> dict:
    """One process, plain PyTorch: accumulate the mean over all micro-batches of the global batch."""
    model, opt = build(name)
    model.train()
    n = GLOBAL_BATCH // MICRO_BATCH
    losses, bals, loads = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        load = 0
        data = batch(step, model.config)
        total, total_bal = 0.0, 0.0
        for i in range(n):
            micro = rows(data, i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
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


def distributed(zero: int, ep: int, name: str) -> dict:
    import torch.distributed as dist

    from ditmoe.parallel.engine import initialize
    from ditmoe.parallel.expert_parallel import adapt_autoep_layers, autoep_config, gather_full_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(name, ep, zero)
    gas = GLOBAL_BATCH // (MICRO_BATCH * world)
    config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero}, "steps_per_print": 10**9,
        "expert_parallel": autoep_config(ep, model.config),
    }
    engine, _ = initialize(model, opt, config)  # the trainer's: AutoEP layers keep the capacity predictors
    hooked = adapt_autoep_layers(engine.module, model.config)
    engine.train()
    per_rank = GLOBAL_BATCH // world
    losses, bals, loads = [], [], []
    sent = OffRankBytes()
    for step in range(STEPS):
        load = 0
        data = rows(batch(step, model.config), rank * per_rank, (rank + 1) * per_rank)
        sums = torch.zeros(2)
        for i in range(gas):
            micro = rows(data, i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
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
        zero, ep, name = run.split(":")
        result = distributed(int(zero), int(ep), name)
        if dist.get_rank() == 0:
            torch.save(result, f"{out}/z{zero}_ep{ep}_{name}.pt")
    shutdown_distributed()  # barrier, then exit without gloo's teardown, which aborts a rank now and then


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
