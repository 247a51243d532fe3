"""One router per resource: models, datasets, jobs, artifacts, health."""
