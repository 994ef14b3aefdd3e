"""The cost model's ZeRO stages, precision, gradient wire, PowerSGD and recompute against hand computations,
and the memory it predicts against what ``ShardedDataParallel`` holds."""

import pytest
import torch
from cost_helpers import MiB, linear_link, machine_of, profile_of
from torch import nn

from mpi_helpers import assert_all_ranks
from mpipar.cost import Layout, Machine, interconnect, predict_data_parallel
from mpipar.cost.allreduce import collective_rounds, collective_seconds
from mpipar.cost.compress import allreduce_bytes_sent, powersgd_bytes, powersgd_split, wire16_bytes_sent
from mpipar.cost.memory import GiB, activation_memory, shard_bytes, state_memory
from mpipar.cost.model import predict_pipeline
from mpipar.cost.options import ASSUMED_MATMUL_FLOPS, TrainingOptions, compute_ratio
from mpipar.cost.plan import main, memory_by_stage, parse_compress, parse_zero, plan, verdicts
from mpipar.cost.sharded import predict_sharded

SGD, ADAMW = TrainingOptions(), TrainingOptions(optimizer="adamw")


# --- collectives, wire and PowerSGD bytes -----------------------------------------------------------------------


def test_reduce_scatter_allgather_and_alltoall_rounds_by_hand():
    a, b, n = 1e-3, 1e-9, 4000.0
    link = linear_link(a, b)
    one_node = [0, 0, 0, 0]
    assert collective_seconds("reduce_scatter", n, one_node, link, reduce_seconds_per_byte=1e-8) == pytest.approx(
        3 * (a + b * n / 4) + 3 * 1e-8 * n / 4)
    assert collective_seconds("allgather", n, one_node, link, reduce_seconds_per_byte=1e-8) == pytest.approx(
        3 * (a + b * n / 4))
    assert collective_seconds("alltoall", n, one_node, link) == pytest.approx(3 * (a + b * n / 4))
    # 2 nodes x 2 ranks: the ring crosses each node's link once a round; the all-to-all's middle round
    # (distance 2) sends both ranks' chunks across at once, so the node's link carries two
    free, slow = linear_link(0.0, 0.0), linear_link(a, b)
    two_nodes = [0, 0, 1, 1]
    assert collective_seconds("allgather", n, two_nodes, free, slow) == pytest.approx(3 * (a + b * n / 4))
    assert [flows for _, _, flows, _ in collective_rounds("alltoall", tuple(two_nodes))] == [1, 2, 1]
    assert collective_seconds("alltoall", n, two_nodes, free, slow) == pytest.approx(
        2 * (a + b * n / 4) + (a + b * 2 * n / 4))
    assert collective_seconds("reduce_scatter", n, [0], link) == 0.0
    with pytest.raises(ValueError, match="--interconnect"):
        collective_seconds("allgather", n, two_nodes, link)
    with pytest.raises(ValueError, match="unknown collective"):
        collective_rounds("broadcast", (0, 0))


def test_the_16_bit_wire_sends_half_the_bytes_of_the_ring():
    assert wire16_bytes_sent(10, 3) == 2 * 2 * 4 * 2  # 2 (p-1) chunks of ceil(10/3) = 4 elements, 2 bytes each
    for elements, ranks in ((12, 3), (1024, 4), (6, 2)):
        assert wire16_bytes_sent(elements, ranks) == allreduce_bytes_sent(4 * elements, ranks) / 2
    assert wire16_bytes_sent(100, 1) == allreduce_bytes_sent(400, 1) == 0


def test_powersgd_bytes_are_n_plus_m_times_r_per_matrix():
    # (8, 4) rank 2: (8 + 4) 2 = 24 < 32 compressed; a vector and a (2, 2) matrix (8 >= 4) go whole
    assert powersgd_split([(8, 4), (4,), (2, 2)], 2) == (16, 8, 8)
    assert powersgd_bytes([(8, 4), (4,), (2, 2)], 2) == (4 * 32, 4 * 40)
    # a convolution is out x (in k k): 16 x 9 at rank 4, (16 + 9) 4 = 100 < 144
    assert powersgd_split([(16, 1, 3, 3)], 4) == (64, 36, 0)
    assert powersgd_split([(16, 1, 3, 3)], 100) == (0, 0, 144)  # r = min(100, 16, 9) = 9: 225 >= 144
    with pytest.raises(ValueError, match="rank must be >= 1"):
        powersgd_split([(4, 4)], 0)


# --- memory ------------------------------------------------------------------------------------------------------


