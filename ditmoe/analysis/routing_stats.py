"""Count which experts every token is routed to while a DiT-MoE samples (paper §3.3).

:class:`RoutingRecorder` attaches to a :class:`~ditmoe.model.DiT`: a forward pre-hook reads each
model call's timesteps ``t`` and labels ``y`` (the null label ``K`` marks the unconditional half of
a classifier-free-guidance batch), and a routing hook on every MoE layer counts each (token, expert)
assignment by class, by patch position and by sampling step. The k-th model call after
:meth:`RoutingRecorder.start_run` is sampling step k, so call it before each sampler run.

Frequencies are assignments / tokens seen: for top-k token choice every token makes k assignments;
under expert choice a token gets 0..E experts, which ``coverage`` counts.

Routing pools (``routing_pool``: each sample, groups of samples, the whole model call) are counted too: the
tokens each expert took in each pool (exactly C per pool for expert choice in training; varying for token choice
and for a capacity predictor's threshold) and each sample's experts per token (the same for every sample with
per-sample expert choice; spread over the samples of a pool with group and batch pools).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.routing import pool_sizes
from .hooks import MoEHookRecorder

FACTORS = ("class", "position", "step")


@dataclass
class RoutingStats:
    """Assignment and token counts of one analysis, as numpy arrays (L MoE layers, E experts)."""

    routing: str  # "token_choice" or "expert_choice"
    routing_pool: str  # "sample", "group" or "batch"
    routing_group_size: int  # tokens per group pool (0 unless routing_pool="group")
    num_classes: int  # K; index K of the class axis is the null (unconditional) label
    grid_size: int  # the T patch positions form a grid_size x grid_size grid, row-major
    layer_blocks: np.ndarray  # (L,) block index of each MoE layer
    step_timesteps: np.ndarray  # (S,) model timestep of each sampling step, in sampling order
    by_class: np.ndarray  # (L, K+1, E) assignments
    by_position: np.ndarray  # (L, T, E)
    by_step: np.ndarray  # (L, S, E)
    total: np.ndarray  # (L, E)
    coverage: np.ndarray  # (L, S, E+1) tokens routed to 0, 1, ..., E experts
    tokens_by_class: np.ndarray  # (K+1,) tokens seen (the same in every layer)
    tokens_by_position: np.ndarray  # (T,)
    tokens_by_step: np.ndarray  # (S,)
    pools: np.ndarray  # (P,) tokens of every routing pool seen, in order (the same pools in every layer)
    pool_expert_min: np.ndarray  # (L,) fewest tokens an expert took in one pool
    pool_expert_max: np.ndarray  # (L,) most tokens an expert took in one pool
    sample_experts_min: np.ndarray  # (L,) lowest mean experts per token of one sample
    sample_experts_max: np.ndarray  # (L,) highest mean experts per token of one sample

    @property
    def num_experts(self) -> int:
        return self.total.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_by_step.sum())

    def frequency(self, factor: str) -> np.ndarray:
        """Selection frequency by ``factor`` ("class", "position" or "step"): (L, V, E), NaN where no tokens."""
        counts, tokens = self._factor(factor)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tokens[:, None] > 0, counts / tokens[:, None], np.nan)

    def overall_frequency(self) -> np.ndarray:
        """(L, E) assignments per token seen."""
        return self.total / max(self.num_tokens, 1)

    def frequency_range(self, factor: str) -> np.ndarray:
        """(L, E) max - min of the selection frequency over the factor's values (real classes only)."""
        freq = self._observed(factor)[0]
        return freq.max(axis=1) - freq.min(axis=1)

    def save_npz(self, path: str | Path) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in asdict(self).items()})

    def summary(self) -> dict:
        """JSON-ready summary; per layer: ``expert_load`` (share of the assignments), ``selection_frequency``
        (assignments per token), ``experts_per_token``, ``coverage`` (share of tokens routed to 0..E experts),
        ``{class,step,position}_range`` (per expert, max - min of its frequency over the factor's values) and
        ``most_{factor}_specialised`` (the expert with the largest range, where it peaks and dips)."""
        layers = []
        load = self.total / np.maximum(self.total.sum(axis=1, keepdims=True), 1)  # (L, E)
        coverage = self.coverage.sum(axis=1) / max(self.num_tokens, 1)  # (L, E+1)
        overall = self.overall_frequency()
        pools, e = max(len(self.pools), 1), self.num_experts
        ranges = {f: self.frequency_range(f) for f in FACTORS}
        for i, block in enumerate(self.layer_blocks):
            layer = {
                "block": int(block),
                "expert_load": _floats(load[i]),
                "selection_frequency": _floats(overall[i]),
                "load_max_over_mean": round(float(load[i].max() * self.num_experts), 6),
                "experts_per_token": round(float(overall[i].sum()), 6),
                "coverage": _floats(coverage[i]),
                "tokens_per_expert_per_pool": {"min": int(self.pool_expert_min[i]),
                                               "mean": round(float(self.total[i].sum()) / pools / e, 6),
                                               "max": int(self.pool_expert_max[i])},
                "experts_per_token_per_sample": {"min": round(float(self.sample_experts_min[i]), 6),
                                                 "mean": round(float(overall[i].sum()), 6),
                                                 "max": round(float(self.sample_experts_max[i]), 6)},
            }
            for factor in FACTORS:
                layer[f"{factor}_range"] = _floats(ranges[factor][i])
                layer[f"most_{factor}_specialised"] = self._most_specialised(factor, i)
            layers.append(layer)
        return {
            "routing": self.routing,
            "routing_pool": self.routing_pool,
            "routing_group_size": self.routing_group_size,
            "pools": len(self.pools),
            "pool_tokens": sorted({int(size) for size in self.pools}),
            "num_experts": self.num_experts,
            "num_classes": self.num_classes,
            "grid_size": self.grid_size,
            "num_steps": len(self.step_timesteps),
            "step_timesteps": _floats(self.step_timesteps),
            "tokens_per_layer": self.num_tokens,
            "tokens_by_class": [int(n) for n in self.tokens_by_class],
            "layers": layers,
        }

    def value_labels(self, factor: str) -> list[str]:
        """Names of the factor's values: class ids and "null", "row,col" patch positions, step indices."""
        if factor == "class":
            return [str(k) for k in range(self.num_classes)] + ["null"]
        if factor == "position":
            return [f"{p // self.grid_size},{p % self.grid_size}" for p in range(self.grid_size**2)]
        return [str(s) for s in range(len(self.step_timesteps))]

    def _factor(self, factor: str) -> tuple[np.ndarray, np.ndarray]:
        if factor == "class":
            return self.by_class, self.tokens_by_class
        if factor == "position":
            return self.by_position, self.tokens_by_position
        if factor == "step":
            return self.by_step, self.tokens_by_step
        raise ValueError(f"factor={factor!r} is not one of {FACTORS}")

    def _observed(self, factor: str) -> tuple[np.ndarray, list[str]]:
        """Frequencies (L, V', E) and labels of the values with tokens (the null label excluded)."""
        tokens = self._factor(factor)[1].copy()
        if factor == "class":
            tokens[self.num_classes] = 0
        keep = np.flatnonzero(tokens)
        labels = self.value_labels(factor)
        return self.frequency(factor)[:, keep], [labels[v] for v in keep]

    def _most_specialised(self, factor: str, layer: int) -> dict:
        """The expert whose frequency varies most over the factor, with where it is highest and lowest."""
        freq, labels = self._observed(factor)
        freq = freq[layer]  # (V', E)
        expert = int(np.argmax(freq.max(axis=0) - freq.min(axis=0)))
        hi, lo = int(np.argmax(freq[:, expert])), int(np.argmin(freq[:, expert]))
        return {
            "expert": expert,
            "highest": {factor: labels[hi], "frequency": round(float(freq[hi, expert]), 6)},
            "lowest": {factor: labels[lo], "frequency": round(float(freq[lo, expert]), 6)},
        }


