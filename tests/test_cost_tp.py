"""Tensor parallelism in the cost model: the rank's profile, the dp x tp prediction, the planner's rows and a
job's prediction. Serial and cheap."""

import pytest
from cost_helpers import MiB, linear_link, vit_like

from mpipar.cost import Layout, Link, Machine, plan, predict_data_parallel, predict_run
from mpipar.cost.plan import format_plan
from mpipar.cost.tensor import predict_tensor_grid, profile_name, tensor_degrees
from mpipar.tensor_parallel.profile import profile_tensor_parallel


def vit_machine(within: Link = None, across: Link = None) -> Machine:
    models = {"vit": vit_like("vit", 4.0, 4000), "vit/tp2": vit_like("vit/tp2", 2.0, 2000),
              "vit/tp4": vit_like("vit/tp4", 1.0, 1000), "resnet": vit_like("resnet", 4.0, 4000)}
    return Machine(within or linear_link(0.01, 0.0, "shared memory"), across, models, 4, 4)


def test_tp_prediction_parts_add_up():
    machine = vit_machine()
    p = predict_tensor_grid(machine, "vit", 8, Layout(2, 2, tp=2))
    per_allreduce = machine.within.allreduce_seconds(MiB, 2)  # 2 (p-1) alpha = 0.02 s
    assert per_allreduce == pytest.approx(0.02)
    assert p.strategy == "TP" and p.layout.shape == "1 x 1 x 2"
    assert p.tp_comm == pytest.approx(2 * 4 * per_allreduce)  # 2 blocks x (2 forward + 2 backward)
    assert p.compute == pytest.approx(2 + 2 * 6.0 + 2 + 0.5)  # embed, 2 split blocks, head, step overhead
    assert p.exposed_comm == pytest.approx(p.tp_comm) and p.step == pytest.approx(p.compute + p.exposed_comm)
    assert p.memory_bytes == 3 * (1000 + 2 * 2000 + 1000) + 2 * 10
    assert p.why().startswith("TP Allreduce 1% on shared memory")
    # two replicas of tp 2 on 4 ranks: one gradient bucket, ready at the end of the backward, all exposed
    grid = predict_tensor_grid(machine, "vit", 8, Layout(4, 4, tp=2))
    replicas = predict_data_parallel(machine.profile("vit/tp2"), 8, Layout(4, 4, tp=2), machine).exposed_comm
    assert replicas > 0  # the DP model's Allreduce of the rank's 6000 bytes over the 2 replicas
    assert grid.strategy == "TP x DP" and grid.compute == pytest.approx(p.compute)
    assert grid.exposed_comm == pytest.approx(p.tp_comm + replicas)
    assert grid.step == pytest.approx(grid.compute + grid.exposed_comm)
    assert "replicas' Allreduce" in grid.why()
    # tp 1 is data parallelism on the unsplit profile
    dp = predict_tensor_grid(machine, "vit", 8, Layout(4, 4, tp=1))
    assert dp.strategy == "DP" and dp.tp_comm == 0 and dp.compute == pytest.approx(2 + 2 * 12.0 + 2 + 0.5)


def test_tp_group_across_nodes_uses_the_link_across():
    machine = vit_machine(across=linear_link(0.1, 0.0, "1gbit,1ms"))
    p = predict_tensor_grid(machine, "vit", 8, Layout(2, 1, tp=2))  # one rank per node: the group spans two
    assert p.tp_comm == pytest.approx(2 * 4 * 0.2) and "on 1gbit,1ms" in p.why()
    with pytest.raises(ValueError, match="no link across nodes"):
        predict_tensor_grid(vit_machine(), "vit", 8, Layout(2, 1, tp=2))
    with pytest.raises(ValueError, match="no layer times of vit split over 3 .*mpipar-calibrate --model vit"):
        predict_tensor_grid(vit_machine(), "vit", 8, Layout(3, 3, tp=3))


def test_tp_profiles_round_trip_through_the_machine_file(tmp_path):
    machine = vit_machine()
    assert Machine.load(machine.save(tmp_path / "machine.json")) == machine
    assert tensor_degrees(machine, "vit") == [2, 4] and tensor_degrees(machine, "resnet") == []
    assert profile_name("vit", 1) == "vit" and profile_name("vit", 2) == "vit/tp2"


