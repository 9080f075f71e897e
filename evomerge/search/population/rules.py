"""The population manager's rules: Top-k greedy merging with model kinship (seed paper (a), Algorithm 1).

The population is every model made so far: the originals and one child per merged parent pair (the best
candidate of that pair's search). Generation 1 merges every pair of the starting models (or a configured seed
set). Each later generation merges every not-yet-merged pair of the current top-k, plus ONE exploration merge
of the best model with the model of the whole population that has the LOWEST kinship to it (largest distance
for ED). Pairs already merged are never merged again. The run stops when the top-k set no longer changes, when
kinship among the top-k exceeds the saturation threshold (the paper's 0.9), when nothing is left to merge, or
at the evaluation budget.

Revival (an extension, not in the paper): when the best score has not improved for ``revive_after``
generations, or a convergence rule fires, up to ``revive_count`` abandoned members (not in the top-k), chosen
by score and low kinship to the top-k, join the next generation's parents; at most ``max_revivals`` times.
Every decision (plan, exploration choice, stop, revival) is an event with its reason.

This module holds the decisions, pure functions of the population; the driver that applies them over
generations is :class:`~evomerge.search.population.manager.PopulationManager`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from evomerge.errors import ConfigError
from evomerge.kinship import METRICS, is_distance
from evomerge.models.writer import parse_size
from evomerge.search.population.members import Member, pair_key

# ------------------------------------------------------------------------------------------------- config

PARTNERS = ("kinship", "attraction", "both")
PAIR_ROWS = ("ancestors", "competence")
# settings added after runs were first recorded: the value that reproduces such a run, which names none of them
AS_BEFORE: dict[str, Any] = {"pair_rows": "ancestors", "refine_leader": 0, "leader_first": False, "screen": 0.0}
SCREEN_EVALUATIONS = 1  # what screening spends on each pair of a generation: its starting recipe


@dataclass(frozen=True)
class PopulationConfig:
    """The ``population:`` section of a search space."""

    k: int = 3
    metric: str = "pcc"
    saturation: float | None = 0.9  # similarity metrics: stop when mean top-k kinship exceeds it
    saturation_distance: float | None = None  # ED: stop when mean top-k distance falls below it
    explore: bool = True  # the kinship exploration merge (False: plain Top-k greedy)
    pair_budget: int = 8  # evaluations per parent pair; 0 = the fixed recipe only (the paper)
    # each generation screens its pairs (those of pair_budget, when there are 3 or more): each is evaluated at its
    # starting recipe only, then this share of them (the best by that score) is searched on with the evaluations
    # the others left (0: every pair gets pair_budget)
    screen: float = 0.5
    max_generations: int = 20
    seed_models: tuple[str, ...] | None = None  # generation 1 pairs these (default: every original)
    revive_after: int = 1  # generations without improvement of the best before reviving
    revive_count: int = 2
    max_revivals: int = 2  # 0 disables revival
    revive_kinship_weight: float = 1.0
    cache_memory_models: int = 4  # merged parents kept resident per worker
    cache_disk_bytes: int = 2 * 1024**3  # materialized merged parents on disk
    # behaviour-aware breeding (per-item results; M2N2): see evomerge.search.population.behaviour
    niche_alpha: float = 0.0  # parents and the top-k by niche fitness; 0 = the plain aggregate (the seed paper)
    partner: str = "both"  # exploration / revival partner: kinship (lowest) | attraction | both
    identical_tol: float | None = 0.002  # skip pairs whose item scores differ by at most this (None: never)
    max_escapes: int = 2  # when the top-k saturates or converges: generations of escape moves (0: stop)
    escape_pair_budget: int | None = None  # evaluations per escape pair (default: twice pair_budget)
    crossover: bool = True  # an escape generation also runs a split-point crossover pair
    crossover_method: str = "crossover"  # the registry method of the crossover pair (boundary and w genes)
    # an escape generation first searches the merge of the best merged member again (its parents, from its
    # genome, escape_budget evaluations): a new member of those parents. Off: neutral on both demo zoos (README)
    refine: bool = False
    # after a generation that made no member better than the best, the next one first searches the best's merge
    # again (its parents, from its genome) with this many evaluations; once per member (0: off)
    refine_leader: int = 40
    # a top-k that saturates or converges refines the best first (once per member, as above), and escapes only
    # once the best's own merge is refined. Off: escapes first gained more on the demo zoo (README, Benchmarks)
    leader_first: bool = False
    # generation 0: one merge of every starting model by the pair method (a member whose parents are all of them),
    # which then starts generation 1 beside them: a data-aware merge of the originals keeps skills that merges of
    # merged parents have lost already (search_spaces/README.md)
    joint: bool = True
    joint_budget: int = 0  # evaluations of the joint merge's per-layer weight search; 0 = its fixed recipe
    # the tasks a merged parent is calibrated on in a data-aware pair merge (qp, apl): all its originals' tasks
    # (ancestors), or those of them where the other parent is not better (competence: members.competence_rows)
    pair_rows: str = "competence"

    def __post_init__(self) -> None:
        where = "population"
        if self.k < 2:
            raise ConfigError(f"{where}.k: need at least 2, got {self.k}")
        if self.metric not in METRICS:
            raise ConfigError(f"{where}.metric: {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.pair_budget < 0:
            raise ConfigError(f"{where}.pair_budget: must be >= 0, got {self.pair_budget}")
        if isinstance(self.screen, bool) or not isinstance(self.screen, (int, float)) or not 0 <= self.screen <= 1:
            raise ConfigError(f"{where}.screen: a share in [0, 1] of each generation's pairs to search on after "
                              f"screening (0 = off), got {self.screen!r}")
        if self.max_generations < 1:
            raise ConfigError(f"{where}.max_generations: must be >= 1, got {self.max_generations}")
        if self.revive_after < 1 or self.revive_count < 0 or self.max_revivals < 0:
            raise ConfigError(f"{where}: revive_after >= 1, revive_count >= 0 and max_revivals >= 0 "
                              f"(got {self.revive_after}, {self.revive_count}, {self.max_revivals})")
        if self.saturation is not None and not -1.0 <= self.saturation <= 1.0:
            raise ConfigError(f"{where}.saturation: a similarity in [-1, 1] or null, got {self.saturation}")
        if self.seed_models is not None and len(self.seed_models) < 2:
            raise ConfigError(f"{where}.seed_models: need at least two models, got {list(self.seed_models)}")
        if self.cache_memory_models < 0 or self.cache_disk_bytes < 0:
            raise ConfigError(f"{where}: cache budgets must be >= 0")
        if isinstance(self.niche_alpha, bool) or not isinstance(self.niche_alpha, (int, float)) \
                or not 0 <= self.niche_alpha < math.inf:
            raise ConfigError(f"{where}.niche_alpha: a number >= 0 (0 = plain aggregate), got {self.niche_alpha!r}")
        if self.partner not in PARTNERS:
            raise ConfigError(f"{where}.partner: {self.partner!r} is not one of {', '.join(PARTNERS)}")
        if self.identical_tol is not None and not (isinstance(self.identical_tol, (int, float))
                                                   and 0 <= self.identical_tol < 1):
            raise ConfigError(f"{where}.identical_tol: a number in [0, 1) or null, got {self.identical_tol!r}")
        if self.max_escapes < 0:
            raise ConfigError(f"{where}.max_escapes: must be >= 0, got {self.max_escapes}")
        if not isinstance(self.refine, bool):
            raise ConfigError(f"{where}.refine: true or false, got {self.refine!r}")
        if isinstance(self.refine_leader, bool) or not isinstance(self.refine_leader, int) or self.refine_leader < 0:
            raise ConfigError(f"{where}.refine_leader: an integer >= 0 (evaluations; 0 = off), got "
                              f"{self.refine_leader!r}")
        if not isinstance(self.leader_first, bool):
            raise ConfigError(f"{where}.leader_first: true or false, got {self.leader_first!r}")
        if not isinstance(self.joint, bool):
            raise ConfigError(f"{where}.joint: true or false, got {self.joint!r}")
        if isinstance(self.joint_budget, bool) or not isinstance(self.joint_budget, int) or self.joint_budget < 0:
            raise ConfigError(f"{where}.joint_budget: an integer >= 0 (0 = the fixed recipe), got "
                              f"{self.joint_budget!r}")
        if self.pair_rows not in PAIR_ROWS:
            raise ConfigError(f"{where}.pair_rows: {self.pair_rows!r} is not one of {', '.join(PAIR_ROWS)}")
        if self.escape_pair_budget is not None and self.escape_pair_budget < 0:
            raise ConfigError(f"{where}.escape_pair_budget: must be >= 0, got {self.escape_pair_budget}")

    def as_started(self, start: Mapping[str, Any] | None) -> PopulationConfig:
        """The settings a run keeps (``start``: its population_start event; None: it starts now): those added after
        it was recorded take the value that reproduces what it did (``AS_BEFORE``), e.g. a run recorded before the
        competence split calibrates on the ancestors' tasks."""
        if start is None:
            return self
        return dataclasses.replace(self, **{k: start.get(k, before) for k, before in AS_BEFORE.items()})

    @property
    def escape_budget(self) -> int:
        """Evaluations per escape pair: ``escape_pair_budget``, else twice ``pair_budget``."""
        return self.escape_pair_budget if self.escape_pair_budget is not None else 2 * self.pair_budget

    @property
    def uses_attraction(self) -> bool:
        return self.partner in ("attraction", "both")

    @property
    def uses_kinship(self) -> bool:
        return self.partner in ("kinship", "both")

    @staticmethod
    def from_dict(data: Mapping[str, Any] | None, where: str = "population") -> PopulationConfig:
        """Parse the YAML section (unknown keys are refused, names listed)."""
        if data is None:
            return PopulationConfig()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = set(PopulationConfig.__dataclass_fields__)
        aliases = {"cache_memory": "cache_memory_models", "cache_disk": "cache_disk_bytes"}
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(key, key)
            if name not in known:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
            if name == "cache_disk_bytes" and isinstance(value, str):
                value = parse_size(value)
            if name == "seed_models" and value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}.seed_models: expected a list of model names, got {value!r}")
                value = tuple(value)
            out[name] = value
        try:
            return PopulationConfig(**out)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class PairPlan:
    """One merge to run this generation and why."""

    a: str
    b: str
    reason: str  # "initial" | "top-k" | "exploration" | "revival" | "escape" | "crossover" | "refine" | "leader"
    kinship: float | None = None
    attraction: float | None = None  # B's attraction to A (partner: attraction | both)
    # "pair": the pair genome of population.pair; "crossover": the split-point crossover; "refine": the merge that
    # made member ``a`` (``b`` is ``a``) searched again from its genome, its child a new member of a's parents
    operator: str = "pair"
    budget: int | None = None  # evaluations of this pair (None: population.pair_budget)

    @property
    def key(self) -> tuple[str, str]:
        return pair_key(self.a, self.b)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"a": self.a, "b": self.b, "reason": self.reason, "kinship": self.kinship}
        if self.attraction is not None:
            out["attraction"] = self.attraction
        if self.operator != "pair":
            out["operator"] = self.operator
        if self.budget is not None:
            out["budget"] = self.budget
        return out

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PairPlan:
        budget = d.get("budget")
        return PairPlan(str(d["a"]), str(d["b"]), str(d["reason"]), d.get("kinship"), d.get("attraction"),
                        str(d.get("operator", "pair")), None if budget is None else int(budget))


