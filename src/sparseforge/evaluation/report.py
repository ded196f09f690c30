"""Run reports: ``report.json`` (machine-readable), ``report.md`` (for people) and the per-layer sparsity plot."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..stages import stage_specs  # noqa: E402

SPARSITY_PLOT = "sparsity_per_layer.png"
LOSS_PLOT = "retrain_loss.png"
STRUCTURE_PLOT = "structure.png"
DIVERGENCE_PLOT = "finercut_divergence.png"
STRUCTURAL_STAGES = ("shrink", "finercut")
SKIP_PLOT = "skip_profile.png"
EXPERTS_PLOT = "expert_usage.png"
SEARCH_PLOT = "search_front.png"


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and peak GPU memory, if a GPU was used)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return round(peak, 1)


def versions() -> dict:
    import safetensors
    import transformers

    from .. import __version__

    return {"sparseforge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def plot_layer_sparsity(per_layer: list[dict], path: Path, title: str) -> None:
    roles = list(dict.fromkeys(r["role"] for r in per_layer))
    fig, ax = plt.subplots(figsize=(max(6.0, len(per_layer) * 0.05 + 4), 3.5))
    colors = plt.get_cmap("tab10")
    for i, role in enumerate(roles):
        xs = [j for j, r in enumerate(per_layer) if r["role"] == role]
        ax.bar(xs, [per_layer[j]["sparsity"] for j in xs], width=1.0, color=colors(i % 10), label=role)
    blocks = sorted({r["block"] for r in per_layer})
    step = max(1, len(blocks) // 15)
    ticks = [next(j for j, r in enumerate(per_layer) if r["block"] == b) for b in blocks[::step]]
    ax.set_xticks(ticks, [str(b) for b in blocks[::step]])
    ax.set_xlabel("decoder block (linears in forward order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(ncol=min(len(roles), 7), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_curves(stages: list[dict]) -> dict[str, list[float]]:
    curves = {}
    for index, stage in enumerate(stages):
        if stage.get("stage") == "retrain":
            runs = stage.get("rounds") or [stage["training"]]
            curves[f"stage {index}: {stage['method']}"] = [loss for run in runs for loss in run["losses"]]
        elif stage.get("stage") == "factorize":
            curves.update({f"stage {index}: {part}": losses for part, losses in stage["losses"].items()})
    return {name: losses for name, losses in curves.items() if losses}


def plot_losses(curves: dict[str, list[float]], path: Path) -> None:
    """Training loss per step of every retrain stage (IMP rounds joined), so a diverging run is seen at a glance."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _metric_rows(report: dict) -> list[tuple[str, object, object]]:
    before, after = report["metrics"].get("before") or {}, report["metrics"].get("after") or {}

    def get(d: dict, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    rows = [("perplexity", get(before, "perplexity", "perplexity"), get(after, "perplexity", "perplexity")),
            ("sparsity of prunable linears", get(before, "sparsity"), get(after, "sparsity")),
            ("parameters", get(before, "parameters", "total"), get(after, "parameters", "total")),
            ("nonzero parameters", get(before, "parameters", "nonzero"), get(after, "parameters", "nonzero"))]
    if get(after, "speed"):
        rows += [("prefill tokens/s", get(before, "speed", "prefill_tokens_per_s"), get(after, "speed", "prefill_tokens_per_s")),
                 ("decode tokens/s", get(before, "speed", "decode_tokens_per_s"), get(after, "speed", "decode_tokens_per_s"))]
    for part, summary in (get(after, "skip") or {}).items():
        if isinstance(summary, dict):
            rows.append((f"FFN blocks skipped ({part})", None, summary["ratio"]))
    speed_skip = get(after, "speed", "skip")
    if speed_skip:
        rows.append(("FFN blocks skipped (speed run)", None, speed_skip["ratio"]))
    return rows


def _retrain_lines(stage: dict) -> list[str]:
    """Recovery training: what was trained, how much of the model that is, the loss, memory, and any early stop."""
    trainable = stage["trainable"]
    what = "+".join(stage.get("params") or []) or "all parameters"
    lora = stage.get("lora")
    lines = [f"- trained: {what}" + (f" (LoRA {lora['variant']}, rank {lora['rank']}, alpha {lora['alpha']:g})"
                                     if lora else "") +
             f": {trainable['trainable']:,} parameters, {trainable['fraction']:.4%} of the model"]
    train = stage["train"]
    lines.append(f"- {train['steps']} steps x {train['batch']} windows x {train['seqlen']} tokens, lr {train['lr']:g}, "
                 f"warm-up {train['warmup']:.0%} then linear decay, {stage['seconds']:.1f} s")
    for run in stage.get("rounds") or [stage.get("training")]:
        prefix = f"round {run['round']} (sparsity {run['sparsity']:.3f}): " if "round" in run else ""
        lines.append(f"- {prefix}loss {_fmt(run['loss_first'], 4)} -> {_fmt(run['loss_last'], 4)}, peak memory "
                     f"while training {run['peak_memory_mb']:.0f} MB")
        if run.get("stopped"):
            lines.append(f"- **stopped early**: {run['stopped']}")
    if "merge" in stage:
        merge = stage["merge"]
        lines.append(f"- adapters merged into {merge['layers']} linears" +
                     (", LM head untied from the input embedding" if merge["lm_head_untied"] else "") +
                     (f"; {merge['densified_layers']} layers became dense (plain LoRA)" if merge["densified_layers"]
                      else ""))
    lines.append(f"- sparsity pattern preserved exactly: {'yes' if stage['sparsity_preserved'] else 'no'}")
    lines += [f"- note: {note}" for note in trainable.get("notes", [])]
    return lines


def _structure_lines(stage: dict) -> list[str]:
    """A structural change: parameters before and after, what was removed, and how the export loads."""
    params = stage["parameters"]
    lines = [f"- parameters {params['before']:,} -> {params['after']:,} ({params['removed_fraction']:.1%} removed), "
             f"{stage['seconds']:.1f} s"]
    if stage["method"] == "width":
        settings = stage["settings"]
        lines.append(f"- removed FFN {settings['ffn']} and heads {settings['heads']} (score {settings['score']}, "
                     f"widths rounded to {settings['round_to']}, head unit {settings['head_unit']}"
                     f"{', mean contribution compensated' if settings['compensate'] else ''})")
    else:
        order = ", ".join(f"{r['kind']}@{r['block']}" for r in stage["removed"])
        lines.append(f"- removed in this order: {order or 'nothing'}")
    lines.append("- export loads with plain transformers `from_pretrained`" if stage["transformers_loadable"] else
                 "- per-block shapes differ from the standard config: the export records them in `config.json` "
                 "(`sparseforge_structure`) and `sparseforge.load_model` rebuilds them")
    return lines


def _skip_lines(stage: dict, after: dict) -> list[str]:
    """A calibrated FFN-skip policy: its settings, how well calibration hit the target, what it skipped here."""
    policy = stage["policy"]
    calibration = policy["calibration"]
    lines = [f"- policy: {policy['mode']}, threshold {policy['threshold']:.4f}, k {policy['k']}, "
             f"{policy['similarity']} similarity, cold layers {policy['cold_start']} + {policy['cold_end']}, "
             f"warm-up {policy['warmup']} tokens ({stage['seconds']:.1f} s)",
             f"- target ratio {calibration['target']:g}: {calibration['ratio_teacher_forced']:.3f} on the "
             f"calibration text, {calibration['ratio_in_generation']:.3f} when generating from its prompts; "
             f"top-1 agreement with the dense model there {calibration['agreement']:.3f}",
             "- candidates: " + "; ".join(f"k {c['k']} cold {c['cold_start']}+{c['cold_end']}: threshold "
                                          f"{c['threshold']:.4f}, ratio {c['ratio']:.3f}, KL {c['kl']:.3f}, "
                                          f"agreement {c['agreement']:.3f}" for c in calibration["candidates"])]
    for part, summary in (after.get("skip") or {}).items():
        if isinstance(summary, dict):
            lines.append(f"- realised in {part}: {summary['ratio']:.3f} of all FFN blocks over "
                         f"{summary['governed_tokens']:,} governed tokens ({summary['warmup_tokens']:,} warm-up "
                         f"tokens dense)")
    return lines


def _experts_lines(stage: dict, after: dict) -> list[str]:
    """A factorized model: its experts, the training budget and losses, the ideal speed-up, how balanced routing is."""
    settings, training = stage["settings"], stage["settings"]["training"]
    cost = stage["cost"]
    lines = [f"- {settings['experts']} experts ({'1 shared + ' if settings['shared_expert'] else ''}top-"
             f"{settings['topk']} routed), {settings['partition']} partition ({stage['seconds']:.1f} s)",
             f"- training: {training['router_steps']} router steps (lr {training['router_lr']:g}) + "
             f"{training['expert_steps']} expert steps (lr {training['expert_lr']:g}) x {training['batch']} x "
             f"{training['seqlen']} tokens = {training['train_tokens']:,} tokens"]
    for part, losses in stage["losses"].items():
        if losses:
            lines.append(f"- {part} loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    lines.append(f"- FFN multiply-accumulates per token: {cost['ffn_macs_per_token']['dense'] / 1e6:.1f}M dense -> "
                 f"{cost['ffn_macs_per_token']['routed'] / 1e6:.1f}M routed; ideal speed-up prefill "
                 f"{cost['prefill']:.2f}x, decode {cost['decode']:.2f}x (prompt {cost['prompt_tokens']}, "
                 f"{cost['new_tokens']} new tokens)")
    usage = after.get("experts")
    if usage:
        balance = [b for b in usage["balance"] if b is not None]
        if balance:
            lines.append(f"- routing balance over the evaluation (1 = even): mean {sum(balance) / len(balance):.2f}, "
                         f"worst layer {min(balance):.2f}")
    return lines


def _dst_lines(stage: dict) -> list[str]:
    """Sparse training: where it started, how many topology updates rewired how many weights, the loss."""
    start = "from scratch (re-initialised)" if stage["from_scratch"] else "from the loaded weights"
    return [f"- {stage['init']} masks at density {stage['density']:.3f}, {start}",
            f"- {stage['steps_done']} steps, {stage['updates']} topology updates rewiring {stage['rewired']:,} weights "
            f"({stage['seconds']:.1f} s)",
            f"- loss {stage['loss_first']} -> {stage['loss_last']}"]


def _search_lines(stage: dict) -> list[str]:
    """The search: its cost, its front next to the uniform allocations, OWL, and the point kept."""
    counts = stage["evaluations"]
    objective = stage["objective"]
    cache = stage["cache"]
    lines = [f"- objective: {objective['quality']} on {objective['windows']} windows x {objective['seqlen']} tokens; "
             f"size: {objective['size']}",
             f"- {counts['full_model_evaluations']} full-model evaluations ({counts['full_model_tokens']:,} tokens), "
             f"by kind {counts['by_kind']}; {stage['seconds']:.0f} s in all"
             + (f", {stage['workers']} Ray workers" if stage.get("workers") else ", serial"),
             f"- variant cache {cache['directory']}: {cache['used_bytes'] / 2**20:.1f} MB of "
             f"{cache['budget_bytes'] / 2**20:.0f} MB, {cache['evicted']} evicted", ""]
    uniform = {round(p["average_sparsity"], 6): p["kl"] for p in stage["uniform"]}
    lines += ["| average sparsity | KL to dense | uniform at the same sparsity | per-block sparsities |",
              "|---|---|---|---|"]
    for point in stage["front"]:
        same = uniform.get(round(point["average_sparsity"], 6))
        lines.append(f"| {point['average_sparsity']:.4f} | {point['kl']:.4f} | {'-' if same is None else f'{same:.4f}'}"
                     f" | {' '.join(f'{s:.2f}' for s in point['sparsities'])} |")
    if stage.get("owl"):
        owl = stage["owl"]
        lines += ["", f"- OWL at {owl['average_sparsity']:.4f} (M={owl['m']:g}, lambda={owl['lam']:g}): KL {owl['kl']:.4f}"]
    picked = stage.get("picked")
    if picked:
        lines.append(f"- kept: the point at average sparsity {picked['average_sparsity']:.4f} (asked for "
                     f"{picked['target']:g}), KL {picked['kl']:.4f}")
    return lines + ["", f"![Pareto front]({SEARCH_PLOT})"]


def _stage_lines(stages: list[dict], after: dict | None = None) -> list[str]:
    """What each stage did: method, calibration, per-block sparsities, and anything it had to work around."""
    lines = []
    specs = stage_specs()
    for index, stage in enumerate(stages):
        spec = specs.get(stage.get("stage"))
        if spec is not None and spec.report is not None:  # a stage that renders its own section
            lines += ["", f"## Stage {index}: {stage['stage']}", ""] + spec.report(stage, after or {})
            continue
        if stage.get("stage") == "retrain":
            lines += ["", f"## Stage {index}: retrain ({stage['method']})", ""] + _retrain_lines(stage)
            continue
        if stage.get("stage") == "skip":
            lines += ["", f"## Stage {index}: FFN skipping ({stage['method']})", ""] + _skip_lines(stage, after or {})
            lines += ["", f"![where FFNs are skipped]({SKIP_PLOT})"]
            continue
        if stage.get("stage") == "factorize":
            lines += ["", f"## Stage {index}: factorized into experts ({stage['method']})", ""]
            lines += _experts_lines(stage, after or {}) + ["", f"![expert usage per layer]({EXPERTS_PLOT})"]
            continue
        if stage.get("stage") in STRUCTURAL_STAGES:
            lines += ["", f"## Stage {index}: {stage['stage']} ({stage['method']})", ""] + _structure_lines(stage)
            continue
        if stage.get("stage") == "dst":
            lines += ["", f"## Stage {index}: dynamic sparse training ({stage['method']})", ""] + _dst_lines(stage)
            continue
        if stage.get("stage") == "search":
            lines += ["", f"## Stage {index}: sparsity search ({stage['algorithm']}, "
                          f"{stage['settings']['method']} {stage['settings']['pattern']})", ""] + _search_lines(stage)
            continue
        if stage.get("stage") != "prune":  # a registered stage without a section of its own: its record as is
            lines += ["", f"## Stage {index}: {stage.get('stage')}", ""]
            lines += [f"- {key}: {value}" for key, value in stage.items() if key != "stage" and
                      isinstance(value, (str, int, float, bool))]
            continue
        title = f"{stage.get('method')} {stage.get('pattern')}, target sparsity {stage.get('target_sparsity'):g}"
        lines += ["", f"## Stage {index}: {stage.get('stage')} ({title})", ""]
        calibration = stage.get("calibration")
        if calibration:
            lines.append(f"- calibration: {calibration['windows']} windows x {calibration['seqlen']} tokens, "
                         f"order `{stage.get('order')}`, {stage.get('seconds', 0):.1f} s")
        if stage.get("allocation") == "owl" and stage.get("block_sparsity"):
            lines.append("- OWL block sparsities: " + ", ".join(f"{s:.3f}" for s in stage["block_sparsity"]))
        if stage.get("dsnot_swaps") is not None:
            lines.append(f"- DSnoT swaps: {stage['dsnot_swaps']:,}")
        if stage.get("resumed_from_block"):
            lines.append(f"- resumed from block {stage['resumed_from_block']} of an interrupted run")
        if stage.get("reconstruction"):
            rec = stage["reconstruction"]
            lines.append(f"- layer-wise reconstruction ({'+'.join(rec['settings']['params'])}, "
                         f"{rec['settings']['steps']} steps per block): summed block MSE "
                         f"{rec['mse_before_sum']:.4g} -> {rec['mse_after_sum']:.4g}")
        lines += [f"- event: {event}" for event in stage.get("events", [])]
    return lines


_HIGHER_IS_BETTER = ("acc", "acc_norm", "exact_match", "lm_eval_exact_match")


def task_rows(before: dict | None, after: dict) -> list[list[str]]:
    """Rows ``task, metric, before, after, retained`` for zero-shot and QA results.

    "Retained" is after / before for metrics where higher is better (the share of the dense model's score a
    compressed model keeps, as FactorLLM reports it); agreement with the reference only exists after.
    """
    rows = []
    for section in ("zero_shot", "qa"):
        for task, result in (after.get(section) or {}).items():
            reference = ((before or {}).get(section) or {}).get(task, {}).get("metrics", {})
            for metric, value in result["metrics"].items():
                if metric.endswith("_stderr"):
                    continue
                error = result["metrics"].get(f"{metric}_stderr")
                shown = _fmt(value, 4) + (f" ± {error:.4f}" if error is not None else "")
                old, old_error = reference.get(metric), reference.get(f"{metric}_stderr")
                old_shown = _fmt(old, 4) + (f" ± {old_error:.4f}" if old_error is not None else "")
                retained = f"{value / old:.1%}" if metric in _HIGHER_IS_BETTER and old else "–"
                rows.append([task, metric, old_shown, shown, retained])
    return rows


def task_section(before: dict | None, after: dict, labels: tuple[str, str] = ("before", "after")) -> list[str]:
    """Markdown for the task table, each task's split, items and time, and how it differs from lm-eval's hub task."""
    rows = task_rows(before, after)
    if not rows:
        return []
    lines = ["", "## Zero-shot tasks and knowledge QA", "", f"| task | metric | {labels[0]} | {labels[1]} | retained |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "| task | items | split | seconds | note |", "|---|---|---|---|---|"]
    for section in ("zero_shot", "qa"):
        for task, result in (after.get(section) or {}).items():
            extra = f" prompt `{result['prompt']}`." if "prompt" in result else ""
            lines.append(f"| {task} | {result['items']} of {result['items_available']} | {result['split']} | "
                         f"{result['seconds']} | {result['note']}{extra} |")
    lines += ["", "Scored with lm-evaluation-harness task definitions on offline data (see the notes); QA exact match "
                  "is SQuAD-normalised against any gold answer, lm-eval's own exact match is listed next to it."]
    return lines


def speed_sentence(setup: dict) -> str:
    machine = setup.get("machine") or {}
    where = f" ({machine.get('cpu')}, {machine.get('cpu_cores')} cores" + (f", {machine['gpu']}" if machine.get("gpu") else "") + ")"
    return (f"Speed: batch {setup['batch_size']}, prompt {setup['prompt_tokens']} tokens, {setup['new_tokens']} new "
            f"tokens (greedy, KV cache), {setup['threads']} threads, {setup['dtype']} on {setup['device']}"
            f"{where if machine else ''}, median of {setup['repeats']} after a warm-up; models measured alternately "
            "in the same process.")


def render_markdown(report: dict, recipe_yaml: str) -> str:
    lines = [f"# sparseforge run: {report['model']['source']}", ""]
    lines += ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(b)} | {_fmt(a)} |" for name, b, a in _metric_rows(report)]
    protocol = (report["metrics"].get("after") or {}).get("perplexity")
    if protocol:
        lines += ["", f"Perplexity protocol: {protocol['dataset']} ({protocol['split']}), {protocol['windows']} "
                      f"non-overlapping windows of {protocol['seqlen']} tokens ({protocol['tokens']:,} predicted "
                      f"tokens), BOS {protocol['bos']} (policy '{protocol.get('bos_policy', 'auto')}'), token-level "
                      "exp(mean NLL)."]
    speed = (report["metrics"].get("after") or {}).get("speed")
    if speed:
        lines += ["", speed_sentence(speed["setup"])]
    export = report.get("export")
    if export:
        lines += ["", f"Export: format `{export['format']}` ({export['dtype']}), weights {export['weight_bytes']:,} "
                      f"bytes, directory {export['directory_bytes']:,} bytes, in `model/`."]
    lines += task_section(report["metrics"].get("before"), report["metrics"].get("after") or {})
    lines += _stage_lines(report.get("stages") or [], report["metrics"].get("after"))
    if _loss_curves(report.get("stages") or []):
        lines += ["", f"![retraining loss]({LOSS_PLOT})"]
    structural = [s for s in report.get("stages") or [] if s.get("stage") in STRUCTURAL_STAGES]
    if structural:
        lines += ["", f"![structure per block]({STRUCTURE_PLOT})"]
    if any(s["method"] == "finercut" for s in structural):
        lines += ["", f"![FinerCut divergence]({DIVERGENCE_PLOT})"]
    lines += ["", f"![per-layer sparsity]({SPARSITY_PLOT})", "", "## Timings (s)", "",
              "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    lines += ["", f"Peak memory: {report['peak_memory_mb']:.0f} MB.", "", "## Recipe", "", "```yaml",
              recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def render_eval_markdown(report: dict) -> str:
    """The report of ``sparseforge eval``: one model, or a model next to its baseline measured in the same run."""
    lines = [f"# sparseforge eval: {report['model']['source']}", ""]
    if report.get("baseline") is not None:
        lines += [f"| metric | baseline ({report['baseline']['source']}) | {report['model']['source']} |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(b)} | {_fmt(a)} |" for name, b, a in _metric_rows(report)]
    else:
        lines += [f"| metric | {report['model']['source']} |", "|---|---|"]
        lines += [f"| {name} | {_fmt(a)} |" for name, _, a in _metric_rows(report)]
    protocol = report["metrics"]["after"].get("perplexity")
    if protocol:
        lines += ["", f"Perplexity protocol: {protocol['dataset']} ({protocol['split']}), {protocol['windows']} "
                      f"windows of {protocol['seqlen']} tokens, BOS {protocol['bos']} "
                      f"(policy '{protocol.get('bos_policy', 'auto')}'), token-level."]
    speed = report["metrics"]["after"].get("speed")
    if speed:
        lines += ["", speed_sentence(speed["setup"])]
    lines += task_section(report["metrics"]["before"], report["metrics"]["after"], ("baseline", "model"))
    lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["timings"].items()]
    lines += ["", f"Peak memory: {report['peak_memory_mb']:.0f} MB.", ""]
    return "\n".join(lines)


def _plot_structure(directory: Path, report: dict) -> None:
    from ..structured.plots import plot_divergence, plot_structure

    structural = [s for s in report.get("stages") or [] if s.get("stage") in STRUCTURAL_STAGES]
    if structural:
        last = structural[-1]
        plot_structure(last["blocks"], last["original"], directory / STRUCTURE_PLOT, report["model"]["source"])
    searched = [s for s in structural if s["method"] == "finercut"]
    if searched:
        plot_divergence(searched[-1]["removed"], directory / DIVERGENCE_PLOT, searched[-1]["settings"]["distance"])


def _plot_skip(directory: Path, report: dict) -> None:
    from ..skip.plots import plot_skip_profile

    skips = [s for s in report.get("stages") or [] if s.get("stage") == "skip"]
    if skips:
        measured = (report["metrics"].get("after") or {}).get("skip") or {}
        rates = {f"in {part}": s["per_layer"] for part, s in measured.items() if isinstance(s, dict)}
        plot_skip_profile(skips[-1]["policy"], rates, directory / SKIP_PLOT, report["model"]["source"])


def _plot_experts(directory: Path, report: dict) -> None:
    from ..moe.plots import plot_expert_usage

    usage = (report["metrics"].get("after") or {}).get("experts")
    if usage and usage["tokens"]:
        plot_expert_usage(usage["per_layer"], directory / EXPERTS_PLOT, f"{report['model']['source']}: "
                          f"{usage['settings']}")


def _plot_search(directory: Path, report: dict) -> None:
    from ..search.plots import plot_fronts

    searches = [s for s in report.get("stages") or [] if s.get("stage") == "search"]
    if searches:
        last = searches[-1]
        evopress = last["algorithm"] == "evopress"
        plot_fronts({} if evopress else {last["algorithm"]: last["front"]}, last["uniform"],
                    [last["owl"]] if last.get("owl") else [], last["front"] if evopress else [],
                    directory / SEARCH_PLOT, f"{report['model']['source']}: {last['algorithm']} "
                                             f"({last['settings']['method']})")


def write_report(directory: Path, report: dict, recipe_yaml: str) -> None:
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(report, indent=1))
    (directory / "recipe.yaml").write_text(recipe_yaml)
    per_layer = report["sparsity"]["per_layer"]
    if per_layer:
        plot_layer_sparsity(per_layer, directory / SPARSITY_PLOT,
                            f"{report['model']['source']}: overall {report['sparsity']['overall']:.1%}")
    curves = _loss_curves(report.get("stages") or [])
    if curves:
        plot_losses(curves, directory / LOSS_PLOT)
    _plot_structure(directory, report)
    _plot_skip(directory, report)
    _plot_experts(directory, report)
    _plot_search(directory, report)
    (directory / "report.md").write_text(render_markdown(report, recipe_yaml))
