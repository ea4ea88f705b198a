"""Quality study on MovieLens-100k: baselines trained and evaluated on the project's own split and metrics."""
