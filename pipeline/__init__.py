"""Orchestration: CLI, recipe schema, stage runner, run directory, tracking, data, stages."""
