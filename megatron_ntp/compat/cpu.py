"""Every CPU workaround for megatron-core 0.19.x, in one place.

megatron-core assumes CUDA: it calls torch.cuda.* unconditionally, hard-codes device="cuda",
asserts tensor type names such as 'torch.cuda.FloatTensor', and hands tensors to collectives
that NCCL accepts but gloo rejects. `apply_cpu_patches()` makes the code paths this project
uses (GPTModel with the local spec, TP/PP/EP/SP, MoE dispatchers, pipeline schedules, DDP and
the distributed optimizer) run on CPU torch with gloo. Each patch names the megatron-core
function it answers and is kept as narrow as the call site allows.

The patches are applied only when CUDA is absent; on a GPU machine `apply_cpu_patches()` does
nothing, so the GPU path is megatron-core unmodified. One exception: the distributed optimizer's
checkpoint fixes for torch's Adam (`apply_torch_adam_patches()`) answer the absence of Apex and
Transformer Engine, not of CUDA, so they apply on a GPU without those too. Nothing else in the project should know
about these patches: call `apply_cpu_patches()` (megatron_ntp.parallel does) before building a
model and forget about it.

One workaround has a different condition: `apply_exact_grad_norm()` replaces megatron-core's
float32 fallback gradient norm wherever megatron-core found no fused norm (no Transformer Engine,
no apex), which is every CPU run and also a GPU without those packages. megatron_ntp.parallel
calls it beside `apply_cpu_patches()`.
"""

import collections
import contextlib
import math

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_torch_adam_applied = False


def cpu_patches_applied() -> bool:
    """True once `apply_cpu_patches()` has patched this process."""
    return _applied


def apply_cpu_patches() -> bool:
    """Patch megatron-core (and torch.cuda) for CPU-only torch; idempotent.

    Returns True when the patches are active in this process, False when CUDA is available
    (then nothing is touched, not even an import of megatron-core).
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    _patch_torch_cuda_queries()
    _patch_streams_and_events()
    _patch_rng_tracker()
    _patch_torch_norm_for_sequence_parallel()
    _patch_alltoall_split_sizes()
    _patch_uneven_first_dim_collectives()
    _patch_batched_p2p_for_gloo()
    apply_torch_adam_patches()
    _enter_cuda_to_cpu_mode()
    _applied = True
    return True


# ---------------------------------------------------------------------------------------------
# torch.cuda.current_device / synchronize
# ---------------------------------------------------------------------------------------------
def _patch_torch_cuda_queries():
    # About 130 megatron-core sites allocate with `device=torch.cuda.current_device()`
    # (e.g. utils.GlobalMemoryBuffer.get_tensor used by DotProductAttention,
    # tensor_parallel/mappings.py _gather_along_first_dim, distributed/param_and_grad_buffer.py).
    # A device string works wherever an index would, so answer "cpu".
    torch.cuda.current_device = lambda: "cpu"
    # pipeline_parallel/schedules.py, optimizer/distrib_optimizer.py and the MoE dispatchers
    # synchronize around timers and DtoH copies; there is nothing to wait for on CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None


# ---------------------------------------------------------------------------------------------
# Streams and events
# ---------------------------------------------------------------------------------------------
class _FakeEvent:
    """Stands in for torch.cuda.Event: CPU work is already ordered, so every wait is a no-op."""

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


class _FakeStream:
    """Stands in for torch.cuda.Stream (one stream: the CPU executes in program order)."""

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _FakeEvent()

    def synchronize(self):
        pass


def _patch_streams_and_events():
    # transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.__init__ creates
    # torch.cuda.Stream() and records events around its DtoH copies of split sizes;
    # pipeline_parallel/schedules.py and distributed/ use current_stream()/stream(...).
    stream = _FakeStream()
    torch.cuda.Stream = lambda *args, **kwargs: stream
    torch.cuda.current_stream = lambda *args, **kwargs: stream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.Event = lambda *args, **kwargs: _FakeEvent()


# ---------------------------------------------------------------------------------------------
# RNG tracker and recomputation RNG state on the CPU generator
# ---------------------------------------------------------------------------------------------
def _patch_rng_tracker():
    # tensor_parallel/random.py: CudaRNGStatesTracker.add() seeds and reads the CUDA generator
    # (torch.cuda.get_rng_state), and fork() swaps CUDA generator states. On CPU the generator
    # that dropout and CPU initialisation draw from is the CPU default generator, so the tracker
    # keeps CPU generator states instead. initialize_rng_tracker() (called by
    # model_parallel_cuda_manual_seed) instantiates the module-level name CudaRNGStatesTracker,
    # so rebinding that name installs the CPU tracker for every later seed call.
    from megatron.core.tensor_parallel import random as mcore_random

    cuda_tracker_cls = mcore_random.CudaRNGStatesTracker
    default_name = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME

    class CPURNGStatesTracker(cuda_tracker_cls):
        """CudaRNGStatesTracker with the same API, forking the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=default_name):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    mcore_random.CudaRNGStatesTracker = CPURNGStatesTracker

    # Activation recomputation (tensor_parallel/random.py CheckpointFunction for
    # recompute=full, CheckpointWithoutOutput for selective) saves and restores the device RNG
    # state through _get_all_rng_states/_set_all_rng_states, which call these two helpers
    # (torch.cuda.random.get_rng_state / _C._cuda_setRNGState). On CPU the device generator is
    # the CPU generator, so they read and write that.
    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = _get_cuda_rng_state
    mcore_random._set_cuda_rng_state = _set_cuda_rng_state
    # A tracker created before the patch (e.g. by an earlier import-time call) is replaced too.
    mcore_random.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------------------------------------