# ------------------------------------------------------------------------------------------------ decisions


class KinshipFn(Protocol):
    def __call__(self, a: str, b: str) -> float: ...


def initial_pairs(starting: Sequence[str]) -> list[PairPlan]:
    """Generation 1: every pair of the starting models."""
    return [PairPlan(starting[i], starting[j], "initial") for i in range(len(starting))
            for j in range(i + 1, len(starting))]


def screens(cfg: PopulationConfig, n_pairs: int) -> bool:
    """Whether a generation screens its ``n_pairs`` pairs of the pair budget (``population.screen``): only when
    that leaves some pairs out and gives the others more than the screen's evaluation."""
    return cfg.screen > 0 and cfg.pair_budget > SCREEN_EVALUATIONS and screen_kept(cfg, n_pairs) < n_pairs


def screen_pairs(plans: Sequence[PairPlan], cfg: PopulationConfig) -> tuple[list[PairPlan], int]:
    """A generation's plans with its pairs of the pair budget at the screen's budget, when it screens them (the
    others, e.g. refines and escapes, keep theirs); and how many were screened (0: none, the plans unchanged)."""
    pool = [p for p in plans if p.operator == "pair" and p.budget is None]
    if not screens(cfg, len(pool)):
        return list(plans), 0
    return [dataclasses.replace(p, budget=SCREEN_EVALUATIONS) if p in pool else p for p in plans], len(pool)


