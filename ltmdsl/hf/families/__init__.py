"""Hugging Face model families, one module each (`<model_type>.py`): the config reader `read(r)` and, for the
families added since the first ones, the export writer `config(ir, base, eps)` and the family's layout and naming
data, registered with one line in each table of configs.py, export.py and weights.py."""
