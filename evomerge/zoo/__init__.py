"""The built-in demo zoo (a tiny base and skill specialists, trained on CPU) and the ``zoo:`` path scheme."""