def is_screened(plan: PairPlan) -> bool:
    """Whether a plan of a screening generation is one of its screened pairs (see :func:`screen_pairs`)."""
    return plan.operator == "pair" and plan.budget == SCREEN_EVALUATIONS


def screen_kept(cfg: PopulationConfig, n_pairs: int) -> int:
    """How many of ``n_pairs`` screened pairs are searched on: the ``screen`` share, rounded up, at least one."""
    return max(1, math.ceil(cfg.screen * n_pairs - 1e-9))


def screened_plans(screened: Sequence[tuple[PairPlan, Member]], cfg: PopulationConfig) -> list[PairPlan]:
    """After the screen: the best ``cfg.screen`` share of a generation's pairs by their child's score at the
    starting recipe (``screened``: each pair and that child, in plan order; failed children are never kept), each
    searched on as operator ``extend`` with an equal share of what the screen saved (``pair_budget`` per pair in
    all). A plan's budget counts the screen's evaluation, which the archive replays; the run's budget caps it when
    it runs, as any pair's (so a resume with a larger budget goes on as if it had been larger from the start)."""
    ok = [(plan, child) for plan, child in screened if child.ok]
    order = {plan.key: i for i, (plan, _) in enumerate(screened)}
    kept = sorted(ok, key=lambda pc: (-pc[1].score, order[pc[0].key]))[:screen_kept(cfg, len(screened))]
    if not kept:
        return []
    extra = len(screened) * (cfg.pair_budget - SCREEN_EVALUATIONS) // len(kept)
    if extra <= 0:
        return []
    return [PairPlan(plan.a, plan.b, plan.reason, plan.kinship, plan.attraction, operator="extend",
                     budget=SCREEN_EVALUATIONS + extra) for plan, _ in kept]


