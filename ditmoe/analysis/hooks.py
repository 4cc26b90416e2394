"""Recording what a DiT's MoE layers do during sampling: the hooks both routing recorders share."""

import inspect
from functools import partial

import torch


class MoEHookRecorder:
    """Context manager that calls ``self._on_model_call(module, args, kwargs)`` before every model call and
    ``self._on_routing(layer_index, ...)`` at every MoE layer's routing, until it exits."""

    def __init__(self, model: torch.nn.Module):
        self.layers = model.moe_layers()
        if not self.layers:
            raise ValueError("the model has no MoE layers (num_experts=0): no routing to analyse")
        for layer in self.layers:
            if not hasattr(layer, "register_routing_hook"):
                raise TypeError(f"{type(layer).__name__} has no register_routing_hook (only MoEFeedForward layers)")
        self.model, self.config = model, model.config
        self._signature = inspect.signature(model.forward)  # binds a call's arguments to x, t, y, ...
        self.layer_blocks = [i for i in range(self.config.depth) if self.config.moe_in_block(i)]
        self._handles = []

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_routing_hook(partial(self._on_routing, i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
