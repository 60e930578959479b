"""Prefect flows composing the tasks: hospital-finetune (the client side),
merge-and-evaluate (the server side) and the embedded multi-hospital demo."""

import tasks  # noqa: F401  (sets Prefect's local defaults before any flow module imports Prefect)
