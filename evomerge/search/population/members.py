"""Members of a population: the values and their ranking, the run's member store, the tasks a member stands for.

Light on purpose (recipes and the archive only): ``evomerge status`` ranks members through this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from evomerge.errors import RunDirError
from evomerge.merge.recipe import BASE_KEY, Recipe
from evomerge.search.archive import Archive
from evomerge.search.events import MERGE_EVENTS, EventKind, merge_parents


@dataclass(frozen=True)
class Member:
    """One model of the population: an original (no parents), the best child of one parent pair, or the joint
    merge of the starting models (``JOINT_KEY``, every one of them its parent)."""

    key: str
    score: float
    generation: int = 0
    parents: tuple[str, ...] = ()
    candidate_id: int | None = None  # the archive row of the child (None for originals)
    ok: bool = True

    @property
    def is_original(self) -> bool:
        return not self.parents


JOINT_KEY = "joint"  # the member key of the joint merge of the starting models (population.joint)


def pair_key(a: str, b: str) -> tuple[str, str]:
    """Unordered pair identity (sorted)."""
    return (a, b) if a <= b else (b, a)


def parents_key(parents: Sequence[str]) -> tuple[str, ...]:
    """Unordered identity of a merge's parents (sorted; for two the same as :func:`pair_key`)."""
    return tuple(sorted(str(p) for p in parents))


def rank(members: Sequence[Member]) -> list[Member]:
    """Best first; failures last; ties broken by generation (older first) then key, so ranks are stable."""
    return sorted(members, key=lambda m: (not m.ok, -m.score if math.isfinite(m.score) else math.inf,
                                          m.generation, m.key))


def top_k(members: Sequence[Member], k: int) -> list[Member]:
    return [m for m in rank(members) if m.ok][:k]


def ancestor_tasks(key: str, recipe_of: Callable[[str], Recipe | None], task_names: Sequence[str]
                   ) -> tuple[str, ...]:
    """The fitness tasks a model stands for in data-aware merges: an original's own task (the task of the
    same name), a merged member's the ordered union of its parents' (``recipe_of`` gives a member's recipe,
    None for an original)."""
    names = set(task_names)
    out: list[str] = []
    seen: set[str] = set()

    def visit(k: str) -> None:
        if k == BASE_KEY or k in seen:
            return
        seen.add(k)
        recipe = recipe_of(k)
        if recipe is None:
            if k in names and k not in out:
                out.append(k)
            return
        for m in recipe.models:
            visit(m.model)

    visit(key)
    return tuple(out)


COMPETENCE_TIE = 0.01  # a task goes to every parent within this of the best one on it (token accuracy, ...)


def competence_rows(tasks_of: Mapping[str, Sequence[str]], scores: Mapping[str, Mapping[str, float]],
                    lower: Iterable[str] = (), tie: float = COMPETENCE_TIE) -> dict[str, tuple[str, ...]]:
    """The tasks each merged parent of a data-aware merge is calibrated on when the parents split them by
    competence: a task it stands for goes to it unless another parent that stands for the task too scores better
    on it by more than ``tie`` (``lower``: tasks where less is better). Then the merge matches each parent where it
    is the better one, not a compromise of both everywhere. A parent left with no task keeps all of them; only
    parents whose tasks shrink are returned.

    ``tasks_of``: every parent's tasks (an original: its own); ``scores``: every parent's value per task.
    """
    low = set(lower)
    out: dict[str, tuple[str, ...]] = {}
    for key, tasks in tasks_of.items():
        if len(tasks) < 2:
            continue  # an original, or a merge of one task's models: nothing to split
        kept = tuple(t for t in tasks if not _beaten(key, t, tasks_of, scores, -1.0 if t in low else 1.0, tie))
        if kept and kept != tuple(tasks):
            out[key] = kept
    return out


def _beaten(key: str, task: str, tasks_of: Mapping[str, Sequence[str]], scores: Mapping[str, Mapping[str, float]],
            sign: float, tie: float) -> bool:
    mine = sign * scores[key][task]
    return any(sign * scores[other][task] > mine + tie
               for other, theirs in tasks_of.items() if other != key and task in theirs)


class MemberStore:
    """The members of one run with their recipes, and the recorded plans that name the children.

    A child of generation ``g`` is ``g<g>.<i>``: the pair's 1-based place in that generation's recorded plan, so
    a resumed run names its children as the uninterrupted one did. Rebuilt from the archive by :meth:`replay`.
    """

    def __init__(self, originals: Iterable[str], task_names: Sequence[str]) -> None:
        self.originals = set(originals)
        self.task_names = [str(t) for t in task_names]
        self.members: dict[str, Member] = {}
        self.recipes: dict[str, Recipe] = {}
        self._plans: dict[int, list[tuple[str, str]]] = {}

    def add(self, member: Member, recipe: Recipe) -> None:
        self.members[member.key] = member
        self.recipes[member.key] = recipe

    def __getitem__(self, key: str) -> Member:
        return self.members[key]

    def __contains__(self, key: object) -> bool:
        return key in self.members or key in self.originals

    def is_original(self, key: str) -> bool:
        return key in self.originals

    def recipe_of(self, key: str) -> Recipe:
        return self.recipes[key]

    def stands_for(self, key: str) -> str | None:
        """The original a member is, when its recipe is an original taken alone (a generation-0 member)."""
        if key in self.originals:
            return key
        recipe = self.recipes.get(key)
        if recipe is not None and recipe.method == "linear" and len(recipe.models) == 1 \
                and recipe.models[0].model in self.originals:
            return recipe.models[0].model
        return None

    def note_plan(self, generation: int, plans: Sequence[Mapping[str, object]]) -> None:
        self._plans[int(generation)] = [pair_key(str(p["a"]), str(p["b"])) for p in plans]

    def child_key(self, pair: tuple[str, str], generation: int) -> str:
        plan = self._plans.get(generation) or []
        if pair not in plan:
            raise RunDirError(f"pair {pair} is not in the recorded plan of generation {generation}")
        return f"g{generation}.{plan.index(pair) + 1}"

    def model_tasks(self, keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """The fitness tasks each merged member of ``keys`` stands for (calibration rows of qp/apl pairs)."""
        def recipe_of(k: str) -> Recipe | None:
            return None if k in self.originals else self.recipes.get(k)

        out = {k: ancestor_tasks(k, recipe_of, self.task_names) for k in keys}
        return {k: v for k, v in out.items() if v}

    def replay(self, archive: Archive) -> set[tuple[int, tuple[str, ...]]]:
        """Children and plans recorded by earlier sessions; returns the (generation, parents) merges finished."""
        finished: set[tuple[int, tuple[str, ...]]] = set()
        for e in archive.events():
            p = e["data"]
            if e["kind"] in MERGE_EVENTS:
                parents = merge_parents(p)
                finished.add((int(p["generation"]), parents_key(parents)))
                rec = archive.get(int(p["candidate_id"]))
                if rec is None:
                    raise RunDirError(f"{archive.path}: {e['kind']} names candidate {p['candidate_id']}, not archived")
                self.add(Member(str(p["child"]), float(p["score"]), int(p["generation"]), parents, rec.id, rec.ok),
                         Recipe.from_dict(rec.recipe))
            elif e["kind"] == EventKind.GENERATION_PLAN:
                self.note_plan(int(p["generation"]), p["plans"])
            elif e["kind"] == EventKind.PAIRS_SCREENED:  # a screened pair searched on is unfinished until then
                for plan in p["plans"]:
                    finished.discard((int(p["generation"]), parents_key((str(plan["a"]), str(plan["b"])))))
        return finished
