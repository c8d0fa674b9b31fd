"""Manifests: pydantic row schemas, Arrow schemas and validated Parquet I/O through fsspec (no torch, no ray)."""
