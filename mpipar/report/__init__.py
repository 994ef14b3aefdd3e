"""Looking at finished (or killed) runs: reading metrics files, analysis, ``mpipar-report``."""
