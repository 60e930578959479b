"""The flows' names and entrypoints: what deployments, site files and workers call each flow.

Kept apart from the flows themselves, so that a command that only names a flow (``medvec hospital run``, ``join``,
``coordinator up``) does not import what the flow imports (torch, MLflow: 9 s of CPU).
"""

from __future__ import annotations

HOSPITAL_FLOW = "hospital-finetune"
EVALUATE_FLOW = "hospital-evaluate"
MERGE_FLOW = "merge-and-evaluate"

HOSPITAL_ENTRYPOINT = "flows/hospital_finetune.py:hospital_finetune"
EVALUATE_ENTRYPOINT = "flows/hospital_evaluate.py:hospital_evaluate"
MERGE_ENTRYPOINT = "flows/merge_and_evaluate.py:merge_and_evaluate"

__all__ = [
    "EVALUATE_ENTRYPOINT",
    "EVALUATE_FLOW",
    "HOSPITAL_ENTRYPOINT",
    "HOSPITAL_FLOW",
    "MERGE_ENTRYPOINT",
    "MERGE_FLOW",
]
