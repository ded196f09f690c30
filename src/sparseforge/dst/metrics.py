"""Continual-learning metrics from an accuracy matrix A, A[i][j] = accuracy on task j after training task i.

* average accuracy: mean_j A[T-1][j] (the final model on every task);
* backward transfer (Lopez-Paz & Ranzato, 2017): mean_{j<T-1} (A[T-1][j] - A[j][j]); negative = forgetting, and
  exactly 0 when earlier tasks' weights are frozen;
* forward transfer: mean_{j>=1} (A[j-1][j] - b_j), with b_j the accuracy of the untrained network on task j; the
  entries above the diagonal are the network *before* it has seen task j (for per-task masks: the previous task's
  mask, as in the study's code), so this measures what earlier tasks give a new one for free;
* incremental accuracy: mean_{j<=i} A[i][j] after each task i;
* just-learned accuracy: mean_j A[j][j], each task right after training it (plasticity). With per-task masks and
  their own head rows, a task's rows are untrained before it starts, so the forward transfer above is 0 by
  construction under task scoring; comparing just-learned accuracy with a dense network per task is then the
  informative measure of what sharing frozen weights gives or costs a new task.
"""

from __future__ import annotations


def continual_metrics(matrix: list[list[float]], initial: list[float]) -> dict:
    tasks = len(matrix)
    last = matrix[-1]
    backward = [last[j] - matrix[j][j] for j in range(tasks - 1)]
    forward = [matrix[j - 1][j] - initial[j] for j in range(1, tasks)]
    return {"average_accuracy": sum(last) / tasks,
            "backward_transfer": sum(backward) / len(backward) if backward else 0.0,
            "forward_transfer": sum(forward) / len(forward) if forward else 0.0,
            "incremental_accuracy": [sum(matrix[i][:i + 1]) / (i + 1) for i in range(tasks)],
            "just_learned_accuracy": sum(matrix[j][j] for j in range(tasks)) / tasks}
