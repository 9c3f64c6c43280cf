"""apply_cpu_patches: a no-op when CUDA is reported available, idempotent otherwise.

Each case runs in a fresh interpreter: the patches are process-wide and must not leak into
the test process (or be hidden by an earlier test having applied them).
"""

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_no_op_when_cuda_is_available():
    out = run_python("""
        import sys, torch
        torch.cuda.is_available = lambda: True
        originals = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize)
        from megatron_ntp.compat.cpu import apply_cpu_patches, cpu_patches_applied
        assert apply_cpu_patches() is False
        assert not cpu_patches_applied()
        assert (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize) == originals
        assert "megatron.core" not in sys.modules  # not even imported
        from torch.overrides import _get_current_function_mode_stack
        assert not _get_current_function_mode_stack()
        print("untouched")
    """)
    assert "untouched" in out


def test_patches_applied_once_without_cuda_and_rng_tracker_on_cpu():
    out = run_python("""
        import torch
        from megatron_ntp.compat.cpu import apply_cpu_patches
        assert apply_cpu_patches() is True
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer.moe import token_dispatcher
        from torch.overrides import _get_current_function_mode_stack
        state = (torch.cuda.current_device, mrandom.CudaRNGStatesTracker,
                 token_dispatcher.maybe_move_tensor_to_cpu)
        assert apply_cpu_patches() is True
        assert state == (torch.cuda.current_device, mrandom.CudaRNGStatesTracker,
                         token_dispatcher.maybe_move_tensor_to_cpu)
        assert len(_get_current_function_mode_stack()) == 1  # the cuda->cpu mode, entered once
        assert torch.cuda.current_device() == "cpu"
        # hard-coded device="cuda" and .cuda() land on the CPU; type names answer as CUDA's
        x = torch.zeros(2, device="cuda")
        assert x.device.type == "cpu" and x.cuda() is x and x.to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor" and x.type(torch.float64).dtype == torch.float64
        # split sizes reach gloo as numpy
        import numpy
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
        assert isinstance(splits, numpy.ndarray)
        # the RNG tracker forks the CPU generator
        mrandom.initialize_rng_tracker(force_reset=True)
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("a", 7)
        torch.manual_seed(0)
        outside = torch.get_rng_state()
        with tracker.fork("a"):
            first = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
        with tracker.fork("a"):
            second = torch.rand(3)
        assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(7)))
        assert not torch.equal(first, second)  # the forked state advances
        print("patched")
    """)
    assert "patched" in out


def test_no_op_in_process_with_monkeypatched_cuda(monkeypatch):
    import torch
    from torch.overrides import _get_current_function_mode_stack

    from megatron_ntp.compat import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "_applied", False)  # as in a fresh GPU process
    before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.Event,
              len(_get_current_function_mode_stack()))
    assert cpu.apply_cpu_patches() is False and not cpu.cpu_patches_applied()
    assert before == (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.Event,
                      len(_get_current_function_mode_stack()))


# The group is destroyed at exit, before the interpreter is torn down, as the project's
# parallel_session does: a gloo group left to interpreter finalization can abort the process
# ("terminate called without an active exception", rc -6) after the checks have passed.
EXACT_NORM_SETUP = """
    import atexit, math, tempfile, torch
    torch.distributed.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"file://{tempfile.mktemp()}")
    atexit.register(torch.distributed.destroy_process_group)
    from megatron_ntp.compat import cpu
    from megatron.core.optimizer import clip_grads, optimizer
    grads = [torch.randn(8192, 128, generator=torch.Generator().manual_seed(0)) * 1e-3,
             torch.randn(300, generator=torch.Generator().manual_seed(1)) * 1e-3]
    exact = math.sqrt(sum(g.double().square().sum().item() for g in grads))
"""


def test_exact_grad_norm_replaces_the_float32_fallback_norm():
    out = run_python(EXACT_NORM_SETUP + """
    cpu.apply_cpu_patches()
    original = clip_grads.get_grad_norm_fp32
    biased = original(grads)
    assert abs(biased / exact - 1) > 1e-6, (biased, exact)  # the float32 fallback errs low
    assert cpu.megatron_uses_local_l2_norm() and cpu.apply_exact_grad_norm()
    norm = clip_grads.get_grad_norm_fp32(grads)
    assert isinstance(norm, float) and abs(norm / exact - 1) < 1e-14, (norm, exact)
    # the optimizers (plain, distributed, chained for MoE) call it through optimizer.py's name
    assert optimizer.get_grad_norm_fp32 is clip_grads.get_grad_norm_fp32
    assert cpu.apply_exact_grad_norm() and optimizer.get_grad_norm_fp32(grads) == norm
    # the inf-norm goes to megatron-core's own code; an empty list is a zero norm
    inf_norm = clip_grads.get_grad_norm_fp32(grads, norm_type=float("inf"))
    assert inf_norm == original(grads, norm_type=float("inf"))
    assert clip_grads.get_grad_norm_fp32([]) == 0.0
    print("exact")
    """)
    assert "exact" in out


def test_exact_grad_norm_follows_the_fused_norm_not_cuda():
    # with a fused norm (Transformer Engine or apex) megatron-core's is kept; a GPU without
    # either gets the exact norm, although the CPU patches are off there
    out = run_python(EXACT_NORM_SETUP + """
    local_l2_norm = clip_grads.l2_norm_impl
    clip_grads.l2_norm_impl = lambda *args: None  # as if Transformer Engine's were imported
    before = (clip_grads.get_grad_norm_fp32, optimizer.get_grad_norm_fp32)
    assert not cpu.megatron_uses_local_l2_norm() and cpu.apply_exact_grad_norm() is False
    assert before == (clip_grads.get_grad_norm_fp32, optimizer.get_grad_norm_fp32)
    clip_grads.l2_norm_impl = local_l2_norm
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: "cpu"  # where this machine keeps the norm's sum
    assert cpu.apply_cpu_patches() is False
    assert cpu.apply_exact_grad_norm() is True
    assert abs(clip_grads.get_grad_norm_fp32(grads) / exact - 1) < 1e-14
    print("fused norm untouched, exact without it")
    """)
    assert "exact without it" in out
