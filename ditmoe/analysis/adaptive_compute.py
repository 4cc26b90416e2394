"""EC-DiT's adaptive compute: how many experts process each image token, per MoE layer and sampling step.

Under expert choice every expert takes its top-C image tokens of each sample (C = ceil(capacity_factor ·
T / E)), so a token is processed by 0..E experts: the router spends more compute on some tokens (EC-DiT,
arXiv 2410.02098, its heat maps of the experts per token) and leaves others to the residual path alone
(count 0, "unprocessed"). Per sample and layer the counts always sum to E·C. Under token choice every
token gets exactly top_k experts.

:class:`ExpertsPerTokenRecorder` attaches to a :class:`~ditmoe.model.DiT` (class-conditional or
text-conditioned) and keeps, for every sampling step and MoE layer, each token's expert count;
:func:`record_adaptive_compute` samples a batch of conditions (labels or a ``Caption``) under it and
returns an :class:`AdaptiveCompute` with the generated samples.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..model.conditioning import Condition
from ..model.conditioning import batch_size as batch_size_of
from ..model.routing import expert_capacity
from ..sampling import generate, num_batches
from .hooks import MoEHookRecorder


@dataclass
class AdaptiveCompute:
    """Experts per image token of N samples, S sampling steps (noisiest first), L MoE layers, a g x g token grid."""

    routing: str  # "expert_choice" or "token_choice"
    num_experts: int  # E
    capacity: int  # C: tokens each expert takes per sample (expert choice per sample); 0 otherwise
    assignments_per_sample: int  # (token, expert) assignments per sample and layer: E·C, or top_k·T; 0 when a
    # routing pool spans samples (group, batch): a sample's share then varies (``experts_per_token_per_sample``)
    layer_blocks: np.ndarray  # (L,) block index of each MoE layer
    step_timesteps: np.ndarray  # (S,) model timestep of each sampling step
    experts_per_token: np.ndarray  # (S, L, N, g, g) int16: experts that processed each token (conditional pass)
    # (S, L, N, g, g) the same for the unconditional (null-condition) half of classifier-free guidance;
    # N = 0 when sampled without guidance
    experts_per_token_null: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.experts_per_token.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts_per_token.shape[1]

    @property
    def num_samples(self) -> int:
        return self.experts_per_token.shape[2]

    @property
    def grid_size(self) -> int:
        return self.experts_per_token.shape[3]

    def unprocessed_fraction(self, null: bool = False) -> np.ndarray:
        """(S, L) share of the tokens that no expert processed (count 0), over all samples."""
        counts = self.experts_per_token_null if null else self.experts_per_token
        return (counts == 0).mean(axis=(2, 3, 4))

    def unprocessed_fraction_per_sample(self) -> np.ndarray:
        """(S, L, N) share of each sample's tokens that no expert processed."""
        return (self.experts_per_token == 0).mean(axis=(3, 4))

    def coverage(self) -> np.ndarray:
        """(S, L, E+1) share of the tokens processed by 0, 1, ..., E experts."""
        steps, layers = self.num_steps, self.num_layers
        flat = self.experts_per_token.reshape(steps * layers, -1).astype(np.int64)
        hist = np.stack([np.bincount(row, minlength=self.num_experts + 1) for row in flat])
        return (hist / max(flat.shape[1], 1)).reshape(steps, layers, self.num_experts + 1)

    def mean_experts_per_token(self) -> np.ndarray:
        """(S, L, g, g) experts per token at each patch position, averaged over the samples."""
        return self.experts_per_token.mean(axis=2)

    def save_npz(self, path: str | Path, **extra: np.ndarray) -> None:
        """Every field (``routing`` as a string array) plus ``extra`` arrays, compressed."""
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        np.savez_compressed(path, **arrays, unprocessed_fraction=self.unprocessed_fraction(),
                            **{k: np.asarray(v) for k, v in extra.items()})

    @classmethod
    def load_npz(cls, path: str | Path) -> "AdaptiveCompute":
        with np.load(path) as data:
            values = {f.name: data[f.name] for f in fields(cls)}
        for name in ("routing",):
            values[name] = str(values[name])
        for name in ("num_experts", "capacity", "assignments_per_sample"):
            values[name] = int(values[name])
        return cls(**values)

    def summary(self, groups: list[tuple[str, np.ndarray]] | None = None) -> dict:
        """JSON-ready: ``unprocessed_fraction`` (S, L) nested list [step][layer], the same for the null half when
        guided, per layer the step-averaged unprocessed fraction, share of tokens with 0..E experts and the range
        of the count, and with ``groups`` [(name, sample indices)] (e.g. one per prompt) each group's (S, L)
        unprocessed fraction."""
        fraction = self.unprocessed_fraction()
        coverage = self.coverage().mean(axis=0)  # (L, E+1)
        per_sample = self.experts_per_token.mean(axis=(3, 4))  # (S, L, N) a sample's mean experts per token
        layers = []
        for i, block in enumerate(self.layer_blocks):
            counts = self.experts_per_token[:, i]
            layers.append({
                "block": int(block),
                "unprocessed_fraction_mean": _round(fraction[:, i].mean()),
                "unprocessed_fraction_min": _round(fraction[:, i].min()),
                "unprocessed_fraction_max": _round(fraction[:, i].max()),
                "experts_per_token_mean": _round(counts.mean()),
                "experts_per_token_max": int(counts.max()),
                "experts_per_token_per_sample": {"min": _round(per_sample[:, i].min()),
                                                 "max": _round(per_sample[:, i].max())},
                "coverage": [_round(v) for v in coverage[i]],
            })
        summary = {
            "routing": self.routing,
            "num_experts": self.num_experts,
            "capacity": self.capacity,
            "assignments_per_sample": self.assignments_per_sample,
            "grid_size": self.grid_size,
            "num_samples": self.num_samples,
            "num_steps": self.num_steps,
            "step_timesteps": [_round(t) for t in self.step_timesteps],
            "layer_blocks": [int(b) for b in self.layer_blocks],
            "unprocessed_fraction": _nested(fraction),
            "layers": layers,
        }
        if self.experts_per_token_null.shape[2]:
            summary["unprocessed_fraction_null"] = _nested(self.unprocessed_fraction(null=True))
        if groups is not None:
            per_sample = self.unprocessed_fraction_per_sample()  # (S, L, N)
            summary["groups"] = [{"name": name, "samples": [int(i) for i in index],
                                  "unprocessed_fraction": _nested(per_sample[:, :, index].mean(axis=2))}
                                 for name, index in groups]
        return summary

    def format_table(self, max_rows: int = 20) -> str:
        """The unprocessed fraction as text: one row per sampling step (at most ``max_rows``, evenly spaced),
        one column per MoE layer, and a last row averaged over all steps."""
        fraction = self.unprocessed_fraction()
        rows = pick_steps(self.num_steps, max_rows)
        header = ["step", "t"] + [f"block {b}" for b in self.layer_blocks]
        lines = [[str(s), f"{self.step_timesteps[s]:g}", *(f"{v:.4f}" for v in fraction[s])] for s in rows]
        lines.append(["mean", "", *(f"{v:.4f}" for v in fraction.mean(axis=0))])
        widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]
        text = [("  ".join(v.rjust(w) for v, w in zip(r, widths))) for r in [header, *lines]]
        shown = "" if len(rows) == self.num_steps else f" ({len(rows)} of {self.num_steps} steps shown)"
        return f"share of image tokens processed by no expert, per sampling step and MoE layer{shown}:\n" + \
            "\n".join(text)