def exploration_partner(best: str, population: Sequence[Member], kin: KinshipFn, metric: str,
                        exclude: set[tuple[str, str]]) -> tuple[str, float] | None:
    """The member of LOWEST kinship to ``best`` (largest distance for ED) whose pair is not excluded.

    NaN kinships (a zero task vector) are skipped. Ties go to the higher score, then the key.
    """
    best_val: tuple[float, float, str] | None = None
    chosen: tuple[str, float] | None = None
    for m in population:
        if m.key == best or not m.ok or pair_key(best, m.key) in exclude:
            continue
        value = kin(best, m.key)
        if not math.isfinite(value):
            continue
        related = -value if is_distance(metric) else value
        order = (related, -m.score, m.key)
        if best_val is None or order < best_val:
            best_val, chosen = order, (m.key, value)
    return chosen


def partner_choice(best: str, population: Sequence[Member], kin: KinshipFn, cfg: PopulationConfig,
                   exclude: set[tuple[str, str]], attract: Mapping[str, float] | None = None
                   ) -> tuple[str, float | None, float | None] | None:
    """The exploration partner of ``best``: (key, kinship, attraction).

    ``kinship``: the lowest kinship (:func:`exploration_partner`). ``attraction``: the highest attraction to
    ``best`` (``attract``: member -> attraction; ties to the higher score, then the key); when nobody is
    attracted (every attraction 0) the least related member. ``both``: attraction / its maximum plus
    1 - relatedness (similarities mapped from [-1, 1] to [0, 1], distances as d / d_max), the highest. Without
    behaviour (``attract`` None: no per-item results) every setting is ``kinship``.
    """
    if attract is None or not cfg.uses_attraction:
        found = exploration_partner(best, population, kin, cfg.metric, exclude)
        return None if found is None else (found[0], found[1], None)
    pool = [m for m in population if m.key != best and m.ok and pair_key(best, m.key) not in exclude
            and m.key in attract]
    if not pool:
        return None
    top_attr = max(attract[m.key] for m in pool)
    if cfg.partner == "attraction":
        if top_attr <= 0:
            found = exploration_partner(best, pool, kin, cfg.metric, exclude)
            return None if found is None else (found[0], found[1], attract[found[0]])
        m = min(pool, key=lambda m: (-attract[m.key], -m.score, m.key))
        return m.key, None, attract[m.key]
    rows = []
    for m in pool:
        value = kin(best, m.key)
        if math.isfinite(value):
            rows.append((m, value))
    if not rows:
        return None
    dmax = max((v for _, v in rows), default=0.0) if is_distance(cfg.metric) else 0.0

    def unrelated(v: float) -> float:
        if is_distance(cfg.metric):
            return v / dmax if dmax > 0 else 0.0
        return 1.0 - (v + 1.0) / 2.0

    def priority(m: Member, v: float) -> float:
        return (attract[m.key] / top_attr if top_attr > 0 else 0.0) + unrelated(v)

    m, v = min(rows, key=lambda r: (-priority(*r), -r[0].score, r[0].key))
    return m.key, v, attract[m.key]


