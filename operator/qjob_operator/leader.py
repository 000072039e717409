"""Leader election on a coordination.k8s.io Lease, with client-go's semantics.

Every replica runs the report and probe endpoints; only the Lease holder runs the controller.
The holder renews every ``retryPeriodSeconds``; a replica that cannot renew within
``renewDeadlineSeconds`` stops (the process exits and is restarted as a candidate), well before
the Lease expires for the others after ``leaseDurationSeconds``. Expiry is judged by the
candidate's own clock from when it last saw the record change (as client-go does), so clock skew
between nodes does not matter. Writes use the Lease's resourceVersion: two candidates never both
win. A graceful stop releases the Lease, so a rolling update fails over at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .config import LeaderElection
from .kube import ApiError, Kube

log = logging.getLogger(__name__)


def _micro_time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


MERGE_PATCH = "application/merge-patch+json"


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        identity: str,
        settings: LeaderElection,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kube = kube
        self.namespace, self.identity, self.settings, self.clock = namespace, identity, settings, clock
        self.is_leader = False
        self._observed: tuple[Any, float] | None = None  # (holder, renewTime) and when it changed

    def _spec(self, acquired: str | None, transitions: int) -> dict[str, Any]:
        now = _micro_time(datetime.now(UTC))
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.settings.lease_duration_seconds),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        name = self.settings.lease_name
        try:
            lease = await self.kube.lease("GET", self.namespace, name)
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": name, "namespace": self.namespace}, "spec": self._spec(None, 0)}
            try:
                await self.kube.lease("POST", self.namespace, body=body)
            except ApiError as exc2:
                if exc2.status == 409:
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        record = (holder, spec.get("renewTime"))
        now = self.clock()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        held_by_other = holder not in (None, "", self.identity)
        duration = spec.get("leaseDurationSeconds") or self.settings.lease_duration_seconds
        if held_by_other and now < self._observed[1] + duration:
            return False
        ours = holder == self.identity
        transitions = (spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        body = {
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": self._spec(spec.get("acquireTime") if ours else None, transitions),
        }
        try:
            await self.kube.lease("PUT", self.namespace, name, body)
        except ApiError as exc:
            if exc.status == 409:  # someone else wrote it first
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Returns once this replica holds the Lease."""
        log.info("standing by for Lease %s/%s as %s", self.namespace, self.settings.lease_name, self.identity)
        while True:
            try:
                if await self.try_acquire_or_renew():
                    self.is_leader = True
                    log.info("acquired Lease %s/%s: this replica is active", self.namespace, self.settings.lease_name)
                    return
            except (ApiError, OSError) as exc:
                log.warning("Lease %s/%s: %s", self.namespace, self.settings.lease_name, exc)
            await asyncio.sleep(self.settings.retry_period_seconds)

    async def hold(self) -> None:
        """Renews the Lease; returns when it could not be renewed within the renew deadline."""
        last = self.clock()
        while True:
            await asyncio.sleep(self.settings.retry_period_seconds)
            try:
                renewed = await asyncio.wait_for(self.try_acquire_or_renew(), self.settings.renew_deadline_seconds)
            except (ApiError, TimeoutError, OSError) as exc:
                log.warning("renewing Lease %s/%s failed: %s", self.namespace, self.settings.lease_name, exc)
                renewed = False
            if renewed:
                last = self.clock()
            elif self.clock() - last > self.settings.renew_deadline_seconds:
                self.is_leader = False
                log.error("lost Lease %s/%s", self.namespace, self.settings.lease_name)
                return

    async def release(self) -> None:
        """Gives the Lease up (graceful stop), so a standby takes over without waiting for expiry."""
        if not self.is_leader:
            return
        self.is_leader = False
        name = self.settings.lease_name
        try:
            lease = await self.kube.lease("GET", self.namespace, name)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            patch = {
                "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
            }
            await self.kube.lease("PATCH", self.namespace, name, patch, content_type=MERGE_PATCH)
            log.info("released Lease %s/%s", self.namespace, name)
        except (ApiError, OSError) as exc:
            log.warning("releasing Lease %s/%s failed: %s", self.namespace, name, exc)