def _round(value) -> float:
    return round(float(value), 6)


def _nested(array: np.ndarray) -> list:
    return [[_round(v) for v in row] for row in array]


def pick_steps(num_steps: int, count: int) -> list[int]:
    """Up to ``count`` evenly spaced step indices from the first to the last."""
    if count >= num_steps:
        return list(range(num_steps))
    return sorted(set(np.linspace(0, num_steps - 1, max(count, 1)).round().astype(int).tolist()))


def assignments_per_sample(config) -> tuple[int, int]:
    """(C, assignments per sample and layer) of an MoE model config: (C, E·C) for expert choice per sample, (0, k·T)
    for token choice, (0, 0) for pools spanning samples (a sample's share depends on the others)."""
    t, e = config.num_tokens, config.num_experts
    if config.routing == "expert_choice" and config.routing_pool != "sample":
        return 0, 0
    if config.routing == "expert_choice":
        c = expert_capacity(config.capacity_factor, t, e)
        return c, e * c
    return 0, config.top_k * t


class ExpertsPerTokenRecorder(MoEHookRecorder):
    """Context manager keeping how many experts took each image token, per model call and MoE layer.

    Call :meth:`start_run` with the number of samples before each sampler run: its k-th model call is step
    k. A call on twice that many samples is a classifier-free-guidance batch: its first half is the
    conditional pass, the second the null condition's. :meth:`result` gives an :class:`AdaptiveCompute` of
    all runs, their samples concatenated in run order.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._current: list[list[torch.Tensor | None]] | None = None  # step -> layer -> (n_call, T) of this run
        self._finished: list[np.ndarray] = []  # per finished run (S, L, n_call, T) int16, on the CPU
        self._run_samples: list[int] = []
        self._timesteps: list[float] = []  # of the first run
        self._step = 0

    def start_run(self, num_samples: int) -> None:
        """The next model call is step 0 of a sampler run on ``num_samples`` samples."""
        self._finish_run()
        self._current = []
        self._run_samples.append(int(num_samples))
        self._step = 0

    def _on_model_call(self, module, args, kwargs) -> None:
        if self._current is None:
            raise RuntimeError("call start_run(num_samples) before sampling")
        call = self._signature.bind(*args, **kwargs).arguments
        x, t = call["x"], call["t"]
        n = self._run_samples[-1]
        if x.shape[0] not in (n, 2 * n):
            raise ValueError(f"a model call on {x.shape[0]} samples in a run of {n} (expected {n}, or {2 * n} "
                             "with classifier-free guidance)")
        t0 = float(t[0])
        if not bool((t == t[0]).all()):
            raise ValueError("a model call mixes timesteps; the recorder expects one sampler step per call")
        step, first_run = self._step, len(self._run_samples) == 1
        if first_run and step == len(self._timesteps):
            self._timesteps.append(t0)
        elif step >= len(self._timesteps) or self._timesteps[step] != t0:
            known = f"{self._timesteps[step]:g}" if step < len(self._timesteps) else "no such step"
            raise ValueError(f"step {step} has timestep {t0:g} but {known} in the first run: every run must use "
                             "the same sampler and steps")
        self._current.append([None] * len(self.layers))
        self._step += 1

    def _on_routing(self, layer: int, module, routing, shape: tuple[int, int]) -> None:
        n, t = shape
        if not self._current or t != self.config.num_tokens:
            raise RuntimeError("MoE layer routed tokens outside a recorded DiT call")
        token = routing.token_index
        counts = torch.zeros(n * t, dtype=torch.int32, device=token.device)
        counts.scatter_add_(0, token, torch.ones_like(token, dtype=torch.int32))
        self._current[-1][layer] = counts.view(n, t).to(torch.int16)

    def _finish_run(self) -> None:
        """Check the run in progress (if any) and move its counts to the CPU."""
        if self._current is None:
            return
        run, steps = len(self._finished), self._current
        if not steps:
            raise ValueError(f"sampler run {run} made no model call")
        if len(steps) != len(self._timesteps):
            raise ValueError(f"sampler run {run} made {len(steps)} model calls, the first run "
                             f"{len(self._timesteps)}: every run must use the same sampler and steps")
        if any(c is None for layers in steps for c in layers):
            raise RuntimeError(f"sampler run {run}: an MoE layer did not route at some step")
        if len({len(c) for layers in steps for c in layers}) != 1:
            raise ValueError(f"sampler run {run} mixed guided and unguided model calls")
        self._finished.append(torch.stack([torch.stack(layers) for layers in steps]).cpu().numpy())
        self._current = None

    def result(self) -> AdaptiveCompute:
        """The counts of every run, on the CPU."""
        self._finish_run()
        if not self._timesteps:
            raise ValueError("no model call was recorded")
        cfg = self.config
        g = cfg.input_size // cfg.patch_size
        cond = [counts[:, :, :n] for counts, n in zip(self._finished, self._run_samples)]  # (S, L, n, T)
        null = [counts[:, :, n:] for counts, n in zip(self._finished, self._run_samples)]
        if len({u.shape[2] > 0 for u in null}) > 1:
            raise ValueError("some sampler runs used classifier-free guidance and others did not")
        steps, layers = len(self._timesteps), len(self.layers)
        capacity, assignments = assignments_per_sample(cfg)
        return AdaptiveCompute(
            routing=cfg.routing, num_experts=cfg.num_experts, capacity=capacity,
            assignments_per_sample=assignments,
            layer_blocks=np.array(self.layer_blocks, dtype=np.int64),
            step_timesteps=np.array(self._timesteps, dtype=np.float64),
            experts_per_token=np.concatenate(cond, axis=2).reshape(steps, layers, -1, g, g),
            experts_per_token_null=np.concatenate(null, axis=2).reshape(steps, layers, -1, g, g),
        )


def record_adaptive_compute(model, objective, conditions: Condition, *, cfg_scale: float = 1.0,
                            sampler: str | None = None, steps: int | None = None, batch_size: int = 250,
                            seed: int = 0, progress: bool = False) -> tuple[AdaptiveCompute, torch.Tensor]:
    """Sample ``conditions`` ((N,) labels or a Caption of N prompts) in batches while recording the experts of
    every image token; returns (AdaptiveCompute, samples (N, C, H, W) on the CPU). Batch b starts from noise
    seeded by ``seed + b``, as ``ditmoe.sampling.generate`` (and tools/sample.py) draws it."""
    n = batch_size_of(conditions)
    if n == 0:
        raise ValueError("no samples to record")
    samples = []
    with ExpertsPerTokenRecorder(model) as recorder:
        for b in range(num_batches(n, batch_size)):
            recorder.start_run(min(batch_size, n - b * batch_size))
            samples.append(generate(model, objective, conditions, cfg_scale=cfg_scale, sampler=sampler,
                                    steps=steps, batch_size=batch_size, seed=seed, progress=progress, batches=[b]))
    return recorder.result(), torch.cat(samples)
