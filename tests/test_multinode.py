"""Jobs across two emulated nodes (network namespaces, slurm/nodes/emulated-nodes.sh), 2 ranks each.

What holds on one machine must hold across hosts: the MPI tests that compare data
parallelism, pipelines and tensor parallelism with their serial references pass with
their ranks on two nodes; ranks see two per node (COMM_TYPE_SHARED) and different host
names; a data-parallel job gives the same losses across nodes as on one node; every
slurm/*.sh script runs under ``sbatch -N 2``; and a node that dies ends the job.

The module brings two nodes up (root, Linux network namespaces) and always down, or uses
nodes already up (``slurm/nodes/emulated-nodes.sh up 2``), which it leaves up::

    sudo slurm/nodes/emulated-nodes.sh up 2
    python -m pytest tests/test_multinode.py -v
    sudo slurm/nodes/emulated-nodes.sh down

Where namespaces cannot be made (not root, no ``unshare``/``ip``) the tests are skipped
with the reason, unless ``MPIPAR_REQUIRE_NODES=1`` (CI) makes that a failure. The Slurm
tests need Slurm installed (``slurm/local-cluster.sh up`` installs it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_slurm import (
    JOB_TIMEOUT,
    JobResult,
    assert_clean_output,
    check_metrics,
    default_ntasks,
    job_environment,
    job_scripts,
    tiny_job,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "nodes" / "emulated-nodes.sh"
NODES_DIR = Path(os.environ.get("MPIPAR_NODES_DIR", "/tmp/mpipar-nodes"))
PYTHON = sys.executable
RANKS_PER_NODE = 2
LAUNCH_TIMEOUT = 240  # seconds for one mpirun across the nodes, Python start-up of every rank included

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Nodes:
    names: tuple
    slurm: bool  # a multi-node Slurm runs on them
    started_here: bool


def _cannot_make_nodes():
    """Why network namespaces cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "bash") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: iproute2, util-linux)"
    try:
        probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'unshare --net --uts true' failed: {exc}"
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.strip() or probe.returncode}"
    return None


def _script(*args, timeout=120, **kwargs):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=_environment(), **kwargs)


def _environment(**extra):
    """This Python's folder first on PATH (mpirun), no MPI or Slurm variables leaking in."""
    env = job_environment(**extra)
    env.pop("SLURM_CONF", None)
    env["MPIRUN"] = str(Path(PYTHON).parent / "mpirun") if (Path(PYTHON).parent / "mpirun").exists() else "mpirun"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _nodes_up():
    names = (NODES_DIR / "nodes").read_text().split() if (NODES_DIR / "nodes").exists() else []
    return names if _script("status").returncode == 0 else []


@pytest.fixture(scope="module")
def nodes():
    names = _nodes_up()
    started = False
    if len(names) < 2:
        reason = _cannot_make_nodes()
        if reason:
            message = f"{reason}; the multi-node tests need 'slurm/nodes/emulated-nodes.sh up 2' (root, Linux)"
            if os.environ.get("MPIPAR_REQUIRE_NODES") == "1":
                pytest.fail(message + " [MPIPAR_REQUIRE_NODES=1]", pytrace=False)
            pytest.skip(message)
        if names:
            pytest.fail(f"emulated nodes are up but only {names}; need 2 ('emulated-nodes.sh down', then 'up 2')")
        options = [] if shutil.which("slurmctld") and shutil.which("slurmd") else ["--no-slurm"]
        up = _script("up", "2", *options, timeout=180)
        started = True
        if up.returncode != 0:
            _script("down", timeout=120)
            pytest.fail(f"'emulated-nodes.sh up 2' failed (exit {up.returncode}):\n{up.stderr[-3000:]}")
        names = _nodes_up()
    try:
        yield Nodes(tuple(names), slurm=(NODES_DIR / "slurm-bin" / "sbatch").exists(), started_here=started)
    finally:
        if started:
            down = _script("down", timeout=180)
            assert down.returncode == 0, f"'emulated-nodes.sh down' failed:\n{down.stderr[-3000:]}"


