"""The Ray pipeline: prepare -> train (Ray Train) -> evaluate -> register (MLflow)."""