def plan_generation(top: Sequence[Member], population: Sequence[Member], merged: set[tuple[str, str]],
                    kin: KinshipFn, cfg: PopulationConfig, revived: Sequence[Member] = (),
                    attract: Mapping[str, float] | None = None) -> list[PairPlan]:
    """Generation >= 2: all not-yet-merged top-k pairs, revived x top-k pairs, one exploration merge.

    Pairs are never repeated: ``merged`` holds every pair merged so far, and the plan itself is deduplicated.
    ``attract``: each member's attraction to the first of ``top`` (the exploration merge's first parent), for
    ``partner: attraction | both``.
    """
    plans: list[PairPlan] = []
    seen = set(merged)
    keys = [m.key for m in top]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            pk = pair_key(keys[i], keys[j])
            if pk not in seen:
                seen.add(pk)
                plans.append(PairPlan(keys[i], keys[j], "top-k"))
    for r in revived:
        for k in keys:
            pk = pair_key(r.key, k)
            if r.key != k and pk not in seen:
                seen.add(pk)
                plans.append(PairPlan(k, r.key, "revival", kin(k, r.key) if cfg.uses_kinship else None))
    if cfg.explore and top:
        partner = partner_choice(top[0].key, population, kin, cfg, seen, attract)
        if partner is not None:
            plans.append(PairPlan(top[0].key, partner[0], "exploration", partner[1], partner[2]))
    return plans


def escape_plans(top: Sequence[Member], population: Sequence[Member], merged: set[tuple[str, str]],
                 cfg: PopulationConfig, attract: Mapping[str, float]) -> list[PairPlan]:
    """Escape moves once the top-k saturates: the merge that made the best merged member of ``top`` searched again
    from its genome with a larger budget (``cfg.refine``; once per member), then the first of ``top`` with its most attracted
    partners (those that succeed where it fails), the first with a larger pair budget, the second by split-point
    crossover (``cfg.crossover``; a pair is merged once, so the crossover takes the second partner). Members with
    zero attraction are no escape; pairs merged before are not repeated."""
    if not top:
        return []
    best = top[0].key
    plans: list[PairPlan] = []
    merged_top = next((m.key for m in top if m.parents), None)
    if cfg.refine and merged_top is not None and pair_key(merged_top, merged_top) not in merged:
        plans.append(PairPlan(merged_top, merged_top, "refine", operator="refine", budget=cfg.escape_budget))
    pool = sorted((m for m in population if m.ok and m.key != best and pair_key(best, m.key) not in merged
                   and attract.get(m.key, 0.0) > 0), key=lambda m: (-attract[m.key], -m.score, m.key))
    if pool:
        plans.append(PairPlan(best, pool[0].key, "escape", None, attract[pool[0].key], budget=cfg.escape_budget))
    if cfg.crossover and len(pool) > 1:
        plans.append(PairPlan(best, pool[1].key, "crossover", None, attract[pool[1].key], operator="crossover",
                              budget=cfg.escape_budget))
    return plans


