"""The first stage (IRN): image-level labels to pseudo-labels and confidence masks, one step per
file under step/, run in order by run_sample.py. Installed as the package `irn` (pyproject.toml)."""
