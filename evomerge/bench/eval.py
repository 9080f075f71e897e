"""`evomerge bench eval`: evomerge's Evaluator against lm_eval.simple_evaluate per candidate.

The peer way (mergekit-evolve) calls ``lm_eval.simple_evaluate`` for every candidate: tasks are re-loaded and
requests re-built each time (mergekit passes one TaskManager, so we do too). evomerge builds the task objects
once and calls ``evaluate`` on them. Both run the same lm-eval task YAMLs on the same in-memory model whose
weights are rewritten in place per candidate, and must give the same scores. Also reported: the built-in
(no lm-eval) fitness, and the fraction of evaluator time spent outside model forward passes. Two settings:
the demo zoo, and a ~250M-parameter Llama-shaped model with random weights and the zoo's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from evomerge.atomic import write_json_atomic
from evomerge.fitness.evaluator import Evaluator, set_offline_env
from evomerge.fitness.spec import FitnessSpec
from evomerge.zoo.build import MODEL_NAMES, SPECIALISTS, ensure_zoo, lm_eval_task_name

NAME = "eval"
HELP = "time evomerge's Evaluator vs lm_eval.simple_evaluate per candidate (demo zoo and a ~250M model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo-size", choices=("micro", "demo"), default="demo", help="zoo to benchmark on")
    parser.add_argument("--candidates", type=int, default=5, help="candidates per setting (zoo models, cycled)")
    parser.add_argument("--limit", type=int, default=None, help="rows per task on the zoo (default: all)")
    parser.add_argument("--big-limit", type=int, default=16, help="rows per task on the ~250M model")
    parser.add_argument("--big-candidates", type=int, default=2, help="candidates on the ~250M model")
    parser.add_argument("--skip-big", action="store_true", help="skip the ~250M-parameter setting")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="batch size for every path (default 256: about one batch per zoo task)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def _big_model(vocab: int, tokenizer: Any, device: str) -> Any:
    """~250M parameters: Llama 20 x 1024 (16 heads, MLP 2816), random weights, the zoo's char vocabulary."""

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device).eval()


