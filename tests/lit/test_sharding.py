"""ldm.lit.sharding in one process (a 1-rank gloo group): the mixed-precision policy on every FSDP unit, each unit
compiled before it is sharded, and the start-up refusals of what Lightning's ModelParallelStrategy refuses."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from ldm.errors import ConfigError
from ldm.lit import sharding


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.inner(x))


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@pytest.fixture(scope="module")
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def test_every_unit_and_the_root_get_the_policy_of_the_trainer_precision(mesh):
    net = Net()
    sharding.shard_module(net, mesh, ["Block"], sharding.mixed_precision_policy("bf16-mixed"))
    policies = sharding.unit_policies(net)
    assert sorted(policies) == ["", "blocks.0", "blocks.1"]
    assert {(p.param_dtype, p.reduce_dtype) for p in policies.values()} == {(torch.bfloat16, torch.float32)}
    # The sharded master weights stay fp32; compute runs in bf16.
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net(torch.randn(3, 8)).dtype == torch.bfloat16
    fp32 = sharding.mixed_precision_policy("32-true")
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)
    assert sharding.mixed_precision_policy("bf16-true").reduce_dtype == torch.float32


@pytest.mark.slow  # inductor compiles the block on the CPU
def test_units_are_compiled_before_they_are_sharded_and_train_like_the_plain_model(mesh, monkeypatch):
    from torch.distributed import fsdp

    events: list[tuple[str, str]] = []
    shard, compile_ = fsdp.fully_shard, nn.Module.compile

    def spy_shard(module, **kwargs):
        events.append(("shard", type(module).__name__))
        return shard(module, **kwargs)

    def spy_compile(module, **kwargs):
        events.append(("compile", type(module).__name__))
        return compile_(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", spy_shard)
    monkeypatch.setattr(nn.Module, "compile", spy_compile)
    torch.manual_seed(0)
    plain, net = Net(), Net()
    net.load_state_dict(plain.state_dict())
    sharding.shard_module(net, mesh, ["Block"], compile_mode="default")
    assert events == [("compile", "Block"), ("compile", "Block"), ("shard", "Block"), ("shard", "Block"), ("shard", "Net")]
    assert all(block._compiled_call_impl is not None and sharding.is_sharded(block) for block in net.blocks)
    x = torch.randn(4, 8)
    net(x).square().mean().backward()  # runs the compiled blocks (inductor on the CPU) between FSDP's hooks
    plain(x).square().mean().backward()
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        torch.testing.assert_close(sharding.local(p.grad), q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_nested_unit_is_sharded_before_the_unit_holding_it_and_compiled_only_with_it(mesh):
    class Outer(Block):
        def __init__(self) -> None:
            super().__init__(8)
            self.nested = Block(8)

    net = nn.Sequential(Outer())
    sharding.shard_module(net, mesh, ["Outer", "Block"], compile_mode="default")
    assert net[0]._compiled_call_impl is not None and net[0].nested._compiled_call_impl is None
    assert sorted(sharding.unit_policies(net)) == ["", "0", "0.nested"]


@pytest.mark.parametrize("precision", ["16-mixed", 16])
def test_fp16_mixed_precision_under_fsdp_is_refused_at_start_up_with_the_fix(precision):
    trainer = OmegaConf.create({"precision": precision, "strategy": {"_target_": "ldm.lit.sharding.FullyShardedStrategy"}})
    with pytest.raises(ConfigError, match="bf16-mixed.*trainer=ddp"):
        sharding.check_trainer(trainer)


def test_fsdp1_on_the_cpu_and_a_sharded_checkpoint_without_fsdp_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer=fsdp_sim"):
        sharding.check_trainer(OmegaConf.create({"accelerator": "cpu", "strategy": "fsdp"}))
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    (folder / "meta.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="distributed .*trainer=fsdp"):
        sharding.check_trainer(OmegaConf.create({"accelerator": "cpu", "strategy": "ddp"}), str(folder))
    sharding.check_trainer(OmegaConf.create({"precision": "bf16-mixed", "strategy": {
        "_target_": "ldm.lit.sharding.FullyShardedStrategy"}}), str(folder))
