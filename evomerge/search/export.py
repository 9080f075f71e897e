"""Export a run's chosen candidate as a normal Hugging Face folder, with its recipe, scores and lineage.

The weights come from the streaming merge engine (never the resident model), so an export needs the memory of
one tensor per model, not of a model. The folder appears atomically: everything is written into a temporary
sibling that is renamed at the end, so a failed export leaves nothing behind (and an existing folder is only
replaced with ``overwrite``).

Files added to the merge engine's output: ``README.md`` (model card: scores, recipe, lineage, evaluation
settings, how to reproduce), ``evomerge_recipe.yaml`` (re-runnable with ``evomerge merge``),
``mergekit_config.yml`` (when the recipe is expressible in mergekit), ``evomerge_lineage.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.atomic import atomic_output_dir, disk_full_error, is_disk_full, refuse_replacing_inputs
from evomerge.errors import ConfigError, RunDirError
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.result import EvalResult, TaskScore
from evomerge.merge.engines.disk import merge_to_disk
from evomerge.merge.formats.recipe_yaml import mergekit_yaml, recipe_yaml
from evomerge.merge.params import ParamValue
from evomerge.merge.recipe import BASE_KEY, ModelEntry, Recipe
from evomerge.method_data import (
    MethodDataProvider,
    calibration_file_data,
    recipe_needs_base_scores,
    recipe_needs_rows,
)
from evomerge.models.hf import load_causal_lm
from evomerge.search.archive import Archive, CandidateRecord
from evomerge.search.population.members import ancestor_tasks
from evomerge.search.run import RunDir
from evomerge.search.run_space import snapshot_space


@dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    candidate_id: int
    search_score: float
    test_score: float | None
    mergekit: bool
    seconds: float


def choose_candidate(archive: Archive, candidate_id: int | None, rank_by: str) -> CandidateRecord:
    """The candidate to export: the one asked for, else the best by search score or by test re-score."""
    if candidate_id is not None:
        rec = archive.get(candidate_id)
        if rec is None:
            raise RunDirError(f"{archive.path}: no candidate {candidate_id} (ids 1..{archive.max_id()})")
        if not rec.ok:
            raise RunDirError(f"candidate {candidate_id} failed its evaluation ({rec.error}); nothing to export")
        return rec
    if rank_by not in ("search", "test"):
        raise ConfigError(f"--rank-by {rank_by!r}: use search or test")
    best = archive.best(1, rank_by=rank_by)
    if not best:
        if rank_by == "test":
            raise RunDirError(f"{archive.path}: no candidate was scored on the test split yet "
                              "(the search re-scores its best at the end); use --rank-by search or --candidate ID")
        raise RunDirError(f"{archive.path}: no successful evaluation to export yet")
    return best[0]


def recipe_with_paths(recipe: Recipe, paths: Mapping[str, str]) -> Recipe:
    """The archived recipe (model keys) with every key replaced by its folder, so it runs anywhere."""
    missing = [k for k in recipe.model_keys() if k not in paths]
    if missing:
        raise RunDirError(f"recipe models {missing} are not models of this run (known: {sorted(paths)})")
    return dataclasses.replace(recipe.map_models(lambda key: paths[key]),
                               tokenizer_source=paths.get(recipe.tokenizer_source or "", recipe.tokenizer_source))


def merged_ancestors(archive: Archive, rec: CandidateRecord, originals: Mapping[str, str]
                     ) -> list[tuple[str, Recipe]]:
    """The merged population members ``rec`` depends on, each with its recipe, in the order to build them."""
    members = archive.member_candidates()
    order: list[tuple[str, Recipe]] = []
    seen: set[str] = set()

    def visit(recipe_dict: Mapping[str, Any], where: str) -> None:
        recipe = Recipe.from_dict(recipe_dict, where=where)
        for key in recipe.model_keys():
            if key in originals or key in seen:
                continue
            if key not in members:
                raise RunDirError(f"{where}: model {key!r} is neither an original model nor a recorded member")
            parent = archive.get(members[key])
            if parent is None:
                raise RunDirError(f"{archive.path}: member {key} names candidate {members[key]}, not archived")
            visit(parent.recipe, f"member {key} (candidate {parent.id}) recipe")
            seen.add(key)
            order.append((key, Recipe.from_dict(parent.recipe, where=f"member {key}")))

    visit(rec.recipe, f"candidate {rec.id} recipe")
    return order


CALIBRATION_FILE = "calibration.yaml"


class _ExportData:
    """What data-aware recipes of an export need, from the one provider the search's workers use, so the export
    merges exactly what the workers merged; and how its recipe files name it so they rebuild alone: task rows
    through ``options.calibration`` (a ``calibration.yaml`` in the export), base scores as ``base_score``
    parameters. A merged member's rows are its originals' tasks interleaved, as in the workers.
    """

    def __init__(self, run: RunDir, steps: list[tuple[str, Recipe]], originals: Mapping[str, str]) -> None:
        self.originals = dict(originals)
        self.model_tasks: dict[str, tuple[str, ...]] = {}
        need_rows = [r for _, r in steps if recipe_needs_rows(r)]
        need_scores = [r for _, r in steps if recipe_needs_base_scores(r) and not r.options.get("fitness")]
        self.provider: MethodDataProvider | None = None
        if not need_rows and not need_scores:
            return
        spec = snapshot_space(run, check_models=False).fitness
        self.spec = spec
        self.provider = MethodDataProvider(spec, self.originals[BASE_KEY])
        names = [str(t.name) for t in spec.tasks]
        members = dict(steps[:-1])
        keys = sorted({m.model for r in need_rows for m in r.models if m.model != r.base_model})
        self.model_tasks = {k: ancestor_tasks(k, lambda x: None if x in self.originals else members.get(x), names)
                            for k in keys}
        orphans = [k for k, tasks in self.model_tasks.items() if not tasks]
        if orphans:
            raise ConfigError(f"models {orphans} need calibration rows (method qp/apl), but no jsonl task of the "
                              f"run's fitness is named after them or their ancestors (tasks: {', '.join(names)})")
        for r in need_scores:
            unknown = [m.model for m in r.models if m.model != r.base_model and "base_score" not in m.parameters
                       and (m.model not in self.originals or m.model not in names)]
            if unknown:
                raise ConfigError(f"mergeability_weighted: no base score for {unknown}: set base_score per model "
                                  f"(base scores are measured for original models named after a task only)")

    @property
    def needs_rows(self) -> bool:
        return bool(self.model_tasks)

    def calibration(self, recipe: Recipe, folders: Mapping[str, str]) -> Any:
        """The rows for building ``recipe`` (model keys -> ``folders``), or None when it needs none."""
        if self.provider is None or not recipe_needs_rows(recipe):
            return None
        return self.provider.calibration(recipe, self.model_tasks, key_of=folders)

    def with_scores(self, recipe: Recipe) -> Recipe:
        """``recipe`` with measured ``base_score`` parameters where it needs them."""
        if self.provider is None or not recipe_needs_base_scores(recipe) or recipe.options.get("fitness"):
            return recipe
        scores = self.provider.base_scores(recipe)
        return dataclasses.replace(recipe, models=tuple(
            m if m.model not in scores else
            ModelEntry(m.model, {**m.parameters, "base_score": ParamValue.constant(float(scores[m.model]))})
            for m in recipe.models))

    def written(self, recipe: Recipe, calibration_file: Path) -> Recipe:
        """The recipe as written into the export: its rows named by ``options.calibration``."""
        if not recipe_needs_rows(recipe):
            return recipe
        return dataclasses.replace(recipe, options={**recipe.options, "calibration": str(calibration_file)})

    def file_data(self, names: Mapping[str, str]) -> dict[str, Any]:
        return calibration_file_data(self.spec, {names.get(k, k): t for k, t in self.model_tasks.items()})


def export_candidate(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     candidate_id: int | None = None, rank_by: str = "search", overwrite: bool = False,
                     device: str = "cpu", dtype: str | None = None, max_shard_size: str = "5GB",
                     progress: bool = True) -> ExportSummary:
    t0 = time.perf_counter()
    run = RunDir.open(run_dir)
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise ConfigError(f"output folder {target} already exists; pass --overwrite to replace it")
    with run.archive(readonly=True) as archive:
        rec = choose_candidate(archive, candidate_id, rank_by)
        paths: dict[str, str] = archive.get_meta("models", {}) or {}
        refs: dict[str, str] = archive.get_meta("model_refs", {}) or {}
        test = archive.rescore(rec.id, "test")
        lineage = archive.lineage(rec.id)
        ancestors = merged_ancestors(archive, rec, paths)
        vocab_policy = str((archive.get_meta("space", {}) or {}).get("vocab_policy", "refuse"))
    if overwrite:
        refuse_replacing_inputs(target, paths.values(), "run's input model")
    recipe = Recipe.from_dict(rec.recipe, where=f"candidate {rec.id} recipe")
    data = _ExportData(run, [*ancestors, ("output", recipe)], paths)
    ancestors = [(k, data.with_scores(r)) for k, r in ancestors]
    recipe = data.with_scores(recipe)
    calibration_file = target.resolve() / CALIBRATION_FILE
    try:
        mk_text = _write_export(run, rec, test, refs, lineage, paths, ancestors, recipe, data, target,
                                calibration_file, overwrite=overwrite, device=device, dtype=dtype,
                                max_shard_size=max_shard_size, progress=progress, vocab_policy=vocab_policy)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(target.parent, _output_bytes(paths, len(ancestors)), f"the export {target}",
                              "Nothing was written (the run and any earlier export are untouched): free some "
                              "space, or export to another disk") from None
    return ExportSummary(target, rec.id, rec.aggregate, test.aggregate if test else None, mk_text is not None,
                         time.perf_counter() - t0)


def _output_bytes(paths: Mapping[str, str], ancestors: int) -> int:
    """About what an export writes: one model the size of the base's weights, and one per merged ancestor."""
    base = Path(paths.get(BASE_KEY, ""))
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) if base.is_dir() else 0
    return size * (1 + ancestors)


