"""A run's item lists: each task's items on each split, recorded in the archive at the first session and checked
on every later one, and the racing settings a session uses.

Per-item results are keyed by an item's index in its task's list and the list's content hash, so two
candidates compare item by item only when their task files are the same. The first session of a run writes
every task's item count and content hash (search and test splits) to the archive meta (``items``); a resume
whose task files changed since (an edited jsonl file, another lm-eval dataset version) is refused with the
task and split named, before any worker starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evomerge.errors import ConfigError
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.items import ItemList
from evomerge.fitness.racing import RacingConfig
from evomerge.fitness.spec import SPLITS
from evomerge.search.archive import Archive
from evomerge.search.run import RunDir
from evomerge.search.space import Space

ITEMS_META = "items"


def item_lists(space: Space, splits: Sequence[str] = SPLITS) -> dict[str, dict[str, ItemList]]:
    """Each split's item lists of ``space``'s tasks, read here in the driver (tokenizer and task data only)."""
    evaluator = Evaluator(space.fitness, str(space.base_path), "cpu", splits=())
    return {split: evaluator.item_lists(split) for split in splits}


def describe(lists: Mapping[str, Mapping[str, ItemList]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The item lists as the archive meta holds them: per split and task, count, scorable count, hash, mean."""
    return {split: {task: {"total": il.total, "scorable": len(il.scorable), "content": il.content, "mean": il.mean}
                    for task, il in sorted(tasks.items())} for split, tasks in sorted(lists.items())}


def check_item_lists(archive: Archive, lists: Mapping[str, Mapping[str, ItemList]], where: str) -> None:
    """Record the item lists at a run's first session; later, refuse lists that differ, naming each task."""
    now = describe(lists)
    before = archive.get_meta(ITEMS_META)
    if before is None:
        archive.set_meta(ITEMS_META, now)
        return
    problems = []
    for split in sorted(set(before) | set(now)):
        was, got = before.get(split, {}), now.get(split, {})
        for task in sorted(set(was) | set(got)):
            if task not in got:
                problems.append(f"task {task} ({split} split) is gone")
            elif task not in was:
                problems.append(f"task {task} ({split} split) is new")
            elif (was[task]["total"], was[task]["content"]) != (got[task]["total"], got[task]["content"]):
                problems.append(f"task {task} ({split} split): its items changed ({was[task]['total']} items, "
                                f"hash {was[task]['content']} when the run started; now {got[task]['total']}, "
                                f"hash {got[task]['content']})")
    if problems:
        raise ConfigError(f"{where}: the fitness tasks' items differ from those this run was started with: "
                          + "; ".join(problems) + ". Archived per-item results would no longer compare: restore "
                          "the task files or start a new run")


def session_racing(space: Space, lists: Mapping[str, Mapping[str, ItemList]],
                   log: Callable[[str], None]) -> RacingConfig:
    """The space's racing settings, given the tasks as loaded: a task whose value is not a mean of its items
    (only known once lm-eval has loaded it) turns the default off (said in the log) and refuses an explicit
    ``racing:`` section, naming the task."""
    cfg = space.racing
    if not cfg.enabled:
        return cfg
    search = lists.get("search", {})
    not_mean = sorted(str(t.name) for t in space.fitness.tasks
                      if str(t.name) not in search or not search[str(t.name)].mean)  # absent: an lm-eval group
    if not not_mean:
        return cfg
    if space.raw.racing is None:
        log(f"racing off: the value of task(s) {', '.join(not_mean)} is not a mean of their items")
        return dataclasses.replace(cfg, enabled=False)
    raise ConfigError(f"{space.where}: racing: the value of task(s) {', '.join(not_mean)} is not a mean of their "
                      "items (lm-eval does not aggregate their metric by the mean, or the task is a group); "
                      "set racing: false")


def prepare_session_items(run: RunDir, space: Space, log: Callable[[str], None]) -> RacingConfig:
    """At a session's start: read the item lists, record or check them in the archive, decide racing."""
    lists = item_lists(space)
    with run.archive() as archive:
        check_item_lists(archive, lists, str(run.path))
    return session_racing(space, lists, log)
