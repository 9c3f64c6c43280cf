"""Every parallel layout gives the per-step losses of the single-rank run on the same global
batch, from the same initial weights (float32, tiny models, 3 steps).

Two spawns serve all tests: one rank runs the references, two ranks run every layout in turn
(tests/training/runs.py). The loss is the full shaped loss (beta, top-k and both lambdas set),
so the distributed top-k and the per-token normalisation over micro-batches and data-parallel
ranks are on the path. Step 0 is held to float32 noise (3e-6) and the reported gradient norm to
the float64 norm of the gathered gradients (1e-7); later steps to 5e-5 (see LATER_RTOL).
"""

import json

import pytest

from tests.distributed import run_distributed
from tests.training.runs import run_cases

STEPS = 3
COMPARED = ("loss", "ce", "entropy", "topk_mass", "grad_norm", "tokens")
# Step 0 (same weights, same batch): layouts differ only in float32 summation order.
STEP0_RTOL = 3e-6
# Later steps: Adam's first update is about lr * sign(g) for every gradient element, so the
# rounding in near-zero gradients (which differs between layouts) becomes a full-size update.
LATER_RTOL = 5e-5
# megatron-core's norm (exact in float64 here, compat/cpu.py) against the float64 norm of the
# gathered gradients; and the TP=2 norms against the single rank's.
GRAD_NORM_ATOL = 1e-7


def base_overrides(prefix, tokenizer, preset="tiny-dense"):
    return [
        f"model.preset={preset}", "model.vocab_size=1024", "model.num_layers=4",
        f"data.blend={prefix}", f"data.tokenizer_model={tokenizer}", "data.seq_length=32",
        # no loss after end-of-document tokens: micro-batches and data-parallel ranks then hold
        # different numbers of loss tokens, which per-token normalisation must see through
        "data.split=98,2,0", "data.eod_mask_loss=true",
        "loss.beta=-0.25", "loss.topk=4", "loss.lambda_topk=0.05", "loss.lambda_tail=-0.1",
        "train.global_batch_tokens=256", "train.micro_batch_size=2", f"train.steps={STEPS}",
        "train.lr=3e-3", "train.lr_warmup_steps=1", "train.lr_decay_steps=1",
        "logging.tensorboard=false",
    ]


DENSE_LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "tp2_sp_selective": ["parallel.tensor=2", "parallel.sequence_parallel=true",
                         "parallel.recompute=selective"],
    "tp2_sp_fused": ["parallel.tensor=2", "parallel.sequence_parallel=true",
                     "model.fused_output_loss=true"],
    "pp2_full_recompute": ["parallel.pipeline=2", "parallel.recompute=full"],
    "pp2_interleaved": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "dp2_distributed_optimizer": ["parallel.distributed_optimizer=true"],
    # one sequence per micro-batch: 8 micro-batches of unequal token counts; only the global
    # per-token normalisation makes this equal to the reference's 4 micro-batches of 2
    "dp2_micro_batch_1": ["train.micro_batch_size=1"],
}
MOE_LAYOUTS = {
    "ep2": ["parallel.expert=2"],
    "ep2_tp2_sp": ["parallel.expert=2", "parallel.tensor=2", "parallel.sequence_parallel=true"],
    "moe_pp2": ["parallel.pipeline=2"],
}
# bf16 weights and activations (Float16Module, fp32 master weights): close, not equal
BF16_LAYOUT = ["parallel.tensor=2", "model.bf16=true"]
SCHEDULE = ["loss.beta=0", "loss.topk=0", "loss.lambda_topk=0", "loss.lambda_tail=0",
            "train.loss_schedule={beta: {start: 0.0, end: -0.25, begin_step: 1, end_step: 2}}"]


