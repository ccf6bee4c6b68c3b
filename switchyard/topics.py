"""Topic names, one place for both apps.

Every topic whose events change a run (plans, results, control) is keyed by
``run_id`` and has as many partitions as the ``runs`` table (docs/architecture.md rule 1).
"""

from __future__ import annotations

from typing import Final

__all__ = ["CONTROL", "DEADLETTER", "MONITORING", "PLANS", "RESULTS", "RUNS_TABLE", "TASKS", "TASK_CANCELS"]

PLANS: Final = "orchestrator.plans"
RESULTS: Final = "results.topic"
CONTROL: Final = "orchestrator.control"
TASKS: Final = "orchestrator.tasks.http"
TASK_CANCELS: Final = "orchestrator.tasks.cancel"
MONITORING: Final = "orchestrator.monitoring"
DEADLETTER: Final = "orchestrator.deadletter"
RUNS_TABLE: Final = "runs"
