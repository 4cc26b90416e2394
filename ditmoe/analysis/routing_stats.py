"""Count which experts every token is routed to while a DiT-MoE samples (paper §3.3).

:class:`RoutingRecorder` attaches to a :class:`~ditmoe.model.DiT`: a forward pre-hook reads each
model call's timesteps ``t`` and labels ``y`` (the null label ``K`` marks the unconditional half of
a classifier-free-guidance batch), and a routing hook on every MoE layer counts each (token, expert)
assignment by class, by patch position and by sampling step. The k-th model call after
:meth:`RoutingRecorder.start_run` is sampling step k, so call it before each sampler run.

Frequencies are assignments / tokens seen: for top-k token choice every token makes k assignments;
under expert choice a token gets 0..E experts, which ``coverage`` counts.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .hooks import MoEHookRecorder

FACTORS = ("class", "position", "step")


@dataclass
class RoutingStats:
    """Assignment and token counts of one analysis, as numpy arrays (L MoE layers, E experts)."""

    routing: str  # "token_choice" or "expert_choice"
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
        ranges = {f: self.frequency_range(f) for f in FACTORS}
        for i, block in enumerate(self.layer_blocks):
            layer = {
                "block": int(block),
                "expert_load": _floats(load[i]),
                "selection_frequency": _floats(overall[i]),
                "load_max_over_mean": round(float(load[i].max() * self.num_experts), 6),
                "experts_per_token": round(float(overall[i].sum()), 6),
                "coverage": _floats(coverage[i]),
            }
            for factor in FACTORS:
                layer[f"{factor}_range"] = _floats(ranges[factor][i])
                layer[f"most_{factor}_specialised"] = self._most_specialised(factor, i)
            layers.append(layer)
        return {
            "routing": self.routing,
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

    def stats(self) -> RoutingStats:
        """The counts so far, on the CPU."""
        if not self._timesteps:
            raise ValueError("no model call was recorded")
        cfg = self.config
        return RoutingStats(
            routing=cfg.routing,
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
        )
