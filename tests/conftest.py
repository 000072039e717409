"""Shared pytest configuration: the local control plane and the operator process fixtures."""

pytest_plugins = ["tests.cluster_fixtures", "tests.operator_fixtures"]
