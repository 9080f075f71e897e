"""Benchmarks behind `evomerge bench NAME`; each module defines NAME, HELP, add_arguments, run."""
