"""Storage of uploads and artifacts (fsspec) and records of models, datasets and jobs (Redis).

Shared by the API and the workers; torch-free (enforced by import-linter).
"""
