"""Pipeline steps; each module exposes ``run(args) -> dict`` (metrics for summary.json)."""