def _floats(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


class RoutingRecorder(MoEHookRecorder):
    """Context manager counting a DiT's expert assignments; ``stats()`` returns a :class:`RoutingStats`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        cfg = self.config
        num_layers, k, e, t = len(self.layers), cfg.num_classes, cfg.num_experts, cfg.num_tokens
        device = model.pos_embed.device
        self._by_class = torch.zeros(num_layers, k + 1, e, dtype=torch.int64, device=device)
        self._by_position = torch.zeros(num_layers, t, e, dtype=torch.int64, device=device)
        self._total = torch.zeros(num_layers, e, dtype=torch.int64, device=device)
        self._tokens_by_class = torch.zeros(k + 1, dtype=torch.int64, device=device)
        self._tokens_by_position = torch.zeros(t, dtype=torch.int64, device=device)
        self._by_step: list[torch.Tensor] = []  # per step (L, E)
        self._coverage: list[torch.Tensor] = []  # per step (L, E+1)
        self._tokens_by_step: list[int] = []
        self._timesteps: list[float] = []
        self._step = 0
        self._labels: torch.Tensor | None = None  # (N,) labels of the current model call
        self._pools: list[int] = []  # tokens of every pool seen (recorded at the first layer)
        big = torch.iinfo(torch.int64).max
        self._pool_extremes = torch.tensor([[big, 0]] * num_layers, device=device)  # (L, 2) min, max
        self._sample_extremes = torch.tensor([[float("inf"), 0.0]] * num_layers, dtype=torch.float64, device=device)

    def start_run(self) -> None:
        """The next model call is step 0 of a new sampler run."""
        self._step = 0

    def _on_model_call(self, module, args, kwargs) -> None:
        call = self._signature.bind(*args, **kwargs).arguments
        t, y = call["t"], call["y"]
        t0 = float(t[0])
        if not bool((t == t[0]).all()):
            raise ValueError("a model call mixes timesteps; the recorder expects one sampler step per call")
        step = self._step
        if step == len(self._timesteps):
            num_layers, e = len(self.layers), self.config.num_experts
            self._by_step.append(self._total.new_zeros(num_layers, e))
            self._coverage.append(self._total.new_zeros(num_layers, e + 1))
            self._tokens_by_step.append(0)
            self._timesteps.append(t0)
        elif self._timesteps[step] != t0:
            raise ValueError(f"step {step} has timestep {t0:g} but {self._timesteps[step]:g} in the first run: "
                             "every run must use the same sampler and steps (call start_run() before each)")
        n, num_tokens = len(y), self.config.num_tokens
        self._labels = y
        self._tokens_by_class += torch.bincount(y, minlength=self.config.num_classes + 1) * num_tokens
        self._tokens_by_position += n
        self._tokens_by_step[step] += n * num_tokens
        self._step += 1

    def _on_routing(self, layer: int, module, routing, shape: tuple[int, int]) -> None:
        n, t = shape
        if self._labels is None or len(self._labels) != n or t != self.config.num_tokens:
            raise RuntimeError("MoE layer routed tokens outside a recorded DiT call")
        e, k = self.config.num_experts, self.config.num_classes
        token, expert = routing.token_index, routing.expert_index  # (A,) each
        label = self._labels[token // t]  # (A,)
        self._by_class[layer] += torch.bincount(label * e + expert, minlength=(k + 1) * e).view(k + 1, e)
        self._by_position[layer] += torch.bincount((token % t) * e + expert, minlength=t * e).view(t, e)
        per_expert = torch.bincount(expert, minlength=e)  # (E,)
        self._total[layer] += per_expert
        step = self._step - 1
        self._by_step[step][layer] += per_expert
        experts_per_token = torch.bincount(token, minlength=n * t)  # (N*T,)
        self._coverage[step][layer] += torch.bincount(experts_per_token, minlength=e + 1)
        self._record_pools(layer, token, expert, n, t)

    def _record_pools(self, layer: int, token: torch.Tensor, expert: torch.Tensor, n: int, t: int) -> None:
        """Tokens per expert in each routing pool, experts per token of each sample: their extremes so far."""
        e, cfg = self.config.num_experts, self.config
        sizes = pool_sizes(cfg.routing_pool, cfg.routing_group_size, n, t)
        if layer == 0:
            self._pools.extend(sizes)
        ends = torch.tensor(sizes, device=token.device).cumsum(0)  # (P,) end token of each pool
        pool = torch.bucketize(token, ends, right=True)  # (A,) pool of each assignment
        per_pool = torch.bincount(pool * e + expert, minlength=len(sizes) * e)  # (P*E,)
        per_sample = torch.bincount(token // t, minlength=n).double() / t  # (N,) mean experts per token
        for extremes, values in ((self._pool_extremes[layer], per_pool), (self._sample_extremes[layer], per_sample)):
            extremes[0] = torch.minimum(extremes[0], values.min())
            extremes[1] = torch.maximum(extremes[1], values.max())

    def stats(self) -> RoutingStats:
        """The counts so far, on the CPU."""
        if not self._timesteps:
            raise ValueError("no model call was recorded")
        cfg = self.config
        return RoutingStats(
            routing=cfg.routing,
            routing_pool=cfg.routing_pool,
            routing_group_size=cfg.routing_group_size,
            num_classes=cfg.num_classes,
            grid_size=cfg.input_size // cfg.patch_size,
            layer_blocks=np.array(self.layer_blocks, dtype=np.int64),
            step_timesteps=np.array(self._timesteps, dtype=np.float64),
            by_class=self._by_class.cpu().numpy(),
            by_position=self._by_position.cpu().numpy(),
            by_step=torch.stack(self._by_step, dim=1).cpu().numpy(),
            total=self._total.cpu().numpy(),
            coverage=torch.stack(self._coverage, dim=1).cpu().numpy(),
            tokens_by_class=self._tokens_by_class.cpu().numpy(),
            tokens_by_position=self._tokens_by_position.cpu().numpy(),
            tokens_by_step=np.array(self._tokens_by_step, dtype=np.int64),
            pools=np.array(self._pools, dtype=np.int64),
            pool_expert_min=self._pool_extremes[:, 0].cpu().numpy(),
            pool_expert_max=self._pool_extremes[:, 1].cpu().numpy(),
            sample_experts_min=self._sample_extremes[:, 0].cpu().numpy(),
            sample_experts_max=self._sample_extremes[:, 1].cpu().numpy(),
        )