@pytest.fixture(scope="module")
def results(sample_data, tmp_path_factory):
    prefix, tokenizer = sample_data
    out = tmp_path_factory.mktemp("layout_runs")
    dense_weights, moe_weights = str(out / "dense.pt"), str(out / "moe.pt")
    dense, moe = base_overrides(prefix, tokenizer), base_overrides(prefix, tokenizer, "tiny-moe")

    def run_dir(name):
        return [f"logging.run_dir={out / name}"]

    references = [
        ("dense_reference", dense + run_dir("dense_reference"), dense_weights),
        ("moe_reference", moe + run_dir("moe_reference"), moe_weights),
        ("schedule", dense + SCHEDULE + run_dir("schedule"), str(out / "unused.pt")),
    ]
    run_distributed(1, run_cases, references, str(out))
    layouts = [(name, dense + extra + run_dir(name), dense_weights)
               for name, extra in DENSE_LAYOUTS.items()]
    layouts += [(name, moe + extra + run_dir(name), moe_weights)
                for name, extra in MOE_LAYOUTS.items()]
    layouts.append(("tp2_bf16", dense + BF16_LAYOUT + run_dir("tp2_bf16"), dense_weights))
    run_distributed(2, run_cases, layouts, str(out))

    def load(name):
        with open(out / f"{name}.json") as f:
            return json.load(f)

    return {name: load(name) for name in
            ["dense_reference", "moe_reference", "schedule", "tp2_bf16", *DENSE_LAYOUTS,
             *MOE_LAYOUTS]}


def assert_same_step(got, want, keys, rtol):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=0), \
            (got["step"], key, got[key], want[key])


def assert_same_steps(records, reference, keys=COMPARED):
    assert len(records) == len(reference) == STEPS
    assert_same_step(records[0], reference[0], keys, STEP0_RTOL)
    for got, want in zip(records[1:], reference[1:]):
        assert_same_step(got, want, keys, LATER_RTOL)


@pytest.mark.parametrize("layout", sorted(DENSE_LAYOUTS))
def test_dense_layout_matches_single_rank(results, layout):
    assert_same_steps(results[layout], results["dense_reference"])


@pytest.mark.parametrize("layout", sorted(MOE_LAYOUTS))
def test_moe_layout_matches_single_rank(results, layout):
    assert_same_steps(results[layout], results["moe_reference"], COMPARED + ("moe_lb_loss",))
    assert all(r["moe_lb_loss"] > 0 for r in results[layout])


def test_step0_grad_norm_is_the_float64_norm_of_the_gathered_gradients(results):
    # every run but the distributed optimizer's records the norm of its gathered main_grads
    checked = [name for name, records in results.items()
               if "gathered_grad_norm_float64" in records[0]]
    assert len(checked) == len(results) - 1, sorted(set(results) - set(checked))
    for name in checked:
        step0 = results[name][0]
        assert abs(step0["grad_norm"] - step0["gathered_grad_norm_float64"]) <= GRAD_NORM_ATOL, \
            (name, step0["grad_norm"], step0["gathered_grad_norm_float64"])


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp_selective", "tp2_sp_fused"])
def test_tensor_parallel_grad_norm_equals_single_rank_at_step_0(results, layout):
    got, want = results[layout][0]["grad_norm"], results["dense_reference"][0]["grad_norm"]
    assert abs(got - want) <= GRAD_NORM_ATOL, (got, want)


def test_bf16_tracks_the_float32_run(results):
    for got, want in zip(results["tp2_bf16"], results["dense_reference"], strict=True):
        for key in ("loss", "ce", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-2), (got["step"], key)


def test_reference_learns_and_reports_the_shaped_loss(results):
    records = results["dense_reference"]
    assert records[-1]["ce"] < records[0]["ce"]
    assert all(r["loss"] != pytest.approx(r["ce"], rel=1e-3) for r in records)
    assert all(0 < r["topk_mass"] < 1 and r["entropy"] > 0 for r in records)
    assert all(200 < r["tokens"] <= 256 for r in records)
    assert any(r["tokens"] < 256 for r in records)  # the end-of-document mask is in effect


def test_loss_schedule_takes_effect(results):
    before, *after = results["schedule"]
    assert [r["step"] for r in results["schedule"]] == [1, 2, 3]
    # beta = 0 (cross-entropy) at step 1, -0.25 from step 2 (the schedule's steps are the
    # records' steps, 1..train.steps): the surrogate leaves the ce
    assert before["beta"] == 0.0 and before["loss"] == pytest.approx(before["ce"], rel=1e-6)
    for record in after:
        assert record["beta"] == -0.25
        assert record["loss"] - record["ce"] > 1e-4  # w_x > 1 for beta < 0
