"""The pure pieces of the step's accounting: ZeRO sized to the model, the FLOPs behind MFU, the phase profile."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from modeling.profiling import phase, phase_seconds
from trainer.config import TrainConfig
from trainer.flops import step_flops
from trainer.zero import CPU_BUCKET, DS_DEFAULT_PERSISTENCE, GPU_BUCKET, client_optimizer, ds_config, plan

GB = 2**30


def cfg(**ds) -> TrainConfig:
    c = TrainConfig()
    for k, v in ds.items():
        setattr(c.deepspeed, k, v)
    return c


def test_weights_that_fit_persist_and_large_ones_are_partitioned():
    p = plan(cfg(), n_params=135_000_000, largest=28_311_552, bytes_per=4, rank_bytes=11 * GB, cuda=False)
    assert p.persistence_threshold == 28_311_553 and "persists" in p.reason
    assert p.reduce_bucket_size == CPU_BUCKET
    big = plan(cfg(), n_params=8_000_000_000, largest=500_000_000, bytes_per=2, rank_bytes=40 * GB, cuda=True)
    assert big.persistence_threshold == DS_DEFAULT_PERSISTENCE and "partitioned" in big.reason
    assert big.reduce_bucket_size == GPU_BUCKET


def test_explicit_settings_win():
    p = plan(cfg(stage3_param_persistence_threshold=0, reduce_bucket_size=1000), n_params=10, largest=5,
             bytes_per=4, rank_bytes=GB, cuda=False)
    assert (p.persistence_threshold, p.reduce_bucket_size) == (0, 1000)
    z = ds_config(cfg(stage3_param_persistence_threshold=0), bf16=False, hidden=64, zero=p)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 0 and z["reduce_bucket_size"] == 1000


def test_gradient_communication_dtype_is_one_setting():
    assert "communication_data_type" not in ds_config(cfg(), bf16=True, hidden=64)
    assert ds_config(cfg(communication_dtype="bf16"), bf16=False, hidden=64)["communication_data_type"] == "bf16"


def test_fused_adamw_is_a_client_optimizer_unless_offloaded():
    c = cfg()
    assert client_optimizer(c) and "optimizer" not in ds_config(c, bf16=False, hidden=64)
    c = cfg(offload_optimizer=True)
    assert not client_optimizer(c) and ds_config(c, bf16=False, hidden=64)["optimizer"]["params"]["torch_adam"]


def test_flops_by_hand():
    # 10 params, 4 real tokens: 6 x 10 x 4 = 240; attention: 1 layer, width 2, lengths 1 and 3 -> 12 x 2 x (1 + 9)
    # = 240 for full attention, half for causal
    assert step_flops(10, 4, 1 + 9, 1, 2, causal=False) == 240 + 240
    assert step_flops(10, 4, 1 + 9, 1, 2, causal=True) == 240 + 120


def test_phases_split_compute_communication_and_copies():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with phase("forward"):
            y = (x @ w).relu()
            z = torch.cat([y, y]).sum()
        with phase("backward"):
            z.backward()
    got = phase_seconds(prof)
    assert got["forward"] > 0 and got["backward"] > 0
    assert got.get("forward.copies", 0) > 0  # the cat
    assert not any(k.startswith("unmarked") and v > 0.05 for k, v in got.items())


@pytest.mark.parametrize("threads", [1])
def test_measured_peak_is_plausible(threads):
    from trainer.flops import measure_peak_flops

    torch.set_num_threads(threads)
    peak = measure_peak_flops(torch.float32, torch.device("cpu"))
    assert 1e9 < peak < 1e13


def test_auto_stage_is_zero2_when_the_weights_fit_and_keeps_a_checkpoints_stage():
    # a CPU rank that holds all model states (135M x 16 bytes = 2.0 GB <= a quarter of 11 GB): plain data parallel
    cpu = plan(cfg(zero_stage="auto"), n_params=135_000_000, largest=28_311_552, bytes_per=4, rank_bytes=11 * GB,
               cuda=False)
    assert cpu.stage == 0 and "model states" in cpu.reason
    fit = plan(cfg(zero_stage="auto"), n_params=135_000_000, largest=28_311_552, bytes_per=4, rank_bytes=6 * GB,
               cuda=False)
    assert fit.stage == 2 and "auto" in fit.reason  # the weights fit, the states do not
    gpu = plan(cfg(zero_stage="auto"), n_params=135_000_000, largest=28_311_552, bytes_per=2, rank_bytes=11 * GB,
               cuda=True)
    assert gpu.stage == 2  # GPUs: not measured against ZeRO-0, ZeRO-2 stays
    assert ds_config(cfg(zero_stage="auto"), bf16=False, hidden=64, zero=fit)["zero_optimization"]["stage"] == 2
    big = plan(cfg(zero_stage="auto"), n_params=8_000_000_000, largest=500_000_000, bytes_per=2, rank_bytes=40 * GB,
               cuda=True)
    assert big.stage == 3 and big.persistence_threshold == DS_DEFAULT_PERSISTENCE
    resumed = plan(cfg(zero_stage="auto"), n_params=135_000_000, largest=28_311_552, bytes_per=4, rank_bytes=11 * GB,
                   cuda=False, resumed_stage=3)
    assert resumed.stage == 3 and "checkpoint" in resumed.reason
    # without a model to size (reference JSONs), auto is the conservative ZeRO-3
    assert ds_config(cfg(zero_stage="auto"), bf16=True, hidden=64)["zero_optimization"]["stage"] == 3
