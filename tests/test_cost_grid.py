"""The cost model's ZeRO on grids (pipelines: stage 1; tensor parallelism x data parallelism: 1 and 2) and
PowerSGD's matrix products, against hand computations. Serial, pure."""

import pytest
from cost_helpers import linear_link, profile_of, vit_like

from mpipar.cost import Layout, Machine, plan, predict_data_parallel, predict_run
from mpipar.cost.compress import powersgd_flops, powersgd_seconds
from mpipar.cost.model import predict_pipeline
from mpipar.cost.options import ASSUMED_MATMUL_FLOPS, TrainingOptions
from mpipar.cost.plan import format_plan
from mpipar.cost.sharded import predict_sharded
from mpipar.cost.tensor import predict_tensor_grid
from mpipar.pipeline.config import PipelineConfig
from mpipar.tensor_parallel.strategy import TensorParallelConfig

ADAMW = TrainingOptions(optimizer="adamw")


def vit_machine(alpha=0.01):
    """A vision transformer's profile unsplit and split over 2: embed (1000 B), 2 blocks, head (1000 B)."""
    models = {"vit": vit_like("vit", 4.0, 4000), "vit/tp2": vit_like("vit/tp2", 2.0, 2000)}
    return Machine(linear_link(alpha, 0.0, "shared memory"), None, models, 4, 4)


# --- PowerSGD's matrix products ----------------------------------------------------------------------------------


def test_powersgd_flops_by_hand():
    # 64 x 64 at rank 4: M Q = 2*64*64*4; QR of P = 4*64*4^2 and Q = M^T P = 2*64*64*4; P Q^T = 2*64*64*4.
    # A 3 x 3 x 3 x 3 conv weight is a 3 x 27 matrix, rank 2 -> r=2: (3+27)*2 < 81 compressed; vectors and a
    # 2 x 2 matrix ((2+2)*2 >= 4) are sent whole and cost nothing
    assert powersgd_flops([(64, 64), (64,), (2, 2)], 4) == (32768, 4096 + 32768, 32768)
    assert powersgd_flops([(3, 3, 3, 3)], 2) == (2 * 3 * 27 * 2, 4 * 3 * 4 + 2 * 3 * 27 * 2, 2 * 3 * 27 * 2)
    machine = Machine(linear_link(0.0, 0.0), None, {}, 1, 1, matmul_flops=1e6)
    assert powersgd_seconds(machine, [(64, 64)], 4) == ((0.032768, 0.036864, 0.032768), "")
    seconds, note = powersgd_seconds(Machine(linear_link(0.0, 0.0), None, {}, 1, 1), [(64, 64)], 4)
    assert seconds[0] == pytest.approx(32768 / ASSUMED_MATMUL_FLOPS) and "not calibrated" in note


def test_powersgd_products_lengthen_the_step_after_the_backward():
    a, b = 1e-3, 1e-8
    profile = profile_of([(1.0, 2.0, [64 * 64 * 4, 64 * 4], 10, 100, [(64, 64), (64,)])])

    def allreduce(n):  # 2 ranks, binomial: the whole buffer up and down
        return 2 * (a + b * n)

    options = TrainingOptions(powersgd_rank=4)
    slow = Machine(linear_link(a, b), None, {"toy": profile}, 4, 4, matmul_flops=1e6)
    p = predict_data_parallel(profile, 8, Layout(2, 2), slow, options=options)
    # backward ends at 3 s; the bias's bucket (256 B) ends at 3 + allreduce(256), hidden behind M Q (0.032768 s):
    # the three products are compute, the two Allreduces of P and Q (64 x 4 fp32 each) exposed
    products = (32768 + 36864 + 32768) / 1e6
    assert p.compute == pytest.approx(3.0 + products)
    assert p.exposed_comm == pytest.approx(2 * allreduce(1024))
    assert p.step == pytest.approx(3.0 + products + 2 * allreduce(1024))
    assert "not calibrated" not in p.why()
    # a fast core: M Q (32.8 us) runs beside the bias's Allreduce (2 ms), which hides that much of it; the
    # other two products follow the P Allreduce
    fast = Machine(linear_link(a, b), None, {"toy": profile}, 4, 4, matmul_flops=1e9)
    q = predict_data_parallel(profile, 8, Layout(2, 2), fast, options=options)
    assert q.compute == pytest.approx(3.0 + products / 1e3)
    assert q.exposed_comm == pytest.approx(allreduce(256) - 32768 / 1e9 + 2 * allreduce(1024))
    assert q.step == pytest.approx(3.0 + allreduce(256) + 2 * allreduce(1024) + (36864 + 32768) / 1e9)
    # without a measured rate: the assumed one, said
    assumed = predict_data_parallel(profile, 8, Layout(2, 2), Machine(linear_link(a, b), None, {"toy": profile}, 4, 4),
                                    options=options)
    assert "PowerSGD products at 5 GFLOP/s (not calibrated)" in assumed.why()
    # one rank sends nothing but still compresses (the reducer builds its PowerSGDSum at any size)
    alone = predict_data_parallel(profile, 8, Layout(1, 1), slow, options=options)
    assert alone.step == pytest.approx(3.0 + products) and alone.exposed_comm == 0


