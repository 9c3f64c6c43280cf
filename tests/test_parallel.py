"""megatron_ntp.parallel on a faked GPU: the GPU a rank binds to when Slurm gives each task one
GPU, the configurable collective timeout, and megatron-core's torch-Adam checkpoint fixes on a
GPU without Apex or Transformer Engine."""

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from megatron_ntp import parallel
from megatron_ntp.config import load_config, validate_config


@pytest.fixture
def fake_nccl_join(monkeypatch):
    """torch.distributed and torch.cuda calls of init_process_group, recorded."""
    calls = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.update(device=index))
    return calls


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (8, 3, 3), (4, 6, 2)])
def test_rank_binds_a_visible_gpu(fake_nccl_join, monkeypatch, visible, local_rank, expected):
    """Slurm with --gpus-per-task=1 shows each task one GPU (index 0) whatever its LOCAL_RANK."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    parallel.init_process_group("nccl", rank=local_rank, world_size=8)
    assert fake_nccl_join["device"] == expected


def test_timeout_comes_from_the_config(fake_nccl_join, monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kwargs: None)
    monkeypatch.setattr(parallel, "set_seed", lambda seed: None)
    config = validate_config(load_config(None, ["parallel.distributed_timeout_minutes=45"]))
    parallel.initialize_parallel_from_config(config, backend="gloo", rank=0, world_size=1)
    assert fake_nccl_join["timeout"] == datetime.timedelta(minutes=45)
    default = validate_config(load_config(None, []))
    parallel.initialize_parallel_from_config(default, backend="gloo", rank=0, world_size=1)
    assert fake_nccl_join["timeout"] == datetime.timedelta(minutes=60)  # the default


def _group_timeouts(rank, world_size, out):
    """Every process group megatron-core keeps in parallel_state, with its timeout as the
    group's backend holds it."""
    from megatron.core import parallel_state

    parallel.initialize_parallel(tensor=2, expert=2, timeout_minutes=7)
    timeouts = {f"{group.group_desc} {index}":
                group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for index, group in enumerate(parallel.megatron_core_groups())}
    parallel_state.destroy_model_parallel()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(timeouts, f)


def test_every_megatron_core_group_gets_the_configured_timeout(tmp_path):
    """parallel.distributed_timeout_minutes reaches the groups initialize_model_parallel
    creates (it has its own default, 30 minutes, unless given one)."""
    from tests.distributed import run_distributed

    run_distributed(2, _group_timeouts, str(tmp_path / "timeouts.json"))
    with open(tmp_path / "timeouts.json") as f:
        timeouts = json.load(f)
    assert len(timeouts) >= 8, timeouts  # tensor, pipeline, data, expert, embedding, gloo ...
    assert any("EXPERT_DATA_PARALLEL_GROUP_GLOO" in name for name in timeouts), timeouts
    assert {name: t for name, t in timeouts.items() if t != 7 * 60.0} == {}


def test_torch_adam_checkpoint_fixes_apply_on_a_gpu_without_apex_or_te():
    """A GPU run without Apex/TE uses torch's Adam inside the distributed optimizer, like CPU:
    the optimizer-state fixes must be in place there too (a fresh process: this one has the
    CPU patches applied already)."""
    script = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron.core import parallel_state
        from megatron.core.optimizer import distrib_optimizer
        from megatron_ntp import parallel
        parallel.init_process_group = lambda *args, **kwargs: None
        parallel_state.initialize_model_parallel = lambda **kwargs: None
        parallel.set_seed = lambda seed: None
        assert not distrib_optimizer.HAVE_APEX_OR_TE
        original = distrib_optimizer.DistributedOptimizer.load_state_dict
        parallel.initialize_parallel()
        patched = distrib_optimizer.DistributedOptimizer.load_state_dict
        assert patched is not original, "torch-Adam fixes not applied with CUDA present"
        assert "torch_adam" in patched.__qualname__, patched.__qualname__
        from megatron_ntp.compat.cpu import cpu_patches_applied
        assert not cpu_patches_applied()  # the CUDA-to-CPU patches stay off on a GPU
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=os.getcwd())
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
