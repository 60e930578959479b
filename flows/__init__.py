"""Prefect flows composing the tasks: hospital-finetune (the client side),
merge-and-evaluate (the server side) and the embedded multi-hospital demo."""
