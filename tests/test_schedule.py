"""Pipeline schedules against literal tables (no MPI)."""

import pytest

from mpipar.pipeline.schedule import (
    ASYNC_SCHEDULES,
    FLUSHING_SCHEDULES,
    SCHEDULES,
    TRAIN_SCHEDULES,
    Backward,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    RecvSkip,
    RecvSkipGrad,
    Schedule,
    SendActivation,
    SendGrad,
    SendSkip,
    SendSkipGrad,
    Update,
    placement_bubble,
    rank_program,
    simulate_step,
    window_program,
)


def rows(grid: str):
    return [line.split() for line in grid.splitlines()]


def on_ranks(name: str, ranks: int, microbatches: int, **kwargs) -> Schedule:
    """Schedule ``name`` on ``ranks`` ranks in its own placement: one stage each, or zbv's two (a V)."""
    chunks = 2 if name == "zbv" else 1
    return Schedule(name, ranks * chunks, microbatches, virtual_stages=chunks, **kwargs)


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


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("stages,microbatches", [(1, 1), (2, 5), (3, 2), (4, 8)])
def test_every_receive_is_sent_at_an_earlier_tick(name, stages, microbatches):
    """The property that makes the executor deadlock-free (asynchronous schedules: over 3 batches)."""
    schedule = on_ranks(name, stages, microbatches, batches=3 if name in ("pipedream", "2bw") else 1)
    stages = schedule.stages
    tick = {}
    for stage in range(stages):
        for step, t in zip(schedule._compute_steps(stage), schedule.ticks(stage)):
            tick[step] = t
    for step, t in tick.items():  # every data dependency (a received tensor among them) at an earlier tick
        assert all(tick[need] < t for need in schedule.depends_on(step))
    for stage in range(stages):
        for instruction in schedule.instructions(stage):
            i = instruction.microbatch
            if isinstance(instruction, RecvActivation):
                assert tick[Forward(stage - 1, i)] < tick[Forward(stage, i)]
    total = schedule.total_microbatches
    codes = ("F", "I", "W") if schedule.kind.splits_backward else ("F", "B") if schedule.has_backward else ("F",)
    every = {(code, i) for code in codes for i in range(total)}
    assert all(sorted(schedule.compute_order(s)) == sorted(every) for s in range(stages))


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
    (("zigzag", 2, 2), "unknown pipeline schedule 'zigzag'"),
    (("2bw", 4, 2), r"2bw with 4 stages needs microbatches >= stages - 1 = 3, got 2"),
    (("1f1b", 2, 2, 3), r"1f1b flushes after every batch; batches=3 needs one of"),
    (("pipedream", 2, 2, 0), "batches >= 1"),
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


@pytest.mark.parametrize("name", [name for name in SCHEDULES if name not in ASYNC_SCHEDULES])
@pytest.mark.parametrize("stages,microbatches", [(1, 3), (2, 4), (3, 2), (4, 8)])
def test_placement_bubble_with_one_stage_per_rank_is_the_ideal_bubble(name, stages, microbatches):
    schedule = on_ranks(name, stages, microbatches)
    assert placement_bubble(schedule, schedule.stage_ranks) == pytest.approx(schedule.ideal_bubble)


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


# -- asynchronous schedules (PipeDream, PipeDream-2BW) -------------------------------------


def test_pipedream_never_flushes_and_updates_after_every_backward():
    schedule = Schedule("pipedream", 2, 2, batches=2)
    assert rows(schedule.grid()) == [
        "F0 F1 .  B0 F2 B1 F3 B2 .  B3".split(),
        ".  F0 B0 F1 B1 F2 B2 F3 B3 .".split(),
    ]
    assert [str(i) for i in schedule.instructions(0)] == \
        "F0 sa0 F1 sa1 rg0 B0 U0 F2 sa2 rg1 B1 U1 F3 sa3 rg2 B2 U2 rg3 B3 U3".split()


def test_2bw_updates_once_per_batch():
    schedule = Schedule("2bw", 2, 2, batches=2)
    assert [str(i) for i in schedule.instructions(1)] == \
        "ra0 F0 B0 sg0 ra1 F1 B1 sg1 U1 ra2 F2 B2 sg2 ra3 F3 B3 sg3 U3".split()
    assert schedule.grid() == Schedule("pipedream", 2, 2, batches=2).grid() == Schedule("1f1b", 2, 4).grid()