# Sequence parallelism with the torch norm of the local spec
# ---------------------------------------------------------------------------------------------
def _patch_torch_norm_for_sequence_parallel():
    # transformer/torch_norm.py WrappedTorchNorm.__new__ asserts `not config.sequence_parallel`
    # because torch's norm does not tag its weights. The norm itself is the same with SP (it
    # normalises each token independently); what SP needs is that its weight gradients, computed
    # on a sequence shard, are summed over the TP group. distributed/finalize_model_grads.py
    # _allreduce_layernorm_grads does that for parameters with `sequence_parallel = True`, which
    # is what Apex/TE norms set. So: build with SP off, then tag the parameters.
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new_with_sequence_parallel(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new_with_sequence_parallel


# ---------------------------------------------------------------------------------------------
# Alltoall MoE dispatcher: split sizes for gloo
# ---------------------------------------------------------------------------------------------
def _patch_alltoall_split_sizes():
    # transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.preprocess passes its split
    # sizes through moe_utils.maybe_move_tensor_to_cpu(as_numpy=True), which converts only CUDA
    # tensors. On CPU a torch tensor then reaches dist.all_to_all_single(input_split_sizes=...),
    # which gloo rejects (TypeError): convert CPU tensors to numpy too when asked for numpy.
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ---------------------------------------------------------------------------------------------
# Uneven all-gather / reduce-scatter along the first dimension on gloo
# ---------------------------------------------------------------------------------------------
def _patch_uneven_first_dim_collectives():
    # tensor_parallel/mappings.py _gather_along_first_dim / _reduce_scatter_along_first_dim with
    # output/input_split_sizes (used by the alltoall dispatcher when the expert-TP group has more
    # than one rank) call all_gather / reduce_scatter on differently sized tensors; gloo supports
    # neither. Only the uneven case is rerouted: pad to the largest split and all-gather, or
    # all-reduce the whole tensor and keep this rank's slice. The even case is untouched.
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = [torch.empty_like(padded) for _ in range(group.size())]
        torch.distributed.all_gather(gathered, padded, group=group)
        return torch.cat([g[:n] for g, n in zip(gathered, output_split_sizes)], dim=0)

    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        summed = input_.clone().contiguous()
        torch.distributed.all_reduce(summed, group=group)
        return torch.split(summed, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


# ---------------------------------------------------------------------------------------------
# Pipeline point-to-point: batched isend/irecv on gloo
# ---------------------------------------------------------------------------------------------
def _patch_batched_p2p_for_gloo():
    # pipeline_parallel/p2p_communication.py _batched_p2p_ops (batch_p2p_comm=True, the default)
    # posts [send_prev, recv_prev, send_next, recv_next] in that order on every rank. gloo has
    # no batching: each isend/irecv matches the peer's in posting order (same group, tag 0). With
    # the interleaved schedule at pipeline size 2 the previous and next rank are the same peer,
    # so an activation sent "next" is received as a gradient "prev" and vice versa: the
    # measured loss was off from the first step (tests/training/test_layouts.py). _p2p_ops,
    # megatron-core's unbatched path, orders the operations by even/odd rank and, for a group of
    # two, sends the two directions on different communicators, which gloo matches correctly.
    # It returns a dict of requests; the batched caller expects a list and waits on all of them.
    from megatron.core.pipeline_parallel import p2p_communication

    unbatched = p2p_communication._p2p_ops

    def _batched_p2p_ops(**kwargs):
        return list(unbatched(**kwargs).values())

    p2p_communication._batched_p2p_ops = _batched_p2p_ops


# ---------------------------------------------------------------------------------------------
# Distributed-optimizer checkpoints with torch's Adam (no Apex / Transformer Engine)
# ---------------------------------------------------------------------------------------------
def apply_torch_adam_patches() -> bool:
    """Patch DistributedOptimizer's checkpoint code for torch's Adam; idempotent. Applies
    wherever megatron-core falls back to torch's Adam (no Apex, no Transformer Engine): on CPU,
    and on a GPU without either. Returns True when the patches are active."""
    global _torch_adam_applied
    if not _torch_adam_applied:
        _torch_adam_applied = _patch_distributed_optimizer_checkpoint_for_torch_adam()
    return _torch_adam_applied


def _patch_distributed_optimizer_checkpoint_for_torch_adam() -> bool:
    # Without Apex or TE (always the case on CPU, possible on GPU) optimizer/distrib_optimizer.py
    # wraps torch's Adam, which keeps a per-parameter 'step' tensor in its state; three places of
    # DistributedOptimizer's checkpoint code get it wrong (each found by saving a distributed-
    # optimizer checkpoint at TP=2 and loading it at TP=1 and TP=2):
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    cls = distrib_optimizer.DistributedOptimizer
    original_state_dict = cls.state_dict
    original_load_state_dict = cls.load_state_dict
    original_set_states = cls._set_main_param_and_optimizer_states

    # 1. state_dict() reads s["step"] of every state entry and asserts one common value. Before
    #    the first optimizer step (a checkpoint being loaded into a fresh optimizer, which calls
    #    sharded_state_dict(is_loading=True) -> state_dict()) the state is empty and the assert
    #    fails. Fill empty entries with what torch Adam's first step would create (step 0, zero
    #    moments); the loaded checkpoint overwrites them.
    def state_dict(self):
        adam = self.optimizer
        if isinstance(adam, torch.optim.Adam):
            for group in adam.param_groups:
                for param in group["params"]:
                    if not adam.state[param]:
                        adam.state[param] = {"step": torch.tensor(0.0),
                                             "exp_avg": torch.zeros_like(param),
                                             "exp_avg_sq": torch.zeros_like(param)}
        return original_state_dict(self)

    # 2. load_state_dict() hands ONE step tensor to every parameter's state
    #    (`s["step"] = step` in its non-Apex/TE branch); torch Adam increments each parameter's
    #    step in place, so after a resume the shared tensor advances N times per optimizer step
    #    and the bias correction (hence training) silently diverges. Give each parameter its own.
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    # 3. _set_main_param_and_optimizer_states() (fully_reshardable load) copies every tensor of
    #    a parameter's optimizer state from the loaded tensors, which carry no 'step' (it comes
    #    from the param groups) -> KeyError. Missing entries are skipped, as non-tensors are.
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        return original_set_states(self, model_param, collections.defaultdict(lambda: None,
                                                                              tensors))

    cls.state_dict = state_dict
    cls.load_state_dict = load_state_dict
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    return True


# ---------------------------------------------------------------------------------------------
# Exact gradient norm where megatron-core has no fused norm (CPU, or a GPU without TE/apex)
# ---------------------------------------------------------------------------------------------
# Unlike the patches above, this one is needed on a GPU too: its condition is not "no CUDA" but
# "megatron-core fell back to its local norm", which it does whenever neither Transformer Engine
# nor apex is installed. megatron_ntp.parallel applies it on every rank; it is idempotent.
_SQUARES_CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of at most 128 MiB per gradient chunk


def megatron_uses_local_l2_norm() -> bool:
    """True when optimizer/clip_grads.py found neither Transformer Engine's nor apex's fused
    multi-tensor L2 norm and uses utils.local_multi_tensor_l2_norm instead."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    return clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm


def apply_exact_grad_norm() -> bool:
    """Give megatron-core an exact (float64) gradient 2-norm where it has no fused norm.

    local_multi_tensor_l2_norm takes a float32 torch.norm per tensor, which on CPU errs low by
    ~1e-5 relative on a 1M-element gradient and more on larger ones; get_grad_norm_fp32 then
    squares it and sums the ranks' squares in float32. The clip factor and the logged grad_norm
    inherit the bias, and since a tensor-parallel shard is smaller than the full tensor, layouts
    disagree by more than their gradients do. Replaces get_grad_norm_fp32 (2-norm only; other
    norms go to the original) in clip_grads and in the modules that import it by name
    (optimizer.py: every optimizer, ChainedOptimizer for MoE, the per-group norms;
    layer_wise_optimizer.py; distrib_optimizer inherits from optimizer.py). Returns True when
    applied, False when megatron-core has a fused norm (then nothing is touched).
    """
    from megatron.core.optimizer import clip_grads, layer_wise_optimizer, optimizer

    if not megatron_uses_local_l2_norm():
        return False
    if getattr(clip_grads.get_grad_norm_fp32, "exact_float64", False):
        return True
    exact = _exact_get_grad_norm_fp32(clip_grads.get_grad_norm_fp32)
    for module in (clip_grads, optimizer, layer_wise_optimizer):
        module.get_grad_norm_fp32 = exact
    return True


def _sum_of_squares_float64(grad: torch.Tensor) -> torch.Tensor:
    """sum(grad**2) accumulated in float64, chunked so that the float64 copy stays small
    (an output layer's gradient can have ~1e9 elements); shape [] on grad's device."""
    chunks = grad.reshape(-1).split(_SQUARES_CHUNK_ELEMENTS)
    return torch.stack([chunk.to(torch.float64).square().sum() for chunk in chunks]).sum()


def _exact_get_grad_norm_fp32(original):
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        if float(norm_type) != 2.0:
            return original(grads_for_norm, norm_type, grad_stats_parallel_group)
        if isinstance(grads_for_norm, torch.Tensor):
            grads_for_norm = [grads_for_norm]
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        squares = torch.zeros(1, dtype=torch.float64, device=device)
        data_parallel_group = None  # set for FSDP's DTensor gradients, as in the original
        for grad in grads_for_norm:
            data_parallel_group = get_data_parallel_group_if_dtensor(grad, data_parallel_group)
            squares += _sum_of_squares_float64(to_local_if_dtensor(grad))
        if data_parallel_group:
            torch.distributed.all_reduce(squares, group=data_parallel_group)
        torch.distributed.all_reduce(squares, group=grad_stats_parallel_group)
        # a Python float, as the original returns without Transformer Engine
        return math.sqrt(squares.item())

    get_grad_norm_fp32.exact_float64 = True
    return get_grad_norm_fp32


# ---------------------------------------------------------------------------------------------
# Hard-coded device="cuda", .cuda(), and tensor type names
# ---------------------------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while it is active.

    Answers about 60 hard-coded `device="cuda"` / `.cuda()` sites, e.g.
    pipeline_parallel/schedules.py forward_backward_no_pipelining
    (torch.zeros([], dtype=torch.int, device="cuda")), optimizer/clip_grads.py
    (torch.tensor([0.0], device="cuda")), distributed/param_and_grad_buffer.py.
    Costs a Python call per torch function (measured ~3.5% of a tiny model's step).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts
            # grad.type() == 'torch.cuda.FloatTensor'; optimizer/optimizer.py
            # Float16OptimizerWithFloat16Params and optimizer/distrib_optimizer.py branch on
            # 'torch.cuda.{Half,BFloat16,Float}Tensor' and raise on anything else. Only the
            # no-argument form (the type-name query) is answered with the CUDA name.
            name = func(*args)
            if name.startswith("torch.cuda."):
                return name
            return name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _enter_cuda_to_cpu_mode():
    # Entered once and never exited: the hard-coded sites are spread over the whole training
    # step (schedules, DDP buffers, optimizer), so a scoped context would have to wrap the
    # caller's entire program anyway.
    _CudaToCpuMode().__enter__()
