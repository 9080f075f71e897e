"""The population manager: Top-k greedy merging with kinship, as a mode of the search core.

- :mod:`.rules`: the decisions, pure functions of the population (configuration, which pairs to merge, when to
  stop, whom to revive);
- :mod:`.manager`: :class:`~.manager.PopulationManager`, Algorithm 1 over a backend, every decision an event;
- :mod:`.members`: members and their ranking, the run's member store, the tasks a member stands for;
- :mod:`.pair_search`: the pair genome and one pair's seeded search through the evaluation dispatcher;
- :mod:`.parent_cache`: merged parents materialized on disk (LRU by bytes) and member key -> folder;
- :mod:`.kinship_cache`: kinship of two members (memo, archive table, exact recipe algebra, direct);
- :mod:`.session`: the backend over a run directory and ``run_population_session``;
- :mod:`.status`: the population's lines of ``evomerge status`` (light: no torch).

This package's ``__init__`` imports nothing, so ``status`` stays light.
"""
