"""The HTTP API (FastAPI). Never imports torch: models are loaded only by workers."""