def test_a_split_block_holds_half_the_parameters_of_the_unsplit_one():
    whole, half = (profile_tensor_parallel("vit-tiny", (64,), tp, repeats=5) for tp in (1, 2))
    assert whole.name == "vit-tiny" and half.name == "vit-tiny/tp2"
    assert [layer.name for layer in half.layers[64]] == ["embed", "block0", "block1", "block2", "block3", "head"]

    def blocks(profile, what):
        return sum(what(layer) for layer in profile.layers[64] if layer.name.startswith("block"))

    # times are checked for shape only (a timed comparison fails under load); the work halves in the sizes below
    assert all(layer.forward > 0 and layer.backward > 0 for profile in (whole, half) for layer in profile.layers[64])
    # the split parameters halve; LayerNorms and the row-parallel biases stay whole
    params = [blocks(profile, lambda layer: sum(layer.param_bytes)) for profile in (whole, half)]
    assert params[1] < 0.6 * params[0]
    assert half.layers[64][1].activation_bytes == 64 * 16 * 48 * 4  # the Allreduce's message


def test_plan_has_tp_rows_for_a_vision_transformer_only(capsys, tmp_path):
    machine = vit_machine()
    rows = plan(machine, "vit", 8, 4, 4)
    assert sorted((row.prediction.strategy, row.prediction.layout.shape) for row in rows) == [
        ("DP", "4 x 1 x 1"), ("TP", "1 x 1 x 4"), ("TP x DP", "2 x 1 x 2")]
    assert "TP Allreduce" in format_plan(rows, model="vit", batch_size=8, ranks=4, ranks_per_node=4)
    resnet = plan(machine, "resnet", 8, 4, 4)
    assert {row.prediction.strategy for row in resnet} == {"DP", "PP x DP", "PP"}
    from mpipar.cost.plan import main

    main(["--model", "vit", "--ranks", "2", "--machine", str(machine.save(tmp_path / "m.json"))])
    assert "TP        1 x 1 x 2" in capsys.readouterr().out


def test_predict_run_predicts_a_tensor_parallel_job():
    from mpipar.tensor_parallel.strategy import TensorParallelConfig

    machine = vit_machine()
    p, why = predict_run(machine, model="vit", batch_size=8, bucket_mb=25, settings=TensorParallelConfig(tp=2),
                         ranks=4, ranks_per_node=4)
    assert why == "" and p.strategy == "TP x DP" and p.step == pytest.approx(
        predict_tensor_grid(machine, "vit", 8, Layout(4, 4, tp=2)).step)
    assert set(p.attrs()) >= {"predicted_step_seconds", "predicted_exposed_comm_seconds"}
    none, why = predict_run(machine, model="vit", batch_size=8, bucket_mb=25, settings=TensorParallelConfig(tp=3),
                            ranks=3, ranks_per_node=3)
    assert none is None and "split over 3" in why


def test_calibrate_a_vision_transformer_on_one_rank():
    from mpi4py import MPI

    from mpipar.cost.calibrate import calibrate
    from mpipar.tensor_parallel.strategy import TensorParallelConfig

    machine, _ = calibrate(MPI.COMM_SELF, model_names=("vit-tiny",), microbatch_sizes=(2, 4), quick=True,
                           say=lambda *_: None)
    assert sorted(machine.models) == ["vit-tiny", "vit-tiny/tp2", "vit-tiny/tp4"]
    assert Machine.from_json(machine.to_json()) == machine
    rows = plan(machine, "vit-tiny", 4, 1, 1)
    assert [row.prediction.strategy for row in rows] == ["DP"]  # 1 rank: no group to split over
    p, _ = predict_run(machine, model="vit-tiny", batch_size=4, bucket_mb=25, settings=TensorParallelConfig(tp=2),
                       ranks=2, ranks_per_node=2)
    assert p.strategy == "TP" and 0 < p.compute <= p.step  # one rank measured no link: free
