"""Record and save the expert routing of a checkpoint while it samples every class (paper §3.3, Figures 5-7)."""

import json
from pathlib import Path

from ..diffusion import build_objective
from ..inference import load_model
from ..sampling import balanced_labels, generate
from .routing_plots import save_routing_plots
from .routing_stats import RoutingRecorder


def record_routing(model, objective, labels, *, cfg_scale: float, sampler: str, steps: int | None,
                   batch_size: int, seed: int):
    """RoutingStats of sampling ``labels`` in batches; batch b starts from noise seeded by ``seed + b``."""
    with RoutingRecorder(model) as recorder:
        for b, y in enumerate(labels.split(batch_size)):
            recorder.start_run()
            generate(model, objective, y, cfg_scale=cfg_scale, sampler=sampler, steps=steps, batch_size=len(y),
                     seed=seed + b, progress=True)
    return recorder.stats()


def analyze_routing(ckpt: str, out: str | Path, samples_per_class: int, *, cfg_scale: float = 1.0,
                    sampler: str | None = None, steps: int | None = None, weights: str = "ema",
                    batch_size: int = 250, seed: int = 0) -> list[Path]:
    """Sample ``samples_per_class`` images of every class from ``ckpt`` while recording each token's experts,
    then write ``routing_stats.npz``, ``routing_stats.json`` and the PNG heatmaps into ``out``; returns
    the paths written. Nothing is written when the checkpoint or the settings are bad."""
    model, meta = load_model(ckpt, weights=weights)
    if not model.config.is_moe:
        raise ValueError(f"checkpoint {ckpt} is a dense model (num_experts=0): no MoE layers to analyse")
    train_config = meta["train_config"]
    objective = build_objective(train_config["objective"])
    sampler = sampler or objective.default_sampler
    labels = balanced_labels(samples_per_class * model.config.num_classes, model.config.num_classes)
    stats = record_routing(model, objective, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps,
                           batch_size=batch_size, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats.save_npz(out / "routing_stats.npz")
    settings = {"ckpt": str(ckpt), "preset": train_config["preset"], "objective": train_config["objective"],
                "sampler": sampler, "steps": len(stats.step_timesteps), "cfg_scale": cfg_scale,
                "weights": weights, "seed": seed, "samples_per_class": samples_per_class}
    (out / "routing_stats.json").write_text(json.dumps({"settings": settings, **stats.summary()}, indent=1) + "\n")
    title = (f"{train_config['preset']} ({len(labels)} samples, {sampler} {len(stats.step_timesteps)} steps, "
             f"cfg {cfg_scale:g})")
    return [out / "routing_stats.npz", out / "routing_stats.json", *save_routing_plots(stats, out, title)]