@pytest.mark.parametrize("name,staleness,versions", [
    ("pipedream", [3, 2, 1, 0], [4, 3, 2, 1]),
    ("2bw", [1, 1, 1, 1], [2, 2, 2, 2]),
    ("gpipe", [0, 0, 0, 0], [1, 1, 1, 1]),
    ("1f1b", [0, 0, 0, 0], [1, 1, 1, 1]),
])
def test_steady_state_staleness_and_weight_versions_per_stage(name, staleness, versions):
    schedule = Schedule(name, 4, 8)
    assert schedule.staleness() == staleness
    assert schedule.weight_versions() == versions


def test_version_tables_of_the_streams():
    # pipedream, 2 stages, 2 micro-batches per batch, 2 batches: stage 0 holds one micro-batch over each update
    assert Schedule("pipedream", 2, 2, batches=2).version_table(0) == [(0, 0, 0), (1, 0, 1), (2, 1, 2), (3, 2, 3)]
    assert Schedule("pipedream", 2, 2, batches=2).version_table(1) == [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)]
    # 2bw: batch 0 on version 0 (applied to 0), batch k on version k - 1 (applied to k)
    assert Schedule("2bw", 2, 2, batches=3).version_table(0) == [(0, 0, 0), (1, 0, 0), (2, 0, 1), (3, 0, 1),
                                                                 (4, 1, 2), (5, 1, 2)]
    assert Schedule("1f1b", 2, 2).version_table(0) == [(0, 0, 0), (1, 0, 0)]


def test_forward_versions_never_need_weights_not_made_yet():
    for name in ("pipedream", "2bw"):
        for stages, microbatches in [(1, 1), (2, 1), (3, 2), (4, 3), (4, 8)]:
            schedule = Schedule(name, stages, microbatches, batches=4)
            for stage in range(stages):
                assert len(schedule.version_table(stage)) == schedule.total_microbatches  # raises if one does


def test_windows_cut_the_stream_into_batches():
    schedule = Schedule("pipedream", 2, 3)
    programs = {(w, r): " ".join(map(str, window_program(schedule, (0, 1), r, w)))
                for w in ("fill", "steady", "drain") for r in (0, 1)}
    assert programs == {
        ("fill", 0): "F0 sa0 F1 sa1 rg0 B0 U0 F2 sa2 rg1 B1 U1",
        ("fill", 1): "ra0 F0 B0 sg0 U0 ra1 F1 B1 sg1 U1 ra2 F2 B2 sg2 U2",
        ("steady", 0): "F0 sa0 rg-1 B-1 U-1 F1 sa1 rg0 B0 U0 F2 sa2 rg1 B1 U1",
        ("steady", 1): "ra0 F0 B0 sg0 U0 ra1 F1 B1 sg1 U1 ra2 F2 B2 sg2 U2",
        ("drain", 0): "rg-1 B-1 U-1",
        ("drain", 1): "",
    }
    with pytest.raises(ValueError, match="1f1b flushes every batch"):
        window_program(Schedule("1f1b", 2, 3), (0, 1), 0, "fill")


