"""Regional compilation outside the blocks: the embedding, the head and the objective's loss arithmetic.

Each compiled region computes what the eager code does, forward and backward, and the loss arithmetic is
one graph shared by every objective of a kind: a process that builds many objectives (tests, benchmarks,
several trainers) compiles it once, not once per objective until dynamo's recompile limit stops it.
"""

import pytest
import torch

from ditmoe.diffusion import build_objective
from ditmoe.model import DiT, get_preset
from ditmoe.parallel.compile import apply_compile, compile_loss

OBJECTIVES = {"ddpm": {"learn_sigma": True}, "ddpm-fixed-sigma": {"learn_sigma": False}, "rectified_flow": {}}


def objective(name: str):
    return build_objective(name.removesuffix("-fixed-sigma"), **OBJECTIVES[name])


def loss_inputs(learn_sigma: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 2, 4, 4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    out = torch.randn(4, 4 if learn_sigma else 2, 4, 4, generator=gen).requires_grad_(True)
    return out, x0, noise, t


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.slow
def test_compiled_loss_terms_equal_eager_forward_and_backward(name):
    eager, compiled = objective(name), compile_loss(objective(name))
    out, x0, noise, t = loss_inputs(OBJECTIVES[name].get("learn_sigma", True))
    x_t = x0 + noise  # any point: loss_terms takes it as given
    t_in = t.float() / 1000 if name == "rectified_flow" else t  # flow time in (0, 1), DDPM step indices
    ref = eager.loss_terms(out, x0, x_t, noise, t_in)
    (grad_ref,) = torch.autograd.grad(ref["loss"].sum(), out)
    got = compiled.loss_terms(out, x0, x_t, noise, t_in)
    (grad,) = torch.autograd.grad(got["loss"].sum(), out)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_many_objectives_share_one_compiled_loss_graph():
    torch._dynamo.reset()
    out, x0, noise, t = loss_inputs(True)
    losses = []
    for _ in range(12):  # more than dynamo's recompile limit (8): one graph or a hard failure (fullgraph)
        diffusion = compile_loss(build_objective("ddpm"))
        diffusion.q_sample(x0, t, noise)  # the schedule tables on the device, as in training
        losses.append(diffusion.loss_terms(out, x0, x0 + noise, noise, t)["loss"])
    assert all(torch.equal(loss, losses[0]) for loss in losses)


@pytest.mark.slow
def test_compiled_embedding_and_head_equal_eager():
    torch.manual_seed(0)
    config = get_preset("tiny")
    eager = DiT(config)
    compiled = DiT(config)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled)
    assert list(dict(compiled.named_parameters())) == list(dict(eager.named_parameters()))  # names unchanged
    x = torch.randn(3, config.in_channels, config.input_size, config.input_size)
    t, y = torch.tensor([1, 10, 900]), torch.tensor([0, 1, 2])
    drop = torch.tensor([False, True, False])
    ref, got = eager(x, t, y, drop), compiled(x, t, y, drop)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
