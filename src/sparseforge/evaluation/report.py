"""Run reports: ``report.json`` (machine-readable), ``report.md`` (for people) and the per-layer sparsity plot."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..memory import peak_resident_mb  # noqa: E402
from ..stages import stage_specs  # noqa: E402

SPARSITY_PLOT = "sparsity_per_layer.png"
LOSS_PLOT = "retrain_loss.png"


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and peak GPU memory, if a GPU was used)."""
    peak = peak_resident_mb()
    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return round(peak, 1)


def versions() -> dict:
    import safetensors
    import transformers

    from ..version import __version__

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
    """Training losses of every stage that trains (its spec's ``loss_curves``), named by stage."""
    specs = stage_specs()
    curves = {}
    for index, stage in enumerate(stages):
        spec = specs.get(stage.get("stage"))
        if spec is not None and spec.loss_curves is not None:
            curves.update(spec.loss_curves(index, stage))
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


def format_value(value, digits: int = 3) -> str:
    """A number as reports show it: fixed digits, thousands separators for large ones, '–' for missing."""
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
    runtime = get(after, "runtime")
    if get(runtime, "speed"):
        mode = runtime["mode"]
        rows += [(f"decode tokens/s, {mode} runtime", None, get(runtime, "speed", "decode_tokens_per_s")),
                 (f"weight MiB read per token ({mode} runtime after)",
                  round(get(before, "speed", "weight_bytes_per_token") / 2**20, 1),
                  round(runtime["weight_bytes_per_token"] / 2**20, 1))]
    for part, summary in (get(after, "skip") or {}).items():
        if isinstance(summary, dict):
            rows.append((f"FFN blocks skipped ({part})", None, summary["ratio"]))
    speed_skip = get(after, "speed", "skip")
    if speed_skip:
        rows.append(("FFN blocks skipped (speed run)", None, speed_skip["ratio"]))
    return rows


def _stage_lines(stages: list[dict], after: dict | None = None) -> list[str]:
    """What each stage did, in the words of the stage that did it (its spec's ``report``); a stage without one is
    listed with the plain values of its record."""
    lines = []
    specs = stage_specs()
    for index, stage in enumerate(stages):
        spec = specs.get(stage.get("stage"))
        if spec is not None and spec.report is not None:
            title, section = spec.report(stage, after or {})
            lines += ["", f"## Stage {index}: {title}", ""] + section
            continue
        lines += ["", f"## Stage {index}: {stage.get('stage')}", ""]
        lines += [f"- {key}: {value}" for key, value in stage.items() if key != "stage" and
                  isinstance(value, (str, int, float, bool))]
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
                shown = format_value(value, 4) + (f" ± {error:.4f}" if error is not None else "")
                old, old_error = reference.get(metric), reference.get(f"{metric}_stderr")
                old_shown = format_value(old, 4) + (f" ± {old_error:.4f}" if old_error is not None else "")
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
    lines += [f"| {name} | {format_value(b)} | {format_value(a)} |" for name, b, a in _metric_rows(report)]
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
        lines += [f"| {name} | {format_value(b)} | {format_value(a)} |" for name, b, a in _metric_rows(report)]
    else:
        lines += [f"| metric | {report['model']['source']} |", "|---|---|"]
        lines += [f"| {name} | {format_value(a)} |" for name, _, a in _metric_rows(report)]
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
    # each stage kind draws its own figures from the report (one function may serve several kinds)
    for figures in dict.fromkeys(spec.figures for spec in stage_specs().values() if spec.figures is not None):
        figures(directory, report)
    (directory / "report.md").write_text(render_markdown(report, recipe_yaml))
