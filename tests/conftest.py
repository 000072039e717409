"""Shared pytest configuration: the local control plane and the operator process fixtures, the S3 server."""

pytest_plugins = ["tests.cluster_fixtures", "tests.operator_fixtures", "tests.s3_fixtures"]