def leader_refine(best: Member | None, generation: int, merged: set[tuple[str, str]], cfg: PopulationConfig,
                  plateau: bool = False) -> PairPlan | None:
    """The refine of the best member when ``generation`` (just ended) made none better, or (``cfg.leader_first``)
    when the top-k is on a ``plateau`` (saturated or converged): the search that made it goes on from its genome
    (``cfg.refine_leader`` evaluations), where breeding from it did not help. Originals have no merge to refine;
    a member is refined once."""
    if cfg.refine_leader <= 0 or best is None or not best.parents:
        return None
    if best.generation >= generation and not (plateau and cfg.leader_first):
        return None
    if pair_key(best.key, best.key) in merged:
        return None
    return PairPlan(best.key, best.key, "leader", operator="refine", budget=cfg.refine_leader)


def mean_pairwise(keys: Sequence[str], kin: KinshipFn) -> float:
    vals = [kin(keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys))]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def saturated(top: Sequence[Member], kin: KinshipFn, cfg: PopulationConfig) -> tuple[bool, float]:
    """Whether the top-k are so related that merging them rarely gains (mean pairwise kinship)."""
    if len(top) < 2:
        return False, math.nan
    value = mean_pairwise([m.key for m in top], kin)
    if not math.isfinite(value):
        return False, value
    if is_distance(cfg.metric):
        return (cfg.saturation_distance is not None and value < cfg.saturation_distance), value
    return (cfg.saturation is not None and value > cfg.saturation), value


def revival_choices(population: Sequence[Member], top: Sequence[Member], kin: KinshipFn, cfg: PopulationConfig,
                    already: set[str], merged: set[tuple[str, str]] | None = None,
                    attract: Mapping[str, float] | None = None) -> list[tuple[Member, float, float, float]]:
    """Abandoned members ranked by priority = normalized score − weight × normalized kinship to the top-k
    (+ normalized attraction to the top-k with ``partner: attraction | both``; attraction alone drops kinship).

    Scores are normalized over the whole population's range (so near-equal scores stay near-equal);
    similarities map [-1, 1] to [0, 1]; distances (ED) map to 1 − d/d_max over the candidates; attraction
    (``attract``: member -> attraction to the top-k as a set) is divided by its maximum over the candidates.

    Returns (member, priority, score_norm, kinship_to_topk) for the best ``revive_count`` (kinship NaN when
    not used). Kinship to the top-k is the MAX relatedness to any top-k member (a branch is only new if it is
    far from all of them). Originals count (they are branches too); members already revived are not revived
    again, nor members whose pairs with every top-k member were merged already (``merged``): they would bring
    no new merge.
    """
    top_keys = {m.key for m in top}
    done = merged or set()
    pool = [m for m in population if m.ok and m.key not in top_keys and m.key not in already
            and any(pair_key(m.key, t) not in done for t in top_keys)]
    if not pool or not top:
        return []
    use_attr = attract is not None and cfg.uses_attraction
    use_kin = cfg.uses_kinship or not use_attr
    scores = [m.score for m in population if m.ok and math.isfinite(m.score)]
    lo, hi = min(scores), max(scores)
    rows = []
    for m in pool:
        if not use_kin:
            rows.append((m, math.nan, False))
            continue
        vals = [kin(m.key, t.key) for t in top]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            continue
        if is_distance(cfg.metric):
            closest = min(vals)
            rows.append((m, closest, True))
        else:
            rows.append((m, max(vals), False))
    if not rows:
        return []
    dmax = max((r[1] for r in rows if r[2]), default=0.0)
    amax = max((attract.get(r[0].key, 0.0) for r in rows), default=0.0) if use_attr and attract else 0.0
    out = []
    for m, value, dist in rows:
        s_norm = (m.score - lo) / (hi - lo) if hi > lo else 1.0
        priority = s_norm
        if use_kin:
            k_norm = (1.0 - value / dmax if dmax > 0 else 0.0) if dist else (value + 1.0) / 2.0
            priority -= cfg.revive_kinship_weight * k_norm
        if use_attr and attract is not None and amax > 0:
            priority += attract.get(m.key, 0.0) / amax
        out.append((m, priority, s_norm, value))
    out.sort(key=lambda r: (-r[1], -r[0].score, r[0].key))
    return out[: cfg.revive_count]