def test_state_memory_per_zero_stage_by_hand():
    units = [400, 800, 1200]  # 100, 200, 300 fp32 elements
    assert state_memory(units, 4, 0, SGD).total == 3 * 2400
    assert state_memory(units, 4, 0, ADAMW).total == 4 * 2400  # 16 bytes a parameter
    one = state_memory(units, 4, 1, ADAMW)
    assert (one.params, one.grads, one.optimizer, one.transient) == (2400, 2400, 2 * 600, 0)
    two = state_memory(units, 4, 2, SGD)
    assert (two.params, two.grads, two.optimizer, two.transient) == (2400, 600, 600, 2400)
    three = state_memory(units, 4, 3, ADAMW)
    # shards 100 + 200 + 300; gathered: units 1 and 2 (2000) and the largest unit's gradients twice
    assert (three.params, three.grads, three.optimizer, three.transient) == (600, 600, 1200, 2000 + 2 * 1200)
    assert state_memory(units, 1, 3, SGD).total == 3 * 2400  # one rank: nothing gathered
    assert shard_bytes(12, 2) == 8 and shard_bytes(12, 4) == 4 and shard_bytes(12, 8) == 4  # padded elements
    assert state_memory([12], 8, 1, SGD).params == 32  # the flat buffer padded to 8 elements
    with pytest.raises(ValueError, match="ZeRO stage must be 0-3"):
        state_memory(units, 4, 4, SGD)


def test_activation_memory_with_recompute_and_16_bits():
    layers = profile_of([(1, 1, [4], 10, 100), (1, 1, [4], 20, 200), (1, 1, [4], 30, 300)]).layers[8]
    assert activation_memory(layers, SGD) == 600
    assert activation_memory(layers, SGD, in_flight=2) == 1200
    full = TrainingOptions(recompute="full")
    assert activation_memory(layers, full) == 10 + 20 + 300  # the layers' inputs, one layer's saved tensors
    assert activation_memory(layers, full, in_flight=2, input_bytes=5) == 2 * (5 + 10 + 20) + 300
    assert activation_memory(layers, TrainingOptions(precision="bf16")) == 300  # assumed: half


# --- step times --------------------------------------------------------------------------------------------------


def test_recompute_adds_one_forward_and_precision_scales_compute():
    profile = profile_of([(1.0, 2.0, [400], 10, 100)] * 3)
    layout = Layout(1, 1)
    machine = machine_of(profile)
    assert predict_data_parallel(profile, 8, layout, machine).step == pytest.approx(9.0)
    recompute = predict_data_parallel(profile, 8, layout, machine, options=TrainingOptions(recompute="full"))
    assert recompute.step == pytest.approx(12.0) and recompute.memory_bytes == 3 * 1200 + 20 + 100
    bf16 = TrainingOptions(precision="bf16")
    assumed = predict_data_parallel(profile, 8, layout, machine, options=bf16)
    assert assumed.step == pytest.approx(9.0) and "bf16 compute as fast as fp32 (not calibrated)" in assumed.why()
    measured = predict_data_parallel(profile, 8, layout, machine_of(profile, compute_ratio={"bf16": 0.5}),
                                     options=bf16)
    assert measured.step == pytest.approx(4.5) and "not calibrated" not in measured.why()
    assert compute_ratio({"bf16": 0.5}, "fp16") == (1.0, False) and compute_ratio({}, "fp32") == (1.0, True)


def test_the_16_bit_wire_is_an_alltoall_during_backward_and_an_allgather_after():
    a, b, r = 1e-3, 1e-8, 1e-9
    profile = profile_of([(1.0, 2.0, [4000], 10, 100)])
    machine = machine_of(profile, linear_link(a, b, "shared memory"), reduce_seconds_per_byte=r)
    layout = Layout(2, 2)
    fp32 = predict_data_parallel(profile, 8, layout, machine)
    assert fp32.exposed_comm == pytest.approx(2 * (a + b * 4000) + r * 4000)  # binomial: up (adding in), down
    wire = predict_data_parallel(profile, 8, layout, machine, options=TrainingOptions(grad_wire="bf16"))
    chunk = 500  # 1000 elements over 2 ranks; the wire buffer 2 x 500 x 2 bytes
    # casts, a pass each at r per fp32 byte: to 16 bits and the received chunks back (2 x 2 x 500), the summed
    # chunk to 16 bits (500); after the Allgather the bucket back to fp32 (2 x 500)
    casts = r * 4 * (2 * 2 * chunk + chunk) + r * 4 * 2 * chunk
    assert wire.exposed_comm == pytest.approx((a + b * 2 * chunk) + r * chunk * 4 + (a + b * 2 * chunk) + casts)
    assert wire.variant == "bf16 wire" and wire.compute == fp32.compute


