"""Hugging Face model families, one module each: its config reader `read(r) -> dict`, its export writer
`config(ir, base, eps) -> dict` and its layout and tensor-naming data, registered by one line in each table
of configs.py, export.py and weights.py."""
