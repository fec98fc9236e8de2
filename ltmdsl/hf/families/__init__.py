"""Hugging Face model families, one module per model_type: its config reader, its export and its layout data."""
