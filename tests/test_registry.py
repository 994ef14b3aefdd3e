"""The strategy registry: every strategy folder registers one spec, and what it names exists."""

import dataclasses
from pathlib import Path

import pytest

from mpi_helpers import ROOT
from mpipar import registry


def test_every_strategy_folder_registers_a_spec_whose_entry_points_resolve():
    specs = registry.specs()
    assert [spec.package for spec in specs] == list(registry.STRATEGY_PACKAGES)
    for spec in specs:
        assert callable(registry.resolve(spec.consolidate)), spec.name
        assert spec.predict is None or callable(registry.resolve(spec.predict)), spec.name
        assert spec.profiles is None or callable(registry.resolve(spec.profiles)), spec.name
        if spec.settings is not None:
            settings = registry.resolve(spec.settings)
            assert dataclasses.is_dataclass(settings) and registry.for_settings(settings()) is spec
        assert spec.jobs and all((ROOT / "jobs" / job).is_file() for job in spec.jobs), spec.jobs
        assert all(registry.get(name) is spec for name in spec.names)
    assert registry.for_settings(None).name == "data_parallel"


def test_every_strategy_class_reports_a_registered_name():
    """The names the strategies write into metrics files and checkpoints are the registry's."""
    names = {name for spec in registry.specs() for name in spec.names}
    for path in sorted(Path(registry.__file__).parent.glob("*/strategy.py")):
        text = path.read_text()
        reported = [line.split('"')[1] for line in text.splitlines() if line.strip().startswith("name = \"")]
        assert set(reported) <= names, (path, reported)


def test_clashing_or_malformed_specs_are_refused():
    taken = registry.get("local_sgd")
    with pytest.raises(ValueError, match="clashes with 'local_sgd'"):
        registry.register(dataclasses.replace(taken, package="elsewhere", aliases=("x",)))
    with pytest.raises(ValueError, match="checkpoint key 'placement'"):
        registry.register(dataclasses.replace(taken, name="other", checkpoint_key="placement"))
    with pytest.raises(ValueError, match="consolidate must be 'package.module:attribute'"):
        dataclasses.replace(taken, consolidate="mpipar.local_sgd.consolidate.averaged_model")
    with pytest.raises(ValueError, match="no strategy named 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="cannot tell which strategy"):
        registry.for_checkpoint({"model": {}}, per_rank=True)


def test_the_pipeline_flags_offer_the_schedules_that_schedule_py_defines():
    import argparse

    from mpipar.pipeline.flags import add_pipeline_flags
    from mpipar.pipeline.schedule import ASYNC_SCHEDULES, SCHEDULES

    for asynchronous in (False, True):
        parser = argparse.ArgumentParser()
        add_pipeline_flags(parser, asynchronous=asynchronous)
        offered = next(action.choices for action in parser._actions if action.dest == "schedule")
        expected = [name for name in SCHEDULES if name != "forward" and (asynchronous or name not in ASYNC_SCHEDULES)]
        assert offered == expected
    assert parser.parse_args(["--balance", "2,1", "--schedule", "2bw"]).balance == (2, 1)
