"""evomerge: evolutionary model-merge optimizer.

Layout (one job per package; imports point one way: cli -> search -> executors/fitness/merge -> models):
models/ (model folders, layer map, sharded writing), merge/ (methods, parameters, recipes, engines),
kinship.py, fitness/ (evaluator, demo zoo), search/ (space, optimizer loop, population, archive, runs,
export), executors/ (in-process and Ray), report/ (plots), bench/ (benchmarks), commands/ (CLI verbs).
"""

__version__ = "0.1.0"