def _simple_evaluate(model: Any, tokenizer: Any, task_names: list[str], task_manager: Any, limit: int | None,
                     batch_size: int, max_gen_toks: int, device: str) -> dict[str, float]:
    """The peer path: a fresh HFLM and simple_evaluate per candidate (mergekit-evolve's call)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=model.config.max_position_embeddings)
    res = lm_eval.simple_evaluate(model=lm, tasks=task_names, log_samples=False, verbosity="WARNING",
                                  task_manager=task_manager, limit=limit,
                                  gen_kwargs={"max_gen_toks": max_gen_toks, "do_sample": False})
    return {t: float(res["results"][t]["exact_match,none"]) for t in task_names}


def _bench_setting(label: str, model: Any, states: list[dict[str, Any]], tokenizer: Any, zoo: Path,
                   limit: int | None, device: str, batch_size: int) -> dict[str, Any]:
    import lm_eval.tasks

    update = {"limit": limit, "batch_size": batch_size}
    lm_spec = FitnessSpec.from_yaml(zoo / "fitness_lmeval.yaml").model_copy(update=update)
    bi_spec = FitnessSpec.from_yaml(zoo / "fitness.yaml").model_copy(update=update)
    task_names = [lm_eval_task_name(s, "search") for s in SPECIALISTS]

    t0 = time.perf_counter()
    ev_lm = Evaluator(lm_spec, tokenizer, device=device)
    setup_lm = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev_bi = Evaluator(bi_spec, tokenizer, device=device)
    setup_bi = time.perf_counter() - t0
    t0 = time.perf_counter()
    tm = lm_eval.tasks.TaskManager(include_path=str(zoo / "tasks"), include_defaults=False)
    setup_peer = time.perf_counter() - t0

    rows = []
    print(f"\n== {label}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(states)} candidates, limit {limit or 'all'} rows/task, 4 lm-eval generate_until tasks, "
          f"batch size {batch_size}")
    print(f"   setup: evomerge lm-eval {setup_lm:.2f}s, built-in {setup_bi:.2f}s, peer TaskManager {setup_peer:.2f}s")
    print(f"   {'cand':>4} {'simple_evaluate':>15} {'evomerge lm-eval':>16} {'ratio':>6} {'outside fwd':>11}"
          f" {'built-in':>9} {'ratio':>7} {'outside fwd':>11}  scores agree")
    for i, state in enumerate(states):
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(state[k])
        t0 = time.perf_counter()
        peer = _simple_evaluate(model, tokenizer, task_names, tm, limit, lm_spec.batch_size, lm_spec.max_gen_toks,
                                device)
        t_peer = time.perf_counter() - t0
        t0 = time.perf_counter()
        r_lm = ev_lm.score(model)
        t_lm = time.perf_counter() - t0
        t0 = time.perf_counter()
        r_bi = ev_bi.score(model)
        t_bi = time.perf_counter() - t0
        if not (r_lm.ok and r_bi.ok):
            raise RuntimeError(f"evaluation failed: {r_lm.error or r_bi.error}")
        ours = {lm_eval_task_name(t.task, "search"): t.value for t in r_lm.tasks}
        agree = all(abs(ours[k] - peer[k]) < 1e-9 for k in peer)
        bi_em = {lm_eval_task_name(t.task, "search"): t.value for t in r_bi.tasks}
        agree_bi = all(abs(bi_em[k] - peer[k]) < 1e-9 for k in peer)
        row = {
            "candidate": i, "simple_evaluate_s": t_peer, "evomerge_lmeval_s": t_lm, "builtin_s": t_bi,
            "speedup_lmeval": t_peer / t_lm, "speedup_builtin": t_peer / t_bi,
            "outside_forward_lmeval": 1 - r_lm.forward_seconds / r_lm.seconds,
            "outside_forward_builtin": 1 - r_bi.forward_seconds / r_bi.seconds,
            "scores_agree": agree, "builtin_agrees": agree_bi, "mean_exact_match": r_lm.aggregate,
        }
        rows.append(row)
        print(f"   {i:>4} {t_peer:>14.2f}s {t_lm:>15.2f}s {row['speedup_lmeval']:>5.1f}x "
              f"{row['outside_forward_lmeval']:>10.1%} {t_bi:>8.3f}s {row['speedup_builtin']:>6.0f}x "
              f"{row['outside_forward_builtin']:>10.1%}  {agree}/{agree_bi} (mean EM {r_lm.aggregate:.3f})")
    # the first candidate pays one-off costs (HFLM construction, lazy imports): report steady state too
    steady = rows[1:] or rows
    summary = {
        "label": label, "setup_s": {"evomerge_lmeval": setup_lm, "builtin": setup_bi, "peer_taskmanager": setup_peer},
        "rows": rows,
        "mean_simple_evaluate_s": sum(r["simple_evaluate_s"] for r in steady) / len(steady),
        "mean_evomerge_lmeval_s": sum(r["evomerge_lmeval_s"] for r in steady) / len(steady),
        "mean_builtin_s": sum(r["builtin_s"] for r in steady) / len(steady),
        "outside_forward_lmeval": sum(r["outside_forward_lmeval"] for r in steady) / len(steady),
        "outside_forward_builtin": sum(r["outside_forward_builtin"] for r in steady) / len(steady),
    }
    summary["speedup_lmeval"] = summary["mean_simple_evaluate_s"] / summary["mean_evomerge_lmeval_s"]
    summary["speedup_builtin"] = summary["mean_simple_evaluate_s"] / summary["mean_builtin_s"]
    print(f"   steady state (candidates 1..): simple_evaluate {summary['mean_simple_evaluate_s']:.2f}s, "
          f"evomerge lm-eval {summary['mean_evomerge_lmeval_s']:.2f}s ({summary['speedup_lmeval']:.1f}x faster, "
          f"{summary['outside_forward_lmeval']:.1%} outside forward), built-in "
          f"{summary['mean_builtin_s']:.3f}s ({summary['speedup_builtin']:.0f}x faster, "
          f"{summary['outside_forward_builtin']:.1%} outside forward)")
    return summary


def run(args: argparse.Namespace) -> int:
    set_offline_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    zoo = ensure_zoo(args.zoo_size)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo / "base"), local_files_only=True)

    def load(name: str) -> Any:
        return AutoModelForCausalLM.from_pretrained(str(zoo / name), dtype=torch.float32,
                                                    local_files_only=True).to(args.device).eval()

    model = load("base")
    states = [{k: v.clone() for k, v in load(MODEL_NAMES[i % len(MODEL_NAMES)]).state_dict().items()}
              for i in range(args.candidates)]
    results = {"device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "zoo": _bench_setting(f"{args.zoo_size} zoo", model, states, tokenizer, zoo, args.limit,
                                     args.device, args.batch_size)}
    if not args.skip_big:
        big = _big_model(len(tokenizer), tokenizer, args.device)
        gen = torch.Generator().manual_seed(1)
        big_states = []
        for _ in range(args.big_candidates):  # random perturbations stand in for merged candidates
            big_states.append({k: v + 0.01 * torch.randn(v.shape, generator=gen).to(v.device)
                               for k, v in big.state_dict().items()})
        results["big"] = _bench_setting("~250M Llama (random weights)", big, big_states, tokenizer, zoo,
                                        args.big_limit, args.device, args.batch_size)
    print("\nsummary (steady state per candidate):")
    for s in results.values():
        if isinstance(s, dict):
            print(f"  {s['label']}: evomerge lm-eval {s['speedup_lmeval']:.1f}x faster than simple_evaluate, "
                  f"{s['outside_forward_lmeval']:.1%} of its time outside forward passes; built-in fitness "
                  f"{s['speedup_builtin']:.0f}x faster, {s['outside_forward_builtin']:.1%} outside forward")
    if args.json:
        write_json_atomic(Path(args.json), results)
    print(json.dumps({k: round(v, 3) for k, v in results["zoo"].items() if isinstance(v, float)}))
    return 0
