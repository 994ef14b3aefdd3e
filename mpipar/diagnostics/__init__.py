"""Failure handling and diagnostics: checks raised on every rank, abort on failure, debug fingerprints, stall watchdog.

The lowest layer of mpipar: it imports nothing else from the package.
"""
