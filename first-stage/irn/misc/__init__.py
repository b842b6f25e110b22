"""Shared helpers of the first stage (optimiser, seeding, ...)."""