def test_powersgd_sends_p_and_q_after_the_backward_and_vectors_in_buckets():
    a, b = 1e-3, 1e-8
    profile = profile_of([(1.0, 2.0, [64 * 64 * 4, 64 * 4], 10, 100, [(64, 64), (64,)])])
    machine = machine_of(profile, linear_link(a, b, "shared memory"))
    p = predict_data_parallel(profile, 8, Layout(2, 2), machine, options=TrainingOptions(powersgd_rank=4))

    def allreduce(n):  # 2 ranks, binomial: the whole buffer up and down
        return 2 * (a + b * n)

    # the bias (256 bytes) from its bucket at the end of the backward, then P (64 x 4) and Q (64 x 4); M Q
    # (2 x 64 x 64 x 4 operations at the assumed rate) runs beside the bias's Allreduce: that much is hidden
    hidden = 2 * 64 * 64 * 4 / ASSUMED_MATMUL_FLOPS
    assert p.exposed_comm == pytest.approx(allreduce(256) - hidden + 2 * allreduce(64 * 4 * 4))
    assert p.variant == "powersgd:4"
    with pytest.raises(ValueError, match="no parameter shapes .*mpipar-calibrate again"):
        predict_data_parallel(profile_of([(1.0, 2.0, [400], 10, 100)]), 8, Layout(2, 2), machine_of(
            profile_of([(1.0, 2.0, [400], 10, 100)])), options=TrainingOptions(powersgd_rank=4))


def test_pipeline_recompute_keeps_only_each_microbatch_input():
    profile = profile_of([(1.0, 2.0, [400], 10, 100)] * 2, sizes=(2,))
    machine = machine_of(profile)
    layout = Layout(2, 2, pp=2)
    plain = predict_pipeline(profile, 8, layout, machine, microbatches=4, schedule="gpipe")
    full = predict_pipeline(profile, 8, layout, machine, microbatches=4, schedule="gpipe",
                            options=TrainingOptions(recompute="full"))
    # GPipe: 4 micro-batches in flight on stage 0; stage 1 keeps its input (stage 0's output, 10 bytes each)
    assert plain.memory_bytes == 3 * 400 + 4 * 100
    assert full.memory_bytes == 3 * 400 + 4 * 10 + 100
    assert full.compute == pytest.approx(plain.compute + 4 * 1.0)  # each micro-batch's forward again


def test_zero_steps_by_hand():
    a = 1.0  # every message costs alpha alone: a gather, a reduce-scatter and a binomial level 1 s each
    profile = profile_of([(2.0, 3.0, [400], 10, 100)] * 2)
    machine = machine_of(profile, linear_link(a, 0.0, "shared memory"))
    layout = Layout(2, 2)
    dp = predict_data_parallel(profile, 8, layout, machine)
    assert dp.step == pytest.approx(10 + 2)  # compute, then one bucket's binomial Allreduce (2 levels)
    one = predict_sharded(profile, 8, layout, machine, zero=1)
    assert one.step == pytest.approx(dp.step + 1) and one.strategy == "ZeRO-1"  # + the all-gather
    two = predict_sharded(profile, 8, layout, machine, zero=2)
    assert two.step == pytest.approx(10 + 1 + 2 * 2 + 1)  # reduce-scatter, two small Allreduces, all-gather
    three = predict_sharded(profile, 8, layout, machine, zero=3)
    # forward: gather 0 [0, 1], unit 0 [1, 3] (gather 1 [1, 2]), unit 1 [3, 5]; backward: unit 1 [5, 8]
    # (gather 0 [5, 6], reduce-scatter 1 [8, 9]), unit 0 [8, 11], reduce-scatter 0 [11, 12]; 1 s waited
    # for gather 0, 1 s of reduce-scatter after the backward, the two small Allreduces 4 s
    assert three.step == pytest.approx(10 + 1 + 1 + 4) and three.gathers == pytest.approx(1)
    assert three.memory_bytes == state_memory([400, 400], 2, 3, SGD).total + 200
    alone = Layout(1, 1)
    assert predict_sharded(profile, 8, alone, machine, zero=3).step == predict_data_parallel(
        profile, 8, alone, machine).step
    with pytest.raises(ValueError, match="ZeRO stages are 1, 2 and 3"):
        predict_sharded(profile, 8, layout, machine, zero=0)
    with pytest.raises(ValueError, match="ZeRO-3 over dp x 1 x 1 layouts .*got ZeRO-1 on 1 x 2 x 1"):
        predict_sharded(profile, 8, Layout(2, 2, pp=2), machine, zero=1)


