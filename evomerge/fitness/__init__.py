"""Fitness: the evaluator (lm-eval tasks, custom local tasks, built-in likelihood fitness) and the demo zoo."""
