"""Shared pytest configuration (the lead extends this)."""

pytest_plugins = ["tests.cluster_fixtures"]