# --- ZeRO-1 on pipeline grids --------------------------------------------------------------------------------------


def test_pipeline_zero1_shards_the_state_and_all_gathers_each_stage():
    a, b = 1e-3, 1e-8
    profile = profile_of([(1.0, 2.0, [404], 10, 100)] * 2, sizes=(2,))
    machine = Machine(linear_link(a, b), None, {"toy": profile}, 6, 6)
    layout = Layout(6, 6, pp=2)  # 3 replicas of 2 stages, one node
    plain = predict_pipeline(profile, 8, layout, machine, microbatches=4, schedule="gpipe")
    zero = predict_pipeline(profile, 8, layout, machine, microbatches=4, schedule="gpipe", zero=1)
    # each stage: 101 elements over 3 replicas -> shards of 34 (136 B), the buffer padded to 408 B; a ring
    # all-gather of 3 ranks: 2 rounds of one shard
    gather = 2 * (a + b * 136)
    assert zero.gathers == pytest.approx(gather)
    assert zero.step == pytest.approx(plain.step + gather)
    assert zero.exposed_comm == pytest.approx(plain.exposed_comm + gather)
    assert zero.compute == plain.compute and zero.bubble == plain.bubble
    # SGD: parameters 404 -> 408 (padded), gradients 404, momentum 404 -> 136
    assert plain.memory_bytes - zero.memory_bytes == (404 + 404 + 404) - (408 + 404 + 136)
    assert zero.label == "PP x DP ZeRO-1" and "all-gather" in zero.why()
    # AdamW: 808 B of state per stage -> 272
    adam0 = predict_pipeline(profile, 8, layout, machine, microbatches=4, schedule="gpipe", options=ADAMW)
    adam1 = predict_pipeline(profile, 8, layout, machine, microbatches=4, schedule="gpipe", options=ADAMW, zero=1)
    assert adam0.memory_bytes - adam1.memory_bytes == (404 + 404 + 808) - (408 + 404 + 272)
    # one replica: nothing to shard over, the same prediction
    single = Layout(2, 2, pp=2)
    assert predict_pipeline(profile, 8, single, machine, microbatches=4, zero=1) == predict_pipeline(
        profile, 8, single, machine, microbatches=4)
    with pytest.raises(ValueError, match="--zero 1"):
        predict_pipeline(profile, 8, layout, machine, microbatches=4, zero=2)


def test_predict_run_prices_a_pipeline_with_zero1():
    profile = profile_of([(1.0, 2.0, [400], 10, 100)] * 2, sizes=(2,))
    machine = Machine(linear_link(1e-3, 1e-8), None, {"toy": profile}, 4, 4)
    settings = PipelineConfig(schedule="gpipe", microbatches=4, stages=2, balance="even", zero=1)
    p, why = predict_run(machine, model="toy", batch_size=8, bucket_mb=25, settings=settings, ranks=4,
                         ranks_per_node=4)
    assert why == "" and p.variant == "ZeRO-1" and p.step == pytest.approx(
        predict_pipeline(profile, 8, Layout(4, 4, pp=2), machine, microbatches=4, schedule="gpipe", zero=1).step)


# --- ZeRO-1 and 2 on tensor-parallel x data-parallel grids -------------------------------------------------------