def test_predict_run_predicts_a_zero_job():
    from mpipar.cost import predict_run
    from mpipar.sharded import ShardedConfig

    profile = profile_of([(1.0, 2.0, [1000], 100, 10)] * 4, sizes=(2,))
    prediction, why = predict_run(machine_of(profile), model="toy", batch_size=8, bucket_mb=25,
                                  settings=ShardedConfig(zero=3), ranks=2, ranks_per_node=2)
    assert why == "" and prediction.strategy == "ZeRO-3" and prediction.layout.shape == "2 x 1 x 1"
    assert prediction.attrs()["predicted_memory_bytes"] == prediction.memory_bytes > 0
    adamw, _ = predict_run(machine_of(profile), model="toy", batch_size=8, bucket_mb=25, config=ADAMW,
                           settings=ShardedConfig(zero=3), ranks=2, ranks_per_node=2)
    assert adamw.memory_bytes - prediction.memory_bytes == 4000 / 2  # AdamW's second moment of the shard
    dp, _ = predict_run(machine_of(profile), model="toy", batch_size=8, bucket_mb=25, config=ADAMW,
                        settings=None, ranks=2, ranks_per_node=2)  # an entry point without options: as before
    assert dp.strategy == "DP"

    class Selective:
        recompute = "selective"

    none, why = predict_run(machine_of(profile), model="toy", batch_size=8, bucket_mb=25, config=Selective(),
                            settings=ShardedConfig(zero=1), ranks=2, ranks_per_node=2)
    assert none is None and "--recompute must be one of" in why


# --- the plan ----------------------------------------------------------------------------------------------------


def big_model():
    """4 units of 256 MiB of parameters (1 GiB): AdamW needs 4 GiB a rank without sharding."""
    return profile_of([(0.01, 0.02, [256 * MiB], 1024, 1024)] * 4, name="big", sizes=(1, 64))


@pytest.mark.parametrize("budget,verdict", [
    (5.0, "fits 5.00 GiB per rank without sharding"),
    (3.0, "does not fit 3.00 GiB per rank without --zero 1"),
    (2.2, "does not fit 2.20 GiB per rank without --zero 3"),
    (1.0, "does not fit 1.00 GiB per rank even with --zero 3"),
])
def test_plan_says_which_zero_stage_the_model_needs(budget, verdict):
    machine = machine_of(big_model())
    stages = memory_by_stage(machine, "big", 16, 4, ADAMW)
    # AdamW, 4 ranks: DP 4 GiB; ZeRO-1 1 + 1 + 0.5; ZeRO-2 1 + 0.25 + 0.5 + 1 transient;
    # ZeRO-3 0.25 + 0.25 + 0.5 + (0.5 gathered + 2 x 0.25 of one unit's gradients) transient
    assert [m.total - m.activations for m in stages] == [4 * GiB, 2.5 * GiB, 2.75 * GiB, 2 * GiB]
    rows = plan(machine, "big", 16, 4, 4, zero_stages=(1, 2, 3), options=ADAMW, memory_bytes=budget * GiB)
    assert {row.prediction.label for row in rows} >= {"DP", "ZeRO-1", "ZeRO-2", "ZeRO-3"}
    fitting = [row.fits for row in rows]
    assert fitting == sorted(fitting, reverse=True)  # the rows that fit come first
    lines = verdicts(rows, stages, model="big", ranks=4, memory_bytes=budget * GiB, options=ADAMW)
    assert verdict in lines[0]


def test_plan_says_when_compression_pays():
    wire = TrainingOptions(grad_wire="bf16")
    # 64 MiB of gradients on 1 Gbit/s: bandwidth-bound, half the bytes pays
    big = profile_of([(0.01, 0.02, [64 * MiB], 1024, 1024)] * 2, name="big")
    machine = machine_of(big, across=interconnect("1gbit,1ms"))
    rows = plan(machine, "big", 8, 4, 1, options=wire)
    [line] = verdicts(rows, [], model="big", ranks=4, memory_bytes=0, options=wire)
    assert line.startswith("compression pays on 1gbit,1ms: bf16 wire")
    # 4 KiB of gradients: latency-bound, the wire's extra rounds do not pay
    small = profile_of([(0.01, 0.02, [4096], 1024, 1024)] * 2, name="small")
    rows = plan(machine_of(small, across=interconnect("1gbit,1ms")), "small", 8, 4, 1, options=wire)
    [line] = verdicts(rows, [], model="small", ranks=4, memory_bytes=0, options=wire)
    assert line.startswith("compression does not pay on 1gbit,1ms")