def _run_windows(schedule, stage_ranks, skips, windows):
    """Execute the windows' programs of every rank with blocking receives and buffered sends, one
    window after another per rank (micro-batches numbered over the run); returns the instructions in
    the order they ran, or raises if every rank waits."""
    ranks = sorted(set(stage_ranks))
    queue, taken = [], 0  # (rank, window, micro-batch, instruction) in run order; batches taken in
    for b, window in enumerate(windows):
        base = schedule.microbatches * taken  # a drain numbers from the batch after the last one taken
        taken += window != "drain"
        for r in ranks:
            queue += [(r, b, base + i.microbatch, i) for i in window_program(schedule, stage_ranks, r, window, skips)]
    programs = {r: [(b, g, i) for rank, b, g, i in queue if rank == r] for r in ranks}
    sent, done, position = set(), [], {r: 0 for r in ranks}

    def message(instruction, g):
        kind = type(instruction).__name__
        if kind in ("SendActivation", "RecvActivation"):
            return ("a", min(instruction.stage, instruction.stage + (1 if kind[0] == "S" else -1)), g)
        if kind in ("SendGrad", "RecvGrad"):
            return ("g", min(instruction.stage, instruction.stage + (-1 if kind[0] == "S" else 1)), g)
        if kind in ("SendSkip", "RecvSkip", "SendSkipGrad", "RecvSkipGrad"):
            return ("s" if "Grad" not in kind else "k", instruction.skip, g)
        return None

    receives = (RecvActivation, RecvGrad, RecvSkip, RecvSkipGrad)
    sends = (SendActivation, SendGrad, SendSkip, SendSkipGrad)
    while any(position[r] < len(programs[r]) for r in ranks):
        progressed = False
        for r in ranks:
            while position[r] < len(programs[r]):
                b, g, instruction = programs[r][position[r]]
                if isinstance(instruction, receives) and message(instruction, g) not in sent:
                    break
                if isinstance(instruction, sends):
                    sent.add(message(instruction, g))
                done.append((instruction, g))
                position[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"deadlock at {position}")
    return done


@pytest.mark.parametrize("name", ASYNC_SCHEDULES)
@pytest.mark.parametrize("stage_ranks,skips", [((0, 1), ()), ((0, 1, 2, 3), ((0, 2),)), ((0, 1, 0), ((0, 2),)),
                                               ((0, 1, 2), ((0, 1), (1, 2)))])
def test_windows_run_in_order_cannot_deadlock_and_cover_every_microbatch_once(name, stage_ranks, skips):
    stages = len(stage_ranks)
    schedule = Schedule(name, stages, max(stages - 1, 2))
    windows = ["fill", "steady", "steady", "drain", "fill", "drain"]
    done = _run_windows(schedule, stage_ranks, skips, windows)
    m, batches = schedule.microbatches, 4
    for stage in range(stages):
        for kind in (Forward, Backward):
            ran = [g for instruction, g in done if isinstance(instruction, kind) and instruction.stage == stage]
            assert sorted(ran) == list(range(batches * m)), (kind.__name__, stage, ran)
        updates = [g for instruction, g in done if isinstance(instruction, Update) and instruction.stage == stage]
        assert updates == [g for g in range(batches * m) if schedule.updates_after(g)]
    skip_messages = [i for i, _ in done if isinstance(i, (SendSkip, RecvSkip, SendSkipGrad, RecvSkipGrad))]
    crossing = [s for s in skips if stage_ranks[s[0]] != stage_ranks[s[1]]]
    assert len(skip_messages) == 4 * len(crossing) * batches * m  # send and receive, skip and its gradient


def test_window_runner_finds_a_deadlock():
    """The checker above is not vacuous: a drain before the steady window it belongs after waits forever."""
    with pytest.raises(RuntimeError, match="deadlock"):
        _run_windows(Schedule("pipedream", 3, 2), (0, 1, 2), (), ["steady", "fill"])


def test_async_bubbles():
    assert Schedule("pipedream", 4, 8).ideal_bubble == Schedule("2bw", 4, 8).ideal_bubble == 0.0
    assert placement_bubble(Schedule("2bw", 2, 4), (0, 1)) == 0.0
    # steady state: the slower stage (2 + 4 per micro-batch) sets the pace, the other works 3 of every 6
    assert placement_bubble(Schedule("pipedream", 2, 4), (0, 1), [(1.0, 2.0), (2.0, 4.0)]) == pytest.approx(0.25)


# -- the registry: one registration point per schedule ---------------------------------------


def test_the_registry_lists_the_schedules_in_order():
    assert SCHEDULES == ("naive", "gpipe", "1f1b", "forward", "interleaved", "pipedream", "2bw", "zero-bubble",
                         "zbv")
    assert ASYNC_SCHEDULES == ("pipedream", "2bw")
    assert TRAIN_SCHEDULES == ("naive", "gpipe", "1f1b", "interleaved", "pipedream", "2bw", "zero-bubble", "zbv")
    assert FLUSHING_SCHEDULES == ("naive", "gpipe", "1f1b", "interleaved", "zero-bubble", "zbv")


