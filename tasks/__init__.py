"""Thin Prefect tasks over the medvec core: retries on I/O, no logic of their own."""