def test_tensor_grid_zero1_and_zero2_by_hand():
    machine = vit_machine(alpha=0.01)
    layout = Layout(4, 4, tp=2)  # 2 replicas of tp 2; the rank holds 1000 + 2 x 2000 + 1000 = 6000 B (1500 elements)
    plain = predict_tensor_grid(machine, "vit", 8, layout)
    one = predict_tensor_grid(machine, "vit", 8, layout, zero=1)
    two = predict_tensor_grid(machine, "vit", 8, layout, zero=2)
    # all-gather of the rank's 6000 B over 2 replicas: one round of alpha (beta 0)
    assert one.gathers == pytest.approx(0.01) and two.gathers == pytest.approx(0.01)
    assert one.step == pytest.approx(plain.step + 0.01) and one.compute == plain.compute
    assert one.tp_comm == plain.tp_comm and one.label == "TP x DP ZeRO-1"
    # ZeRO-2: one reduce-scatter (one round, 0.01 s) at the end of the backward instead of the Allreduce, two
    # flag Allreduces (binomial over 2: up and down, 0.02 s each), the all-gather
    assert two.exposed_comm == pytest.approx(two.tp_comm + 0.01 + 2 * 0.02 + 0.01)
    assert two.compute == pytest.approx(plain.compute) and two.step == pytest.approx(two.compute + two.exposed_comm)
    assert "replicas' reduce-scatter" in two.why() and "all-gather" in two.why()
    # memory per rank, SGD, + 2 blocks x 10 B saved: DP 3 x 6000; ZeRO-1 momentum / 2; ZeRO-2 gradients and
    # momentum / 2 between steps, the flat gradient buffer whole within the step (transient)
    assert plain.memory_bytes == 3 * 6000 + 20
    assert one.memory_bytes == 6000 + 6000 + 3000 + 20
    assert two.memory_bytes == 6000 + 3000 + 3000 + 6000 + 20
    adam = predict_tensor_grid(machine, "vit", 8, layout, zero=1, options=ADAMW)
    assert adam.memory_bytes == 6000 + 6000 + 6000 + 20
    with pytest.raises(ValueError, match="--zero 1 or 2"):
        predict_tensor_grid(machine, "vit", 8, layout, zero=3)
    with pytest.raises(ValueError, match="ZeRO-3 over dp x 1 x 1"):
        predict_sharded(machine.profile("vit/tp2"), 8, layout, machine, zero=3)
    # one replica: the stage changes nothing
    alone = Layout(2, 2, tp=2)
    assert predict_tensor_grid(machine, "vit", 8, alone, zero=2) == predict_tensor_grid(machine, "vit", 8, alone)
    p, why = predict_run(machine, model="vit", batch_size=8, bucket_mb=25, settings=TensorParallelConfig(tp=2, zero=2),
                         ranks=4, ranks_per_node=4)
    assert why == "" and p.step == pytest.approx(two.step) and p.variant == "ZeRO-2"


# --- mpipar-plan ----------------------------------------------------------------------------------------------------


def test_plan_grows_zero_rows_where_the_stage_composes_with_the_grid():
    machine = vit_machine()
    labels = sorted((row.prediction.label, row.prediction.layout.shape)
                    for row in plan(machine, "vit", 8, 4, 4, zero_stages=(1, 2, 3)))
    assert labels == [("DP", "4 x 1 x 1"), ("TP x DP", "2 x 1 x 2"), ("TP x DP ZeRO-1", "2 x 1 x 2"),
                      ("TP x DP ZeRO-2", "2 x 1 x 2")]
    profile = profile_of([(1.0, 2.0, [400], 10, 100)] * 2, sizes=(2, 8))
    toy = Machine(linear_link(1e-3, 1e-8), None, {"toy": profile}, 4, 4)
    rows = plan(toy, "toy", 8, 4, 4, zero_stages=(1, 2, 3))
    labels = sorted((row.prediction.label, row.prediction.layout.shape) for row in rows)
    assert labels == [("DP", "4 x 1 x 1"), ("PP x DP", "2 x 2 x 1"), ("PP x DP ZeRO-1", "2 x 2 x 1"),
                      ("ZeRO-1", "4 x 1 x 1"), ("ZeRO-2", "4 x 1 x 1"), ("ZeRO-3", "4 x 1 x 1")]
    assert "PP x DP ZeRO-1" in format_plan(rows, model="toy", batch_size=8, ranks=4, ranks_per_node=4)
    assert {row.prediction.label for row in plan(toy, "toy", 8, 4, 4)} == {"DP", "PP x DP"}


def test_the_16_bit_wire_reduce_scatter_pays_its_casts():
    a, r = 1e-3, 1e-9
    profile = profile_of([(2.0, 3.0, [4000], 10, 100)])
    machine = Machine(linear_link(a, 0.0), None, {"toy": profile}, 4, 4, reduce_seconds_per_byte=r)
    fp32 = predict_sharded(profile, 8, Layout(2, 2), machine, zero=2)
    wire = predict_sharded(profile, 8, Layout(2, 2), machine, zero=2, options=TrainingOptions(grad_wire="bf16"))
    # 2 ranks, 4000 B: the fp32 reduce-scatter is one round (a) and the sum of 2000 B (r x 2000); the wire's
    # all-to-all one round (a), the same sum, and two casts of the 4000 B (to 16 bits, the chunks received back)
    assert wire.step - fp32.step == pytest.approx(r * 2 * 4000)
