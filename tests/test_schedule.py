"""Pipeline schedules against literal tables (no MPI)."""

import pytest

from mpipar.pipeline.schedule import (
    Backward,
    Forward,
    RecvActivation,
    RecvGrad,
    Schedule,
    SendActivation,
    SendGrad,
    placement_bubble,
    rank_program,
)


def rows(grid: str):
    return [line.split() for line in grid.splitlines()]


def test_gpipe_grid_3_stages_4_microbatches():
    assert rows(Schedule("gpipe", 3, 4).grid()) == [
        "F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3".split(),
        ".  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .".split(),
        ".  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .".split(),
    ]


def test_1f1b_grid_3_stages_4_microbatches():
    assert rows(Schedule("1f1b", 3, 4).grid()) == [
        "F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3".split(),
        ".  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .".split(),
        ".  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .".split(),
    ]


def test_1f1b_with_fewer_microbatches_than_stages():
    assert rows(Schedule("1f1b", 3, 2).grid()) == [
        "F0 F1 .  .  .  B0 .  B1".split(),
        ".  F0 F1 .  B0 .  B1 .".split(),
        ".  .  F0 B0 F1 B1 .  .".split(),
    ]


def test_naive_grid_runs_one_stage_at_a_time():
    assert rows(Schedule("naive", 2, 2).grid()) == [
        "F0 .  .  B0 F1 .  .  B1".split(),
        ".  F0 B0 .  .  F1 B1 .".split(),
    ]


def test_forward_only_grid():
    assert rows(Schedule("forward", 2, 3).grid()) == [
        "F0 F1 F2 .".split(),
        ".  F0 F1 F2".split(),
    ]


def test_single_stage_is_plain_gradient_accumulation():
    for name in ("naive", "gpipe", "1f1b"):
        assert Schedule(name, 1, 2).instructions(0) == (
            [Forward(0, 0), Forward(0, 1), Backward(0, 0), Backward(0, 1)] if name == "gpipe" else
            [Forward(0, 0), Backward(0, 0), Forward(0, 1), Backward(0, 1)])


def test_1f1b_instruction_streams_name_every_transfer():
    schedule = Schedule("1f1b", 2, 3)
    assert [str(i) for i in schedule.instructions(0)] == \
        "F0 sa0 F1 sa1 rg0 B0 F2 sa2 rg1 B1 rg2 B2".split()
    assert [str(i) for i in schedule.instructions(1)] == \
        "ra0 F0 B0 sg0 ra1 F1 B1 sg1 ra2 F2 B2 sg2".split()
    assert schedule.instructions(1)[:4] == [RecvActivation(1, 0), Forward(1, 0), Backward(1, 0), SendGrad(1, 0)]


def test_rank_program_merges_a_non_contiguous_placement_in_clock_order():
    # stages 0 and 2 on rank 0, stage 1 on rank 1: activations go 0 -> 1 -> 0
    schedule = Schedule("gpipe", 3, 2)
    program = rank_program(schedule, (0, 1, 0), 0)
    assert [(type(i).__name__, i.stage, i.microbatch) for i in program] == [
        ("Forward", 0, 0), ("SendActivation", 0, 0),
        ("Forward", 0, 1), ("SendActivation", 0, 1),
        ("RecvActivation", 2, 0), ("Forward", 2, 0),
        ("RecvActivation", 2, 1), ("Forward", 2, 1),
        ("Backward", 2, 0), ("SendGrad", 2, 0),
        ("Backward", 2, 1), ("SendGrad", 2, 1),
        ("RecvGrad", 0, 0), ("Backward", 0, 0),
        ("RecvGrad", 0, 1), ("Backward", 0, 1),
    ]
    assert rank_program(schedule, (0, 1, 0), 1) == [
        RecvActivation(1, 0), Forward(1, 0), SendActivation(1, 0),
        RecvActivation(1, 1), Forward(1, 1), SendActivation(1, 1),
        RecvGrad(1, 0), Backward(1, 0), SendGrad(1, 0),
        RecvGrad(1, 1), Backward(1, 1), SendGrad(1, 1),
    ]
    assert rank_program(schedule, (0, 1, 0), 2) == []


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "forward"])
@pytest.mark.parametrize("stages,microbatches", [(1, 1), (2, 5), (3, 2), (4, 8)])
def test_every_receive_is_sent_at_an_earlier_tick(name, stages, microbatches):
    """The property that makes the executor deadlock-free."""
    schedule = Schedule(name, stages, microbatches)
    tick = {}
    for stage in range(stages):
        for (kind, i), t in zip(schedule.compute_order(stage), schedule.ticks(stage)):
            tick[(kind, stage, i)] = t
    for stage in range(stages):
        for instruction in schedule.instructions(stage):
            i = instruction.microbatch
            if isinstance(instruction, RecvActivation):
                assert tick[("F", stage - 1, i)] < tick[("F", stage, i)]
            if isinstance(instruction, RecvGrad):
                assert tick[("B", stage + 1, i)] < tick[("B", stage, i)]
    every = {(kind, i) for kind in ("F", "B") for i in range(microbatches)} if schedule.has_backward else \
        {("F", i) for i in range(microbatches)}
    assert all(set(schedule.compute_order(s)) == every for s in range(stages))


