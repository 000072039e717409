"""``qjob-operator``: runs the controller.

Every replica serves the probes (``healthPort``: /healthz, /readyz), metrics and the runners'
report endpoint (``reports.port``, HTTPS); with ``leaderElection.enabled`` only the holder of the
Lease runs the controller (kopf) and accepts reports, the others stand by (leader.py).
"""

# ruff: noqa: E402  (the client libraries are kept out before anything imports kopf)
from __future__ import annotations

import sys

# kopf imports the kubernetes and kubernetes_asyncio clients when they are installed (development
# virtualenvs have them), to recognise their objects and borrow their login; the operator uses
# neither (kube.py is plain REST with kopf's own login), and their generated models cost ~50 MiB.
# The `qjob` CLI, a separate process, still uses kubernetes_asyncio.
for _client in ("kubernetes", "kubernetes_asyncio"):
    sys.modules.setdefault(_client, None)

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable

import kopf
from aiohttp import web
from qjob_api.v1alpha1 import GROUP, PLURAL, VERSION

from .certificates import generate, shared_certificate
from .config import CONFIG_ENV, OperatorConfig, load_config
from .kube import ApiError, ApiSession, Kube, connect
from .leader import LeaderElector
from .metrics import Metrics
from .reconciler import Reconciler
from .reports import ReportServer
from .tokenreview import TokenReviewer

log = logging.getLogger("qjob_operator")


async def _probes(port: int, active: Callable[[], bool], listed: Callable[[], bool]) -> web.AppRunner:
    def state() -> dict[str, bool]:
        return {"ok": True, "active": active(), "listed": listed()}

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(state())

    async def readyz(_: web.Request) -> web.Response:
        # A standby is ready (to take over); the active replica once its caches are listed.
        now = state()
        return web.json_response(now, status=200 if not now["active"] or now["listed"] else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


#: How long readiness waits for kopf's first event when QuantizationJobs exist (bounded: a
#: namespace pattern may exclude every one of them).
LISTING_SECONDS = 30


async def _mark_listed(api: ApiSession, reconciler: Reconciler, namespaces: list[str]) -> None:
    """Readiness for a controller with nothing to list: kopf's first handler event says it has
    listed what it watches (handlers.py), but with no QuantizationJob there is none. Namespace
    patterns can exclude the jobs listed here, so waiting for an event is bounded."""
    paths = [f"/apis/{GROUP}/{VERSION}/{PLURAL}"]
    if namespaces and not any(set(n) & set("*?![]") for n in namespaces):
        paths = [f"/apis/{GROUP}/{VERSION}/namespaces/{n}/{PLURAL}" for n in namespaces]
    try:
        empty = True
        for path in paths:
            empty = empty and not (await api.request("GET", path, limit="1")).get("items")
    except ApiError as exc:
        log.warning("could not list QuantizationJobs for readiness: %s", exc)
        empty = False
    if not empty:
        deadline = time.monotonic() + LISTING_SECONDS
        while not reconciler.listed and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    reconciler.listed = True


async def run(config: OperatorConfig, namespaces: list[str]) -> int:
    api = await connect()
    metrics = Metrics()
    kube = Kube(api, metrics, config.status_writes_per_second)
    reports = config.reports
    if reports.tls_secret:
        certificate = await shared_certificate(kube, config.operator_namespace, reports.tls_secret, reports.url)
    else:
        certificate = generate(reports.url)
    reports.ca_cert = certificate.ca_pem
    reconciler = Reconciler(config, kube, metrics)
    metrics.watch_phases(reconciler.phases)
    metrics.serve(config.metrics_port)

    election = config.leader_election
    elector = None
    if election.enabled:
        identity = f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        elector = LeaderElector(kube, config.operator_namespace, identity, election)
    controller_started = asyncio.Event()

    def active() -> bool:
        return controller_started.is_set() and (elector is None or elector.is_leader)

    server = ReportServer(
        TokenReviewer(kube.review_token, reports.audience),
        reconciler.stage_of,
        reconciler.receive_report,
        active,
        lambda outcome: metrics.reports.labels(outcome).inc(),
    )
    await server.start("0.0.0.0", reports.port, certificate.server_context())
    probes = await _probes(config.health_port, active, lambda: reconciler.listed)
    log.info("metrics on :%d, probes on :%d, reports on :%d (%s)", config.metrics_port, config.health_port,
             reports.port, reports.url)  # fmt: skip

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    node_watch = listing = None
    try:
        if elector:
            acquiring = asyncio.create_task(elector.acquire())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                acquiring.cancel()
                return 0
        # Fit must see every node before the first reconcile (or it would say NoMatchingNodes).
        nodes_synced = asyncio.Event()
        node_watch = asyncio.create_task(kube.list_and_watch("/api/v1/nodes", reconciler.node_event, nodes_synced))
        synced, stopping = asyncio.create_task(nodes_synced.wait()), asyncio.create_task(stop.wait())
        await asyncio.wait({synced, stopping}, return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopping.cancel()
        if stop.is_set():
            return 0
        controller_started.set()
        listing = asyncio.create_task(_mark_listed(api, reconciler, namespaces))
        controller = asyncio.create_task(
            kopf.operator(
                standalone=True,  # one active replica at a time: the Lease decides, not kopf peering
                clusterwide=not namespaces,
                namespaces=namespaces,
                memo=kopf.Memo(reconciler=reconciler),
                stop_flag=stop,
            )
        )
        waits = {controller}
        if elector:
            waits.add(asyncio.create_task(elector.hold()))
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if controller not in done:
            # Lost the Lease: another replica may be active already. Stop at once; the pod
            # restarts as a candidate (client-go's leader election exits the same way).
            controller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await controller
            code = 1
        else:
            controller.result()
    finally:
        if node_watch:
            node_watch.cancel()
        if listing:
            listing.cancel()
        if elector and code == 0:
            await elector.release()
        await server.stop()
        await probes.cleanup()
        await api.close()
    return code


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
        os.environ[CONFIG_ENV] = args.config
    config = load_config()
    namespaces = args.namespace or config.namespaces
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    if not args.verbose:
        # kopf logs every handler call ("Handler ... succeeded"): thousands a minute at scale.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  registers the handlers

    sys.exit(asyncio.run(run(config, namespaces)))


if __name__ == "__main__":
    main()