def test_consumers_offer_the_registered_schedules():
    import argparse

    from mpipar.cost.plan import main as plan_main
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.flags import add_pipeline_flags

    for name in TRAIN_SCHEDULES:
        assert PipelineConfig(schedule=name, stages=2, microbatches=2).schedule == name
    with pytest.raises(ValueError, match="--schedule must be one of"):
        PipelineConfig(schedule="forward")
    for asynchronous, expected in ((True, TRAIN_SCHEDULES), (False, FLUSHING_SCHEDULES)):
        parser = argparse.ArgumentParser()
        add_pipeline_flags(parser, asynchronous=asynchronous)
        action = next(a for a in parser._actions if a.dest == "schedule")
        assert tuple(action.choices) == expected and all(name in action.help for name in expected)
    with pytest.raises(SystemExit):  # mpipar-plan's --schedule is checked before the machine file is read
        plan_main(["--ranks", "2", "--machine", "absent.json", "--schedule", "pipedream"])


class WeightGrad(Instruction):
    """A toy compute instruction a schedule of its own brings (a backward's weight half)."""

    code = "W"


def test_a_schedule_with_its_own_instructions_registers_in_one_place(monkeypatch):
    """GPipe whose backwards leave their weight gradients (``W``) for the end, a zero-bubble-like kind: it
    registers by itself, and ``Schedule``, the grid, ``rank_program`` and the simulator take it."""
    from mpipar.pipeline_plan import kinds

    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))

    @kinds.register_schedule
    class LateWeights(kinds.ScheduleKind):
        name = "late-weights"

        def compute_steps(self, schedule, stage):
            m = range(schedule.microbatches)
            return [Forward(stage, i) for i in m] + [Backward(stage, i) for i in m] + [WeightGrad(stage, i) for i in m]

        def is_compute(self, step):
            return isinstance(step, (Forward, Backward, WeightGrad))

        def group(self, schedule, step):
            return [step] if isinstance(step, WeightGrad) else super().group(schedule, step)

        def depends_on(self, schedule, step):
            return (Backward(step.stage, step.microbatch),) if isinstance(step, WeightGrad) else \
                super().depends_on(schedule, step)

        def ideal_bubble(self, schedule):
            return 0.0

    with pytest.raises(ValueError, match="needs a new name"):
        kinds.register_schedule(LateWeights)
    assert "late-weights" in kinds.schedule_names(asynchronous=False, trains=True)
    schedule = Schedule("late-weights", 2, 2)
    assert rows(schedule.grid()) == [
        "F0 F1 .  .  B0 B1 W0 W1".split(),
        ".  F0 F1 B0 B1 W0 W1 .".split(),
    ]
    assert [str(i) for i in rank_program(schedule, (0, 1), 1)] == \
        "ra0 F0 ra1 F1 B0 sg0 B1 sg1 W0 W1".split()
    spans = simulate_step(schedule, (0, 1), [(1.0, 1.0), (1.0, 1.0)])
    assert spans[WeightGrad(0, 1)] == (7.0, 8.0)


def test_update_period_is_read_off_the_update_rule():
    assert [Schedule(name, 3, 4).update_period for name in ("pipedream", "2bw", "1f1b")] == [1, 4, 4]


# -- interleaved 1F1B (virtual stages) and zero bubble (split backward) ------------------------------------


def test_interleaved_grid_2_ranks_2_chunks_4_microbatches():
    """Megatron's order: groups of 2 micro-batches through chunk 0 then chunk 1; F1.0 is micro-batch 1 on the
    rank's chunk 0 (rank 0: stage 0, rank 1: stage 1), chunk 1 = stages 2 and 3."""
    schedule = Schedule("interleaved", 4, 4, virtual_stages=2)
    assert rows(schedule.rank_grid()) == [
        "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 .    B2.1 .    B3.1 B2.0 B3.0".split(),
        ".    F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0 .".split(),
    ]
    assert schedule.length == 18 and schedule.unit_bubble == pytest.approx(1 / 9) == schedule.ideal_bubble
    assert str(schedule) == "interleaved schedule, 4 stages (2 per rank), 4 micro-batches"


