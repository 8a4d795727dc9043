"""MasterAdamW (trainer/master_weights.py) in one process: the update of fp32 AdamW on fp32 weights fed the same
gradients, clipping as torch's, the bf16 weights the rounded masters, an exact state-dict round trip, and a
non-finite gradient skipping the step. The 2-rank reduction is in test_grad_equivalence.py."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.master_weights import MasterAdamW


def bf16_and_fp32(seed: int = 0):
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    low = copy.deepcopy(ref).to(torch.bfloat16)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the same starting values
    return low, ref


def set_grads(low, ref, step: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(100 + step)
    for p, q in zip(low.parameters(), ref.parameters()):
        grad = (torch.randn(p.shape, generator=g) * scale).to(torch.bfloat16)
        p.grad = grad
        q.grad = grad.to(q.dtype)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_steps_equal_fp32_adamw_on_the_same_gradients(max_norm):
    low, ref = bf16_and_fp32()
    opt = MasterAdamW(low.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, max_norm=max_norm)
    want = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(4):
        set_grads(low, ref, step, scale=3.0)  # norms ~30: clipping is active at max_norm=1
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm if max_norm else float("inf"))
        opt.step()
        want.step()
        assert opt._global_grad_norm.item() == pytest.approx(norm.item(), rel=1e-6)
        assert not opt.overflow
    for m, p, q in zip(opt.masters, low.parameters(), ref.parameters()):
        assert torch.allclose(m, q, rtol=1e-6, atol=1e-7)  # fp32 round-off: the masters are the fp32 run's weights
        assert torch.equal(p, m.to(torch.bfloat16))  # the model's weights are the masters rounded
        assert not torch.equal(m, p.float())  # and the masters hold what bf16 cannot


def test_state_dict_round_trip_continues_exactly():
    low, _ = bf16_and_fp32()
    opt = MasterAdamW(low.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, max_norm=1.0)
    for step in range(2):
        set_grads(low, low, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    low2 = copy.deepcopy(low)
    for p in low2.parameters():  # a restart: the module's bf16 weights come back, the masters from the state
        p.data.add_(1.0)
    opt2 = MasterAdamW(low2.parameters(), lr=5.0, betas=(0.9, 0.99), weight_decay=0.0, max_norm=1.0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2)
    for step in range(2, 4):
        set_grads(low, low, step)
        set_grads(low2, low2, step)
        opt.step()
        opt2.step()
    for a, b in zip(opt.masters, opt2.masters):
        assert torch.equal(a, b)
    for p, q in zip(low.parameters(), low2.parameters()):
        assert torch.equal(p, q)


def test_non_finite_gradient_skips_the_step():
    low, _ = bf16_and_fp32()
    opt = MasterAdamW(low.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, max_norm=1.0)
    before = [p.detach().clone() for p in low.parameters()]
    set_grads(low, low, 0)
    next(low.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.overflow
    assert all(torch.equal(a, p) for a, p in zip(before, low.parameters()))
    assert not opt.inner.state  # Adam's moments untouched: nothing of the bad step is remembered


def test_missing_gradient_counts_as_zero_and_lr_follows_the_scheduler():
    low, _ = bf16_and_fp32()
    opt = MasterAdamW(low.parameters(), lr=1.0, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    set_grads(low, low, 0)
    first = next(low.parameters())
    first.grad = None
    w = first.detach().clone()
    opt.step()
    sched.step()
    assert torch.equal(first, w)  # a zero gradient and no weight decay: unchanged
    assert opt.param_groups[0]["lr"] == 0.5
    set_grads(low, low, 1)
    opt.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5