def test_plan_cli_takes_the_new_options(tmp_path, capsys):
    shapes = [(256, 256)]
    profile = profile_of([(0.01, 0.02, [256 * 256 * 4], 1024, 1024, shapes)] * 3, name="small", sizes=(4, 8))
    path = machine_of(profile, memory_bytes=1 * MiB).save(tmp_path / "machine.json")  # a node's, 2 ranks share it
    main(["--model", "small", "--ranks", "4", "--ranks-per-node", "2", "--machine", str(path), "--interconnect",
          "1gbit,1ms", "--batch-size", "8", "--optimizer", "adamw", "--compress", "powersgd:4", "--recompute", "full"])
    out = capsys.readouterr().out
    for text in ("ZeRO-1", "ZeRO-2", "ZeRO-3", "DP powersgd:4 recompute", "fits", "compression pays on 1gbit,1ms",
                 "does not fit 0.5 MiB per rank"):  # the machine file's memory per rank is the budget
        assert text in out, out
    with pytest.raises(SystemExit, match="--compress takes 'none' or 'powersgd:RANK'"):
        main(["--ranks", "2", "--machine", str(path), "--compress", "topk:3"])
    with pytest.raises(SystemExit, match="--zero takes 'all' or stages 0-3"):
        main(["--ranks", "2", "--machine", str(path), "--zero", "4"])
    assert parse_zero("0") == () and parse_zero("3,1") == (1, 3) and parse_compress("none") == 0


def test_options_refuse_what_the_model_does_not_know():
    with pytest.raises(ValueError, match="--recompute must be one of"):
        TrainingOptions(recompute="selective")
    with pytest.raises(ValueError, match="choose one"):
        TrainingOptions(grad_wire="bf16", powersgd_rank=4)

    class Config:
        optimizer, precision, grad_wire, compress = "adamw", "bf16", "fp32", "powersgd:2"

    assert TrainingOptions.from_settings(Config()) == TrainingOptions("adamw", "bf16", "fp32", "none", 2)
    assert TrainingOptions.from_settings(object()) == TrainingOptions()
    Config.compress = "topk:3"
    with pytest.raises(ValueError, match="no compression 'topk:3'"):
        TrainingOptions.from_settings(Config())


def test_machine_file_keeps_ratios_memory_and_shapes(tmp_path):
    profile = profile_of([(1e-3, 2e-3, [400, 40], 1024, 2048, [(10, 10), (10,)])])
    machine = machine_of(profile, compute_ratio={"bf16": 0.4}, memory_bytes=8 * GiB)
    assert Machine.load(machine.save(tmp_path / "machine.json")) == machine


# --- predicted memory against what ShardedDataParallel holds -------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_predicted_state_is_what_sharded_data_parallel_holds(comm, stage):
    """Between steps the busiest rank holds the parameters, gradients and AdamW state the cost model
    predicts (AdamW's per-piece step counters aside), at any rank count (82 parameters, 42 + 24 + 16)."""
    from mpipar.sharded import ShardedDataParallel

    size = comm.Get_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 4))  # float32: 42, 24, 16 elements
    units = [4 * sum(p.numel() for p in layer.parameters()) for layer in model]
    private = comm.Dup()
    try:
        sdp = ShardedDataParallel(model, private, stage=stage)
        optimizer = torch.optim.AdamW(sdp.parameters(), lr=0.01)
        torch.manual_seed(1 + comm.Get_rank())
        sdp(torch.randn(6, 5)).square().mean().backward()
        sdp.step(optimizer)
        held = sdp.memory(optimizer)
        steps = sum(state["step"].numel() * state["step"].element_size() for state in optimizer.state.values())
        sdp.close()
    finally:
        private.Free()
    predicted = state_memory(units, size, stage, ADAMW)
    got = (held["param_bytes"], held["grad_bytes"], held["optimizer_bytes"] - steps)
    busiest = tuple(max(values) for values in zip(*comm.allgather(got)))  # the last ranks' shards hold padding
    want = (predicted.params, predicted.grads, predicted.optimizer)
    assert_all_ranks(comm, busiest == want, f"held at most {busiest}, predicted {want}")