def test_zero_bubble_grid_3_stages_4_microbatches():
    """ZB-H1: 1F1B with the backward split into I and W, stage s holding its W's back by s micro-batches."""
    schedule = Schedule("zero-bubble", 3, 4)
    assert rows(schedule.grid()) == [
        "F0 F1 F2 .  .  I0 W0 F3 I1 W1 I2 W2 I3 W3".split(),
        ".  F0 F1 .  I0 F2 I1 W0 F3 I2 W1 I3 W2 W3".split(),
        ".  .  F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3".split(),
    ]
    assert [str(i) for i in schedule.instructions(1)[:9]] == "ra0 F0 sa0 ra1 F1 sa1 rg0 I0 sg0".split()
    assert [schedule.max_in_flight(s) for s in range(3)] == [3, 3, 3]  # F to W: the deferred W's memory


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_interleaved_bubble_is_megatrons_at_unit_costs(ranks, chunks, groups):
    m = ranks * groups
    schedule = Schedule("interleaved", ranks * chunks, m, virtual_stages=chunks)
    assert schedule.unit_bubble == pytest.approx((ranks - 1) / (chunks * m + ranks - 1))
    assert schedule.ideal_bubble == pytest.approx(schedule.unit_bubble)
    looped = [stage % ranks for stage in range(ranks * chunks)]
    assert placement_bubble(schedule, looped) == pytest.approx(schedule.unit_bubble)
    if chunks == 1:  # one chunk per rank: 1F1B
        assert all(schedule.compute_order(s) == Schedule("1f1b", ranks, m).compute_order(s) for s in range(ranks))


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 5, 8])
def test_zero_bubble_bubble_is_the_papers_at_unit_costs(stages, microbatches):
    schedule = Schedule("zero-bubble", stages, microbatches)
    if microbatches >= stages:  # ZB-H1: (p-1)(F + I - W) idle per stage, a third of 1F1B's at F = I = W
        assert schedule.unit_bubble == pytest.approx((stages - 1) / (3 * microbatches + stages - 1))
    assert schedule.ideal_bubble == pytest.approx(schedule.unit_bubble)
    times = [(1.0, 2.0)] * stages  # I and W half a backward each: unit steps
    assert placement_bubble(schedule, tuple(range(stages)), times) == pytest.approx(schedule.unit_bubble)
    assert placement_bubble(schedule, tuple(range(stages))) == pytest.approx(schedule.unit_bubble)
    assert [schedule.max_in_flight(s) for s in range(stages)] == [min(stages, microbatches)] * stages


@pytest.mark.parametrize("seed", range(20))
def test_new_schedules_are_deadlock_free_on_any_placement(seed):
    """Any stage -> rank map (several stages per rank, adjacent or not) and skips: the ranks' programs run to the
    end in the simulator (which raises on a deadlock), every receive after its send."""
    import random

    rng = random.Random(seed)
    ranks, chunks = rng.randint(1, 4), rng.randint(1, 3)
    name = rng.choice(["interleaved", "zero-bubble"])
    stages = ranks * chunks
    schedule = Schedule(name, stages, ranks * rng.randint(1, 3), virtual_stages=chunks if name == "interleaved" else 1)
    stage_ranks = [rng.randrange(rng.randint(1, 4)) for _ in range(stages)]
    spans = simulate_step(schedule, stage_ranks, [(rng.random() + 0.1, rng.random() + 0.1)] * stages)
    assert len(spans) == sum(len(schedule.compute_order(s)) for s in range(stages))
    for step, (start, _) in spans.items():
        assert all(spans[need][1] <= start for need in schedule.depends_on(step))


@pytest.mark.parametrize("args,kwargs,match", [
    (("1f1b", 4, 4), {"virtual_stages": 2}, r"1f1b has no virtual stages .* use one of \['interleaved', 'zbv'\]"),
    (("interleaved", 3, 4), {"virtual_stages": 2}, "3 stages cannot be 2 virtual stages on each rank"),
    (("interleaved", 4, 3), {"virtual_stages": 2}, r"needs micro-batches in whole groups of 2 .* got 3"),
    (("interleaved", 4, 4), {"virtual_stages": 0}, "virtual_stages >= 1"),
])
def test_bad_virtual_stages_are_rejected(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(*args, **kwargs)
