"""FFN-skip benchmark: input-adaptive FFN skipping (FFN-SkipLLM) over skip ratios, against static dropping, random
skipping and early exit at the same ratio, with quality, realised ratios and measured vs ideal decode speed.

For every target ratio: calibrate an adaptive policy (threshold and k searched, cold regions from calibration),
then with the policy active: TriviaQA and NQ-open exact match and agreement with the dense model's answers (greedy
generation through lm-eval, batched), LAMBADA accuracy (text scored teacher-forced as if the policy had generated
it), the realised skip ratio in each, and decode tokens/s vs the dense model measured alternately in one process
on a real-text prompt, next to the ideal speed-up from the skipped multiply-accumulates (similarity checks and the
LM head counted). Baselines at ``--baselines-at``. Cells are appended to ``results.json`` as they finish, so an
interrupted run resumes.

    .venv/bin/python bench/ffnskip.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import cached_results, markdown_table, print_setup  # noqa: E402

BASELINES = ("static", "random", "early_exit")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--ratios", default="0.10,0.20,0.25,0.30,0.35")
    parser.add_argument("--baselines-at", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=0, help="generated tokens decoded densely (QA answers are short)")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration prompts")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="calibration prompt length")
    parser.add_argument("--calib-new-tokens", type=int, default=32, help="tokens generated per calibration prompt")
    parser.add_argument("--qa", default="triviaqa,nq_open")
    parser.add_argument("--qa-limit", type=int, default=100)
    parser.add_argument("--lambada-limit", type=int, default=200)
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity: evaluation windows")
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--speed-prompt", type=int, default=128)
    parser.add_argument("--speed-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "ffnskip"))
    return parser.parse_args()


def quality(handle, args, reference=None, lambada=True) -> dict:
    from sparseforge.evaluation.suite import evaluate

    qa = args.qa.split(",") if args.qa else []
    metrics = evaluate(handle, qa=qa, limit=args.qa_limit, reference=reference, progress=False)
    if lambada:
        scored = evaluate(handle, tasks=["lambada_openai"], limit=args.lambada_limit, progress=False)
        metrics["zero_shot"] = scored["zero_shot"]
        if "skip" in scored:
            metrics.setdefault("skip", {})["zero_shot"] = scored["skip"]["zero_shot"]
    return metrics


def speed_prompt(handle, args):
    from sparseforge.data.sources import load_corpus
    from sparseforge.data.windows import tokenize_corpus

    ids = tokenize_corpus(handle.tokenizer, load_corpus("default", "evaluation"))
    return ids[: args.speed_prompt].unsqueeze(0)


def measure_speed(dense, skipped, prompt, args) -> dict:
    from sparseforge.evaluation.speed import compare_speed
    from sparseforge.skip.cost import ideal_skip_speedup

    controller = skipped.skip
    controller.accounting.reset()
    measured = compare_speed({"dense": dense.model, "skip": skipped.model}, new_tokens=args.speed_new_tokens,
                             repeats=args.repeats, prompt_ids=prompt)
    accounting = controller.accounting.summary(controller.policy)
    context = args.speed_prompt + (args.speed_new_tokens + 1) / 2
    ideal = ideal_skip_speedup(skipped.adapter, controller.policy, accounting, context)
    results = measured["results"]
    decode = results["skip"]["decode_tokens_per_s"] / results["dense"]["decode_tokens_per_s"]
    return {"setup": measured["setup"], "decode_speedup": decode, "ideal_decode": ideal["decode"],
            "measured_over_ideal": decode / ideal["decode"], "ratio_in_speed_run": accounting["ratio"],
            "dense_decode_tokens_per_s": results["dense"]["decode_tokens_per_s"],
            "skip_decode_tokens_per_s": results["skip"]["decode_tokens_per_s"]}


def summarise(metrics: dict, dense: dict | None) -> dict:
    row = {"skip": metrics.get("skip")}
    for task, entry in (metrics.get("qa") or {}).items():
        row[f"{task}_em"] = entry["metrics"]["exact_match"]
        row[f"{task}_agreement"] = entry["metrics"].get("agreement_with_reference")
        if dense:
            dense_em = dense["qa"][task]["metrics"]["exact_match"]
            row[f"{task}_em_of_dense"] = entry["metrics"]["exact_match"] / dense_em if dense_em else None
    lambada = (metrics.get("zero_shot") or {}).get("lambada_openai")
    if lambada:
        row["lambada_acc"] = lambada["metrics"]["acc"]
    row["qa_predictions"] = {t: e["predictions"] for t, e in (metrics.get("qa") or {}).items()}
    return row


def main() -> None:
    import torch

    args = arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import sparseforge as sf
    from sparseforge.skip import SkipPolicy, calibrate_skip, install_policy, matched_baseline

    out = Path(args.out)
    results, save = cached_results(out)
    results["setup"] = print_setup(model=args.model, ratios=args.ratios, baselines_at=args.baselines_at,
                                   warmup=args.warmup, calibration={"nsamples": args.nsamples,
                                                                    "prompt_tokens": args.prompt_tokens,
                                                                    "new_tokens": args.calib_new_tokens},
                                   qa=args.qa, qa_limit=args.qa_limit, qa_prompt="plain-5shot, greedy, batch 32",
                                   lambada_limit=args.lambada_limit,
                                   perplexity={"windows": args.ppl_windows, "seqlen": args.ppl_seqlen}, speed={"prompt": args.speed_prompt,
                                                                            "new_tokens": args.speed_new_tokens,
                                                                            "repeats": args.repeats, "batch": 1},
                                   seed=args.seed)
    cells = results["cells"]

    dense = sf.load_model(args.model)
    skipped = sf.load_model(args.model)
    if "dense" not in cells:
        start = time.perf_counter()
        metrics = quality(dense, args)
        cells["dense"] = {**summarise(metrics, None), "seconds": round(time.perf_counter() - start, 1),
                          "reference": {"qa": metrics["qa"]}}
        save()
    reference = cells["dense"]["reference"]
    prompt = speed_prompt(dense, args)  # the same real-text prompt for every ratio
    policies = {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        name = f"adaptive {ratio:.2f}"
        if name in cells:
            policies[ratio] = SkipPolicy.model_validate(cells[name]["policy"])
            continue
        start = time.perf_counter()
        policy = calibrate_skip(skipped, ratio, warmup=args.warmup, nsamples=args.nsamples,
                                prompt_tokens=args.prompt_tokens, new_tokens=args.calib_new_tokens, seed=args.seed,
                                progress=False)
        calibrated = time.perf_counter() - start
        policies[ratio] = policy
        metrics = quality(skipped, args, reference)
        cells[name] = {**summarise(metrics, reference), "policy": policy.model_dump(mode="json"),
                       "speed": measure_speed(dense, skipped, prompt, args), "calibration_seconds": round(calibrated, 1),
                       "seconds": round(time.perf_counter() - start, 1)}
        save()
        print(name, json.dumps({k: v for k, v in cells[name].items() if k not in ("policy", "qa_predictions")}),
              flush=True)
    base = policies.get(args.baselines_at)
    for mode in BASELINES if base is not None else ():
        name = f"{mode} {args.baselines_at:.2f}"
        if name in cells:
            continue
        start = time.perf_counter()
        policy = matched_baseline(base, mode, seed=args.seed)
        install_policy(skipped, policy)
        metrics = quality(skipped, args, reference, lambada=mode != "early_exit")
        cells[name] = {**summarise(metrics, reference), "policy": policy.model_dump(mode="json"),
                       "seconds": round(time.perf_counter() - start, 1)}
        save()
        print(name, json.dumps({k: v for k, v in cells[name].items() if k not in ("policy", "qa_predictions")}),
              flush=True)
    add_perplexity(cells, dense, skipped, args)
    save()
    write_tables(results, out)


def add_perplexity(cells: dict, dense, skipped, args) -> None:
    """Perplexity of every cell that lacks it (text scored teacher-forced as if its policy had generated it);
    early exit has no teacher-forced reading (see ``SkipController.scoring``)."""
    from sparseforge.evaluation.suite import evaluate, prepare_evaluation
    from sparseforge.skip import SkipPolicy, install_policy

    windows, corpus = prepare_evaluation(dense, "default", args.ppl_seqlen, args.ppl_windows)
    for name, cell in cells.items():
        if "perplexity" in cell or (cell.get("policy") or {}).get("mode") == "early_exit":
            continue
        handle = dense
        if cell.get("policy"):
            install_policy(skipped, SkipPolicy.model_validate(cell["policy"]))
            handle = skipped
        metrics = evaluate(handle, windows, corpus, progress=False)
        cell["perplexity"] = metrics["perplexity"]["perplexity"]
        if cell.get("policy"):
            cell["skip"]["perplexity"] = metrics["skip"]["perplexity"]
        print(name, "perplexity", round(cell["perplexity"], 2), flush=True)


def _ratio(cell: dict, part: str) -> float | None:
    return ((cell.get("skip") or {}).get(part) or {}).get("ratio")


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_tables(results: dict, out: Path) -> None:
    cells = results["cells"]
    qa_tasks = [t for t in ("triviaqa", "nq_open") if f"{t}_em" in cells["dense"]]
    header = ["cell", "settings", "ratio in QA", "ratio in LAMBADA"]
    for task in qa_tasks:
        header += [f"{task} EM (% of dense)", f"{task} agreement"]
    header += ["LAMBADA acc", "perplexity (ratio there)", "ideal decode", "decode b1", "measured / ideal", "ratio in speed run"]
    rows = []
    for name, cell in cells.items():
        policy = cell.get("policy") or {}
        settings = "–"
        if policy.get("mode") == "adaptive":
            settings = (f"τ {policy['threshold']:.4f}, k {policy['k']}, cold {policy['cold_start']}+"
                        f"{policy['cold_end']}")
        elif policy.get("mode") == "static":
            settings = f"layers {policy['layers']}"
        elif policy.get("mode") == "random":
            settings = f"p {policy['probability']:.3f}"
        elif policy.get("mode") == "early_exit":
            settings = f"exit after layer {policy['exit_layer']}"
        row = [name, settings, _f(_ratio(cell, "qa")), _f(_ratio(cell, "zero_shot"))]
        for task in qa_tasks:
            share = cell.get(f"{task}_em_of_dense")
            row += [f"{cell[f'{task}_em']:.3f}" + (f" ({share:.0%})" if share is not None else ""),
                    _f(cell.get(f"{task}_agreement"))]
        speed = cell.get("speed") or {}
        ppl = cell.get("perplexity")
        ppl_text = "–" if ppl is None else f"{ppl:.2f}" + (f" ({_ratio(cell, 'perplexity'):.3f})"
                                                           if _ratio(cell, "perplexity") is not None else "")
        row += [_f(cell.get("lambada_acc")), ppl_text, _f(speed.get("ideal_decode")), _f(speed.get("decode_speedup")),
                _f(speed.get("measured_over_ideal"), 2), _f(speed.get("ratio_in_speed_run"))]
        rows.append(row)
    setup = results["setup"]
    text = ["# FFN skipping (FFN-SkipLLM) on the default model", "",
            f"Setup: `{json.dumps(setup)}`", "", markdown_table(header, rows), ""]
    (out / "results.md").write_text("\n".join(text))
    plot(results, out / "ffnskip.png")
    print("\n".join(text))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    fig, (quality_axis, where) = plt.subplots(1, 2, figsize=(12, 4.2))
    adaptive = [(n, c) for n, c in cells.items() if n.startswith("adaptive")]
    for task, marker in (("triviaqa", "o"), ("nq_open", "s")):
        points = [(_ratio(c, "qa"), c.get(f"{task}_agreement")) for _, c in adaptive]
        points = [p for p in points if None not in p]
        if points:
            quality_axis.plot(*zip(*points), marker=marker, label=f"adaptive: {task} agreement")
        for mode, color in (("static", "#d95f02"), ("random", "#7570b3"), ("early_exit", "#e7298a")):
            cell = next((c for n, c in cells.items() if n.startswith(mode)), None)
            if cell and cell.get(f"{task}_agreement") is not None:
                quality_axis.scatter([_ratio(cell, "qa")], [cell[f"{task}_agreement"]], marker=marker, color=color,
                                     label=f"{mode}: {task}")
    quality_axis.set_xlabel("realised skip ratio in QA generation")
    quality_axis.set_ylabel("answers equal to the dense model's")
    quality_axis.set_ylim(0, 1.05)
    quality_axis.legend(fontsize=7)
    for name, cell in adaptive:
        per_layer = ((cell.get("skip") or {}).get("qa") or {}).get("per_layer")
        if per_layer:
            where.plot(range(len(per_layer)), per_layer, marker=".", label=name)
    where.set_xlabel("layer")
    where.set_ylabel("share of generated tokens skipping the FFN")
    where.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