def on_nodes(*args, hostfile=None, timeout=LAUNCH_TIMEOUT):
    """``mpirun ARGS`` on node n1 with the nodes' hostfile (or ``hostfile``) and Open MPI settings."""
    launch = ["exec", "n1", _environment()["MPIRUN"], "--hostfile", str(hostfile)] if hostfile else ["mpirun"]
    try:
        return _script(*launch, *args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun {' '.join(args)} did not finish in {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def describe(done) -> str:
    return f"exit {done.returncode}; output (tail):\n{(done.stdout + done.stderr)[-4000:]}"


LAYOUT = """
import json, socket
from mpi4py import MPI
world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED)
rows = world.gather((world.Get_rank(), socket.gethostname(), node.Get_size(), node.Get_rank()))
if world.Get_rank() == 0:
    print("LAYOUT " + json.dumps(rows))
"""


def test_ranks_see_two_per_node(nodes):
    """2 nodes x 2 ranks: by-slot placement puts ranks 0-1 on n1 and 2-3 on n2, each pair
    shares memory (one COMM_TYPE_SHARED group of 2) and the host names differ."""
    done = on_nodes("-n", "4", PYTHON, "-c", LAYOUT)
    assert done.returncode == 0, describe(done)
    line = next((s for s in done.stdout.splitlines() if s.startswith("LAYOUT ")), None)
    assert line, describe(done)
    rows = json.loads(line[len("LAYOUT "):])
    assert [host for _, host, _, _ in rows] == ["n1", "n1", "n2", "n2"], rows
    assert [size for _, _, size, _ in rows] == [RANKS_PER_NODE] * 4, f"shared-memory groups are not per node: {rows}"
    assert [local for _, _, _, local in rows] == [0, 1, 0, 1], rows


def test_parallel_tests_pass_across_nodes(nodes):
    """The MPI tests that compare data parallelism, pipelines and tensor-parallel grids with
    their serial references (bitwise or to tight tolerances), with ranks on two nodes; across them
    data parallelism reduces out of place, and the default says so."""
    files = ["tests/test_data_parallel_exact.py", "tests/test_pipeline.py", "tests/test_tp_grid.py",
             "tests/test_data_parallel.py::test_out_of_place_defaults_to_whether_ranks_span_nodes"]
    done = on_nodes("-n", "4", PYTHON, "-m", "pytest", "--only-mpi", "-q", "-p", "no:cacheprovider", *files,
                    timeout=420)
    assert done.returncode == 0, describe(done)
    assert " passed" in done.stdout and " failed" not in done.stdout, describe(done)


def test_grids_place_groups_inside_nodes_under_map_by_node(nodes):
    """Ranks dealt round robin (mpirun --map-by node: 0 and 2 on n1, 1 and 3 on n2): the process
    grid regroups them node by node, so tensor-parallel groups stay inside a node, and the
    data x pipeline x tensor-parallel grid still equals one process."""
    done = on_nodes("-n", "4", "--map-by", "node", PYTHON, "-m", "pytest", "--only-mpi", "-q", "-p",
                    "no:cacheprovider", "tests/test_tp_grid.py", timeout=300)
    assert done.returncode == 0, describe(done)
    assert " passed" in done.stdout and " failed" not in done.stdout, describe(done)


def _slurm_needed(nodes):
    if nodes.slurm:
        return
    message = "no Slurm on the emulated nodes (install it: 'slurm/local-cluster.sh up' once)"
    if os.environ.get("MPIPAR_REQUIRE_NODES") == "1" or os.environ.get("MPIPAR_REQUIRE_SLURM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _slurm_environment(**extra):
    """The submitting environment, with the nodes' Slurm commands first on PATH."""
    env = job_environment(**extra)
    env["PATH"] = f"{NODES_DIR / 'slurm-bin'}{os.pathsep}{env['PATH']}"
    env.pop("SLURM_CONF", None)  # the wrappers set the nodes' own
    return env


class TwoNodeJob:
    """One ``sbatch --wait --nodes=2`` of a slurm/ script in its tiny configuration, started at
    once (the nodes advertise CPUs for all of them side by side) and waited for by its test.
    The script's own task count, at most 2 per node."""

    def __init__(self, script: str, directory: Path, launcher: str):
        self.script, self.directory, self.job = script, directory, tiny_job(script)
        self.ntasks = default_ntasks(script)
        self.out_dir = directory / "run"
        command = ["sbatch", "--wait", "--parsable", "--nodes=2", f"--ntasks={self.ntasks}",
                   f"--ntasks-per-node={RANKS_PER_NODE}", f"--chdir={REPO}", f"--output={directory}/slurm-%j.out",
                   f"--job-name=test-{Path(script).stem}", str(REPO / "slurm" / script),
                   *(a.replace("{out}", str(self.out_dir)) for a in self.job.args)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(["timeout", "--kill-after=10", str(JOB_TIMEOUT), *command],
                                        env=_slurm_environment(LAUNCHER=launcher), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)

    def result(self) -> JobResult:
        try:
            stdout, stderr = self.process.communicate(timeout=JOB_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"sbatch --wait slurm/{self.script} -N 2 did not end in {JOB_TIMEOUT} s")
        job_id = stdout.strip().split(";")[0]
        if self.process.returncode == 124:
            pytest.fail(f"slurm/{self.script} -N 2 did not finish in {JOB_TIMEOUT} s (job {job_id or '?'})")
        if not job_id.isdigit():
            pytest.fail(f"sbatch refused slurm/{self.script}: {stderr.strip()}")
        log = self.directory / f"slurm-{job_id}.out"
        assert log.exists(), f"job {job_id} left no output file {log}; sbatch said: {stderr.strip()}"
        return JobResult(self.process.returncode, log.read_text(errors="replace"), self.out_dir,
                         time.monotonic() - self.started)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def two_node_jobs(nodes, tmp_path_factory):
    """Every slurm/ script under srun, plus slurm/resnet_dp.sh under mpirun, submitted together."""
    _slurm_needed(nodes)
    jobs = {(script, "srun"): TwoNodeJob(script, tmp_path_factory.mktemp(f"two-nodes-{Path(script).stem}"), "srun")
            for script in job_scripts()}
    jobs[("resnet_dp.sh", "mpirun")] = TwoNodeJob("resnet_dp.sh", tmp_path_factory.mktemp("two-nodes-mpirun"),
                                                  "mpirun")
    yield jobs
    for job in jobs.values():
        job.stop()


@pytest.mark.slurm
@pytest.mark.parametrize("script", job_scripts())
def test_script_runs_on_two_nodes(two_node_jobs, script):
    """Every slurm/*.sh job on a 2-node allocation, launched with srun (PMIx)."""
    job = two_node_jobs[(script, "srun")]
    result = job.result()
    assert result.returncode == 0, result.describe()
    assert_clean_output(result)
    check_metrics(result.out_dir / job.job.metrics, world_size=job.ntasks, steps=job.job.steps)


@pytest.mark.slurm
def test_mpirun_inside_a_two_node_allocation(two_node_jobs):
    """LAUNCHER=mpirun in a 2-node allocation: Open MPI starts its daemon on the second node
    with srun, and the ranks there inherit that step's SLURM_NTASKS=1."""
    job = two_node_jobs[("resnet_dp.sh", "mpirun")]
    result = job.result()
    assert result.returncode == 0, result.describe()
    assert_clean_output(result)
    check_metrics(result.out_dir / job.job.metrics, world_size=job.ntasks, steps=job.job.steps)


def _losses(path: Path):
    with h5py.File(path, "r") as f:
        return f["steps/loss"][()], int(f.attrs["world_size"])


def test_data_parallel_job_across_nodes_equals_one_node(nodes, tmp_path, request):
    """jobs/resnet_dp.py on 4 ranks, 2 per node, records the same per-step losses as on 4
    ranks of one node (same Open MPI settings: the same reduction algorithms). The run across
    nodes is slurm/resnet_dp.sh's above (srun) when it ran, else an mpirun across the nodes."""
    job = [PYTHON, "jobs/resnet_dp.py", *tiny_job("resnet_dp.sh").args]
    one_node = tmp_path / "one-node-hostfile"
    one_node.write_text(f"n1 slots={2 * RANKS_PER_NODE}\n")
    launches = [("one node", tmp_path / "one", one_node)]
    across = None
    if nodes.slurm:  # slurm/resnet_dp.sh's run above: 4 tasks, 2 per node, srun
        dp = request.getfixturevalue("two_node_jobs")[("resnet_dp.sh", "srun")]
        if dp.result().returncode == 0:
            across = dp.out_dir
    if across is None:
        across = tmp_path / "across"
        launches.append(("across nodes", across, None))
    for name, out, hostfile in launches:
        done = on_nodes("-n", "4", *(a.replace("{out}", str(out)) for a in job), hostfile=hostfile)
        assert done.returncode == 0, f"{name}: " + describe(done)
    (on_two, size_two), (on_one, size_one) = _losses(across / "metrics.h5"), _losses(tmp_path / "one" / "metrics.h5")
    assert size_two == size_one == 4
    assert on_two.shape == on_one.shape == (tiny_job("resnet_dp.sh").steps,)
    np.testing.assert_allclose(on_two, on_one, rtol=1e-6, atol=0, err_msg="losses across nodes differ from one node")


def _node_pids(node: str, keep=()):
    """Processes in the node's network namespace, the recorded daemons (``keep``) left out."""
    listed = subprocess.run(["ip", "netns", "pids", f"mpipar-{node}"], capture_output=True, text=True, timeout=30)
    return sorted(int(p) for p in listed.stdout.split() if int(p) not in keep)


def _daemon_pids():
    pids_file = NODES_DIR / "pids"
    if not pids_file.exists():
        return set()
    return {int(line.split()[1]) for line in pids_file.read_text().splitlines() if line.strip()}


def _kill_the_node(node: str) -> list:
    """SIGKILL every process on the node but the daemons emulated-nodes.sh started (a node
    that fails takes its jobs with it; its slurmd is kept so the cluster stays usable)."""
    victims = _node_pids(node, _daemon_pids())
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def _wait_for_training(log: Path, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while "steps/epoch" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert job.poll() is None, f"the endless job ended by itself:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"the job did not start training in {LAUNCH_TIMEOUT} s:\n{_tail(log)}"
        time.sleep(0.5)
    time.sleep(2)  # mid-epoch


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else f"(no {path})"


def _killed_job_ends(job: subprocess.Popen, log: Path, node: str, limit: float = 60) -> int:
    """Kill the node under the running job; the job must end within ``limit`` seconds."""
    assert _kill_the_node(node), f"no process of the job on {node}"
    killed_at = time.monotonic()
    try:
        returncode = job.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still runs {limit:.0f} s after node {node} died:\n{_tail(log)}")
    print(f"job ended {time.monotonic() - killed_at:.1f} s after {node} died (exit {returncode})")
    return returncode


@pytest.mark.slurm
def test_a_node_that_dies_ends_the_slurm_job(nodes, tmp_path):
    """An endless slurm/resnet_dp.sh on 2 nodes (srun); every process of the job on n2 is killed
    (SIGKILL, as when a node fails): ``sbatch --wait`` returns non-zero within a minute."""
    _slurm_needed(nodes)
    env = _slurm_environment(LAUNCHER="srun", MPIPAR_REQUEUE="0")
    out = tmp_path / "run"
    command = ["sbatch", "--wait", "--nodes=2", "--ntasks=4", f"--ntasks-per-node={RANKS_PER_NODE}", "--no-requeue",
               f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", "--job-name=test-node-dies",
               str(REPO / "slurm" / "resnet_dp.sh"),
               *(a.replace("{out}", str(out)) for a in tiny_job("resnet_dp.sh").long_args)]
    job = subprocess.Popen(["timeout", str(LAUNCH_TIMEOUT + 120), *command], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = None
    try:
        deadline = time.monotonic() + 60
        while log is None:
            found = sorted(tmp_path.glob("slurm-*.out"))
            log = found[0] if found else None
            assert job.poll() is None or log, f"sbatch ended before the job started: {job.stdout.read()}"
            assert time.monotonic() < deadline, "the job did not start within 60 s"
            time.sleep(0.2)
        _wait_for_training(log, job)
        returncode = _killed_job_ends(job, log, "n2")
        assert returncode != 0, f"sbatch --wait returned 0 after node n2 died:\n{_tail(log)}"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)


ENDLESS_ALLREDUCE = """
import numpy as np
from mpi4py import MPI
world = MPI.COMM_WORLD
gradient = np.ones(1 << 16, dtype=np.float32)
total = np.empty_like(gradient)
for step in range(10 ** 9):
    world.Allreduce(gradient, total)
    if step == 10 and world.Get_rank() == 0:
        print("training: 10 steps/epoch done", flush=True)
"""


def test_a_node_that_dies_ends_mpirun(nodes, tmp_path):
    """An endless Allreduce loop under mpirun on both nodes (the launcher's behaviour, so no
    torch start-up); every process of the job on n2
    is killed: mpirun ends within a minute, says it lost the node, and leaves no rank on n1."""
    daemons = _daemon_pids()
    before = set(_node_pids("n1", daemons))
    log = tmp_path / "job.log"
    command = ["bash", str(SCRIPT), "mpirun", "-n", "4", PYTHON, "-c", ENDLESS_ALLREDUCE]
    with open(log, "w") as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=_environment(),
                               start_new_session=True, cwd=REPO)
    try:
        _wait_for_training(log, job)
        returncode = _killed_job_ends(job, log, "n2")
        for _ in range(50):  # ranks on n1 end with mpirun, within seconds
            left = set(_node_pids("n1", daemons)) - before
            if not left:
                break
            time.sleep(0.2)
        assert not left, f"processes of the job left on n1 after it ended: {sorted(left)}"
        assert "lost communication with a remote daemon" in log.read_text(errors="replace"), _tail(log)
        if returncode == 0:
            pytest.xfail("Open MPI 5.0.11's mpirun (prterun) ends the job but exits 0 after 'PRTE has lost "
                         "communication with a remote daemon': under mpirun a dead node is seen in the output "
                         "only; srun (the Slurm scripts' default launcher) exits non-zero")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