def _write_export(run: RunDir, rec: CandidateRecord, test: Any, refs: Mapping[str, str], lineage: Mapping[str, Any],
                  paths: Mapping[str, str], ancestors: list[tuple[str, Recipe]], recipe: Recipe, data: _ExportData,
                  target: Path, calibration_file: Path, *, overwrite: bool, device: str, dtype: str | None,
                  max_shard_size: str, progress: bool, vocab_policy: str = "refuse") -> str | None:
    """Merge and write the export folder atomically; returns the mergekit config written (None: not expressible)."""
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        # merged parents (population members) first, oldest first, into a scratch folder next to the output
        scratch = tmp.parent / f".{target.name}.parents-{os.getpid()}"
        try:
            all_paths = dict(paths)
            for key, parent in ancestors:
                folder = scratch / key
                merge_to_disk(recipe_with_paths(parent, all_paths), folder, device=device, dtype=dtype,
                              max_shard_size=max_shard_size, overwrite=True, progress=progress,
                              where=f"member {key}", calibration=data.calibration(parent, all_paths),
                              vocab_policy=vocab_policy)
                all_paths[key] = str(folder)
            resolved = recipe_with_paths(recipe, all_paths)
            merge_to_disk(resolved, tmp, device=device, dtype=dtype, max_shard_size=max_shard_size,
                          overwrite=True, progress=progress, where=f"candidate {rec.id}",
                          calibration=data.calibration(recipe, all_paths), vocab_policy=vocab_policy)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if ancestors:  # the recipe names folders that are gone: keep it as lineage, not as a re-runnable file
            mk_text, mk_reason = None, "its inputs include merged population members (see evomerge_lineage.json)"
        else:
            try:
                mk_text = mergekit_yaml(resolved)
                mk_reason = ""
            except ConfigError as exc:
                mk_text, mk_reason = None, str(exc)
        if ancestors:  # the engine's recipe file names scratch folders: replace it by the whole chain
            (tmp / "evomerge_recipe.yaml").unlink(missing_ok=True)
            names = {**paths, **{a: a for a, _ in ancestors}}
            chain = [{"member": k, "recipe": recipe_with_paths(data.written(r, calibration_file), names).to_dict()}
                     for k, r in ancestors]
            chain.append({"member": "output", "recipe": recipe_with_paths(
                data.written(recipe, calibration_file), names).to_dict()})
            (tmp / "evomerge_recipe_chain.yaml").write_text(
                "# merge these in order; a model named by a member key is the folder of that earlier step\n"
                + yaml.safe_dump(chain, sort_keys=False, default_flow_style=None), encoding="utf-8")
        else:
            written = recipe_with_paths(data.written(recipe, calibration_file), paths)
            (tmp / "evomerge_recipe.yaml").write_text(recipe_yaml(written), encoding="utf-8")
        if data.needs_rows:
            (tmp / CALIBRATION_FILE).write_text(
                "# task rows of the data-aware merges (qp/apl) of this model, as the search gave them:\n"
                "# each model (folder or member key) -> the jsonl files of its tasks, interleaved\n"
                + yaml.safe_dump(data.file_data(paths), sort_keys=False), encoding="utf-8")
        if mk_text is not None:
            (tmp / "mergekit_config.yml").write_text(mk_text, encoding="utf-8")
        (tmp / "evomerge_lineage.json").write_text(json.dumps({
            "run": str(run.path.resolve()), "candidate": rec.id, "lineage": lineage, "models": paths,
            "model_refs": refs, "scores": {"search": rec.scores, "search_aggregate": rec.aggregate,
                                           "test": test.scores if test else None,
                                           "test_aggregate": test.aggregate if test else None},
            "settings": rec.settings,
            "ancestor_recipes": {k: r.to_dict() for k, r in ancestors}}, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        if ancestors:
            how = ("Built in steps: merge each entry of `evomerge_recipe_chain.yaml` in order with `evomerge merge` "
                   "(a model named by a member key is the folder of that earlier step):")
            text = (tmp / "evomerge_recipe_chain.yaml").read_text(encoding="utf-8")
        else:
            how, text = ("Re-run with `evomerge merge evomerge_recipe.yaml OUT`:",
                         recipe_yaml(recipe_with_paths(data.written(recipe, calibration_file), paths)))
        if data.needs_rows:
            how = how.rstrip(":") + (f". Data-aware steps (qp, apl) read their task rows through "
                                     f"`{CALIBRATION_FILE}`, which finds a merged member by its key: name each "
                                     "step's folder after its member:")
        (tmp / "README.md").write_text(model_card(run, rec, test, refs, lineage, text, mk_text, mk_reason, how),
                                       encoding="utf-8")
    return mk_text


def _lineage_lines(node: Mapping[str, Any], refs: Mapping[str, str], depth: int = 0) -> list[str]:
    pad = "  " * depth
    if "model" in node:
        key = node["model"]
        return [f"{pad}- original model `{key}`: {refs.get(key, node.get('path'))}"]
    member = f"member `{node['member']}` = " if "member" in node else ""
    lines = [f"{pad}- {member}candidate {node['candidate']} ({node.get('method')}, generation {node.get('generation')}, "
             f"fitness {node.get('aggregate', float('nan')):.4f})"]
    for p in node.get("parents", []):
        lines += _lineage_lines(p, refs, depth + 1)
    return lines


def model_card(run: RunDir, rec: CandidateRecord, test: Any, refs: Mapping[str, str], lineage: Mapping[str, Any],
               recipe_text: str, mergekit_text: str | None, mergekit_reason: str,
               how: str = "Re-run with `evomerge merge evomerge_recipe.yaml OUT`:") -> str:
    """A Hugging Face model card: what was merged, how, how well it scores and how to reproduce it."""
    base_ref = refs.get("base", "")
    rows = ["| task | metric | search | test |", "|---|---|---|---|"]
    for task, s in rec.scores.items():
        t = test.scores.get(task, {}).get("value") if test is not None else None
        rows.append(f"| {task} | {s['metric']} | {s['value']:.4f} | {'-' if t is None else f'{t:.4f}'} |")
    rows.append(f"| **aggregate** | weighted | **{rec.aggregate:.4f}** | "
                f"{'-' if test is None else f'**{test.aggregate:.4f}**'} |")
    settings = dict(rec.settings)
    versions = settings.pop("versions", {})
    tasks = settings.pop("tasks", [])
    task_lines = [f"- `{t.get('name')}`: {t.get('kind')} `{t.get('source')}`, metric {t.get('metric')}, "
                  f"limit {t.get('limit')}, few-shot {t.get('num_fewshot')}, weight {t.get('weight')}" for t in tasks]
    mk = (f"```yaml\n{mergekit_text}```" if mergekit_text is not None
          else f"Not expressible in mergekit: {mergekit_reason}")
    front = ["---", "library_name: transformers", "tags:", "- merge", "- evomerge"]
    if base_ref and not base_ref.startswith("zoo:"):
        front += [f"base_model: {base_ref}"]
    front.append("---")
    return "\n".join([
        *front, "",
        f"# {run.name} candidate {rec.id}", "",
        f"Merged by evomerge (evolutionary model merging) from run `{run.name}`: method "
        f"`{rec.method}`, chosen from {_count(run)} evaluated candidates.", "",
        "## Scores", "", *rows, "",
        "Aggregate: weighted mean of task scores (minimized metrics negated); higher is better.", "",
        *([f"Stopped early by racing: scored on {rec.settings.get('race', {}).get('items', '?')} items of the "
           "search split; its search scores are those items' and its aggregate the paired estimate against the "
           f"candidate it raced (#{rec.settings.get('race', {}).get('bar')}).", ""] if rec.partial else []),
        "## Evaluation settings", "", *task_lines,
        f"- other settings: `{json.dumps(settings, sort_keys=True, default=str)}`",
        f"- versions: `{json.dumps(versions, sort_keys=True)}`", "",
        "## Lineage", "", *_lineage_lines(lineage, refs), "",
        "## Recipe", "", how, "",
        f"```yaml\n{recipe_text}```", "", "### mergekit", "", mk, "",
    ])


def _count(run: RunDir) -> int:
    with run.archive(readonly=True) as archive:
        return archive.count()


def verify_export(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], candidate_id: int,
                  device: str = "cpu") -> tuple[float, float]:
    """(score of the exported folder loaded with plain transformers, the archive's score) on the search split.

    A candidate stopped by racing is compared on the items it saw (the aggregate of its archived task values on
    them), not on its estimate."""
    run = RunDir.open(run_dir)
    space = snapshot_space(run, check_models=False)
    with run.archive(readonly=True) as archive:
        rec = archive.get(candidate_id)
        seen = archive.items(candidate_id) if rec is not None and rec.partial else {}
    if rec is None:
        raise RunDirError(f"no candidate {candidate_id} in {run.path}")
    model = load_causal_lm(out_dir, device)
    subset = {task: [int(i) for i in it.index] for task, it in seen.items()} or None
    result = Evaluator(space.fitness, str(out_dir), device).score(model, "search", items=subset)
    if not result.ok:
        raise RunDirError(f"the exported model at {out_dir} failed to score: {result.error}")
    if not rec.partial:
        return result.aggregate, rec.aggregate
    archived = tuple(TaskScore(t, v["metric"], float(v["value"]), bool(v.get("higher_is_better", True)),
                               float(v.get("weight", 1.0))) for t, v in rec.scores.items())
    return result.aggregate, EvalResult.weighted_aggregate(archived)