def test_in_flight_microbatches():
    assert [Schedule("gpipe", 4, 6).max_in_flight(s) for s in range(4)] == [6, 6, 6, 6]
    assert [Schedule("1f1b", 4, 6).max_in_flight(s) for s in range(4)] == [4, 3, 2, 1]
    assert [Schedule("1f1b", 4, 2).max_in_flight(s) for s in range(4)] == [2, 2, 2, 1]
    assert [Schedule("naive", 4, 6).max_in_flight(s) for s in range(4)] == [1, 1, 1, 1]


def test_schedule_lengths_and_ideal_bubbles():
    assert Schedule("gpipe", 4, 8).length == 2 * (8 + 4 - 1)
    assert Schedule("1f1b", 4, 8).length == 2 * (8 + 4 - 1)
    assert Schedule("naive", 4, 8).length == 2 * 4 * 8
    assert Schedule("gpipe", 4, 8).ideal_bubble == pytest.approx(3 / 11)
    assert Schedule("1f1b", 2, 8).ideal_bubble == pytest.approx(1 / 9)
    assert Schedule("naive", 4, 8).ideal_bubble == pytest.approx(3 / 4)
    assert Schedule("gpipe", 1, 8).ideal_bubble == 0.0


@pytest.mark.parametrize("args,match", [
    (("pipedream", 2, 2), "unknown pipeline schedule 'pipedream'"),
    (("gpipe", 0, 2), "stages >= 1"),
    (("1f1b", 2, 0), "microbatches >= 1"),
    (("1f1b", 2, 2.0), "microbatches >= 1"),
])
def test_bad_schedules_are_rejected_with_the_values(args, match):
    with pytest.raises(ValueError, match=match):
        Schedule(*args)


def test_rank_program_needs_one_owner_per_stage():
    with pytest.raises(ValueError, match="2 stage owners given for 3 stages"):
        rank_program(Schedule("gpipe", 3, 1), (0, 1), 0)


def test_instructions_print_compactly():
    assert [str(i) for i in (RecvActivation(1, 2), Forward(1, 2), SendActivation(1, 2), RecvGrad(0, 3),
                             Backward(0, 3), SendGrad(1, 0))] == ["ra2", "F2", "sa2", "rg3", "B3", "sg0"]
    assert str(Schedule("1f1b", 2, 4)) == "1f1b schedule, 2 stages, 4 micro-batches"


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "forward"])
@pytest.mark.parametrize("stages,microbatches", [(1, 3), (2, 4), (3, 2), (4, 8)])
def test_placement_bubble_with_one_stage_per_rank_is_the_ideal_bubble(name, stages, microbatches):
    schedule = Schedule(name, stages, microbatches)
    assert placement_bubble(schedule, tuple(range(stages))) == pytest.approx(schedule.ideal_bubble)


def test_placement_bubble_of_non_contiguous_placements():
    # fc1,fc4 on rank 0, fc2,fc3 on rank 1, one micro-batch: 6 unit steps in a row, rank 0 does 4
    assert placement_bubble(Schedule("naive", 3, 1), (0, 1, 0)) == pytest.approx(1 - 6 / 12)
    # GPipe, 2 micro-batches, 12 unit steps in a makespan of 8:
    #   rank 0: F0 F1 F0 F1 B0 B1 B0 B1   (stage 0, 0, 2, 2, 2, 2, 0, 0)
    #   rank 1: .  F0 F1 .  .  B0 B1 .
    assert placement_bubble(Schedule("gpipe", 3, 2), (0, 1, 0)) == pytest.approx(1 - 12 / (2 * 8))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_placement_bubble_with_equal_measured_times_is_the_ideal_bubble(name):
    schedule = Schedule(name, 3, 6)
    assert placement_bubble(schedule, (0, 1, 2), [(1.0, 2.0)] * 3) == pytest.approx(schedule.ideal_bubble)


def test_placement_bubble_of_unequal_stages_counts_the_imbalance():
    # 1F1B, 2 stages, stage 1 the slower: it works without a break from the end of stage 0's
    # first forward to its last backward, then stage 0 runs its last backward:
    # makespan = f0 + m (f1 + b1) + b0 = 1 + 4 * 4.5 + 2 = 21, work = 4 * (1 + 2 + 1.5 + 3) = 30
    bubble = placement_bubble(Schedule("1f1b", 2, 4), (0, 1), [(1.0, 2.0), (1.5, 3.0)])
    assert bubble == pytest.approx(1 - 30 / (2 * 21))
    with pytest.raises(ValueError, match="for 2 stages"):
        placement_bubble(Schedule("1f1b", 2, 4), (0, 1), [(1.0, 2.0)])


def test_placement_bubble_with_zero_time_steps():
    # the simulator shared with Schedule.ticks: a zero-time step finishes when it starts, so stage 1 is
    # never in the way and rank 0 runs F0 F1 B0 B1 without a break: work 4 in a makespan of 4 on 2 ranks
    assert placement_bubble(Schedule("gpipe", 2, 2), (0, 1), [(1.0, 1.0), (0.0, 0.0)]) == pytest.approx(0.5)
    assert placement_bubble(Schedule("gpipe", 2, 2), (0, 1), [(0.0, 0.0)] * 2) == 0.0


def test_ticks_are_integers_on_the_unit_clock():
    schedule = Schedule("1f1b", 3, 4)
    assert all(type(tick) is int for stage in range(3) for tick in schedule.ticks(stage))
    assert type(schedule.length) is int
