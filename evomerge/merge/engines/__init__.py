"""Merge engines: disk to disk streaming (:mod:`.disk`), resident in place for searches (:mod:`.resident`), and
state dicts in memory (:mod:`.memory`); each merges every tensor through :meth:`evomerge.merge.plan.MergePlan.merge_tensor`."""
