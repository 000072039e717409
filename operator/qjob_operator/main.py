"""``qjob-operator``: runs the controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

from .config import CONFIG_ENV, load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qjob-operator", description="Runs the QuantizationJob controller.")
    parser.add_argument(
        "--config", help=f"operator config file (default: ${CONFIG_ENV} or /etc/qjob-operator/config.yaml)"
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="namespace to watch (repeatable); default: the config's, else all",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.config:
        os.environ[CONFIG_ENV] = args.config  # the startup handler reads it from there
    config = load_config()
    namespaces = args.namespace or config.namespaces
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    if not args.verbose:
        # kopf logs every handler call ("Handler ... succeeded"): thousands a minute at scale.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  registers the handlers

    # One replica, no peering: the chart deploys it with strategy Recreate.
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
        )
    )


if __name__ == "__main__":
    main()
