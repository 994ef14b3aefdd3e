"""The Allreduce model: each algorithm's rounds move the data they must, and their prices on links."""

import pytest

from mpipar.cost import Band, Link, Machine
from mpipar.cost.allreduce import ALGORITHMS, allreduce_seconds, open_mpi_nonblocking_choice, rounds, schedule

MiB = 2**20


def link(alpha: float, beta: float, description: str = "test") -> Link:
    band = (Band(None, alpha, beta),)
    return Link(band, band, 2, description)


def contributions_after(algorithm: str, p: int):
    """Which ranks' inputs each rank holds at the end, when every message carries the whole buffer."""
    have = [{rank} for rank in range(p)]
    for transfers in schedule(algorithm, p):
        after = [set(held) for held in have]
        for source, destination, _, reduce in transfers:
            after[destination] = after[destination] | have[source] if reduce else set(have[source])
        have = after
    return have


@pytest.mark.parametrize("algorithm", ["binomial", "recursive_doubling"])
@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 7, 8, 12])
def test_whole_buffer_algorithms_give_every_rank_every_input(algorithm, p):
    assert contributions_after(algorithm, p) == [set(range(p))] * p


@pytest.mark.parametrize("algorithm", ["ring", "rabenseifner"])
@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_reduce_scatter_allgather_algorithms_send_the_bandwidth_optimum(algorithm, p):
    """Each rank sends (p-1)/p of the buffer to reduce and (p-1)/p to gather: 2 (p-1)/p in all."""
    sent = {(rank, reduce): 0.0 for rank in range(p) for reduce in (True, False)}
    for transfers in schedule(algorithm, p):
        for source, _, fraction, reduce in transfers:
            sent[source, reduce] += fraction
    assert all(value == pytest.approx((p - 1) / p) for value in sent.values())


def test_rabenseifner_folds_ranks_beyond_a_power_of_two():
    rounds_of_6 = schedule("rabenseifner", 6)  # 4 after folding ranks (0,1), (2,3): 2 + 2 * 2 + 1 rounds
    assert len(rounds_of_6) == 7
    assert rounds_of_6[-1] == [(0, 1, 1.0, False), (2, 3, 1.0, False)]  # the folded-out ranks get the result


def test_ring_summary_equals_its_schedule():
    nodes = (0, 0, 1, 1, 2)
    summarised = [(max(f for _, _, f, _ in t), any(nodes[a] == nodes[b] for a, b, _, _ in t)) for t in
                  schedule("ring", 5)]
    assert [r[:2] for r in rounds("ring", nodes)] == summarised
    assert all(r[2] == 1 for r in rounds("ring", nodes))  # one ring edge leaves (and enters) each node


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown Allreduce algorithm 'tree'"):
        schedule("tree", 4)


def test_ring_on_one_node_is_the_textbook_cost():
    alpha, beta, gamma, n, p = 1e-5, 1e-9, 2e-10, 8 * MiB, 4
    t = allreduce_seconds(n, [0] * p, link(alpha, beta), reduce_seconds_per_byte=gamma, algorithm="ring")
    assert t == pytest.approx(2 * (p - 1) * (alpha + beta * n / p) + (p - 1) * gamma * n / p)


def test_ranks_of_a_node_share_its_network_link():
    """Rabenseifner on 2 nodes x 2 ranks: the far half of the exchanges is two messages on each node's
    link at once; on 4 nodes of one rank each, one message per link."""
    within, across, n = link(0.0, 1e-10), link(1e-3, 1e-8), 16 * MiB
    two_nodes = allreduce_seconds(n, [0, 0, 1, 1], within, across, algorithm="rabenseifner")
    expected = 2 * within.p2p_seconds(n / 2) + 2 * across.p2p_seconds(2 * n / 4)
    assert two_nodes == pytest.approx(expected)
    four_nodes = allreduce_seconds(n, [0, 1, 2, 3], within, across, algorithm="rabenseifner")
    assert four_nodes == pytest.approx(2 * across.p2p_seconds(n / 2) + 2 * across.p2p_seconds(n / 4))


def test_open_mpi_choice_and_the_gradient_reducers_call():
    assert open_mpi_nonblocking_choice(2, 16 * MiB, in_place=False) == "binomial"
    assert open_mpi_nonblocking_choice(4, 32 * 1024, in_place=False) == "binomial"
    assert open_mpi_nonblocking_choice(4, 16 * MiB, in_place=True) == "binomial"
    assert open_mpi_nonblocking_choice(4, 16 * MiB, in_place=False) == "rabenseifner"
    within, across, n = link(0.0, 1e-10), link(1e-3, 1e-8), 16 * MiB
    machine = Machine(within, across, reduce_seconds_per_byte=5e-11)
    # across nodes the reducer goes out of place (Rabenseifner), inside one it stays in place (binomial)
    assert machine.gradient_allreduce_seconds(n, [0, 0, 1, 1]) == pytest.approx(allreduce_seconds(
        n, [0, 0, 1, 1], within, across, reduce_seconds_per_byte=5e-11, algorithm="rabenseifner"))
    assert machine.gradient_allreduce_seconds(n, [0] * 4) == pytest.approx(allreduce_seconds(
        n, [0] * 4, within, reduce_seconds_per_byte=5e-11, algorithm="binomial"))
    assert machine.gradient_allreduce_seconds(n, [0]) == 0.0


def test_spanning_nodes_without_a_link_across_is_one_clear_error():
    with pytest.raises(ValueError, match="span nodes .*--interconnect"):
        allreduce_seconds(MiB, [0, 1], link(0.0, 1e-10), None)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_thousand_ranks_price_quickly(algorithm):
    nodes = tuple(rank // 8 for rank in range(1024))
    t = allreduce_seconds(25 * MiB, nodes, link(1e-6, 1e-11), link(2e-6, 4e-11), algorithm=algorithm)
    assert t > allreduce_seconds(25 * MiB, nodes[:8], link(1e-6, 1e-11), link(2e-6, 4e-11), algorithm=algorithm)


def test_inside_a_node_the_calibrated_fit_of_the_reducers_call_is_used():
    fitted = (Band(None, 1e-5, 1e-9),)
    within = Link((Band(None, 0.0, 1e-10),), (Band(None, 0.0, 1e-10),), 2, "shared memory", gradient=fitted)
    machine = Machine(within, link(1e-3, 1e-8), reduce_seconds_per_byte=5e-11)
    n = 4 * MiB
    assert machine.gradient_allreduce_seconds(n, [0, 0]) == pytest.approx(2 * (1e-5 + 1e-9 * n))
    assert machine.gradient_allreduce_seconds(n, [0] * 4) == pytest.approx(4 * (1e-5 + 1e-9 * n))
    assert machine.gradient_allreduce_seconds(n, [0] * 5) == pytest.approx(6 * (1e-5 + 1e-9 * n))
    # across nodes the rounds are priced (the fit is of one node's call)
    assert machine.gradient_allreduce_seconds(n, [0, 0, 1, 1]) == pytest.approx(allreduce_seconds(
        n, [0, 0, 1, 1], within, machine.across, reduce_seconds_per_byte=5e-11, algorithm="rabenseifner"))
