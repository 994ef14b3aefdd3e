"""The test tiers: a test that launches a job must be marked ``launch`` (``run.sh --fast`` leaves it out)."""

import pytest

from mpi_helpers import mpirun_command


def test_a_launch_from_a_test_not_marked_launch_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match=r"launches a job: mark it @pytest.mark.launch"):
        mpirun_command(2, "-c", "pass")


@pytest.mark.launch
def test_a_test_marked_launch_gets_its_command():
    command = mpirun_command(2, "-c", "pass")
    assert command[1:4] == ["-n", "2", "--oversubscribe"] and command[-2:] == ["-c", "pass"]
