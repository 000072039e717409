"""Kubernetes Events about QuantizationJobs, posted with the operator's own client.

Not ``kopf.event``: that needs kopf's per-handler context, which reconciles started from the
periodic resync (deadlines, missed events) do not have, so their Events were lost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .status import Event, fmt_time

COMPONENT = "qjob-operator"
#: core/v1 Event messages are cut by the apiserver at 1 KiB (event validation).
MESSAGE_LIMIT = 1024


def build_event(body: Mapping[str, Any], event: Event, now: datetime) -> dict[str, Any]:
    meta = body["metadata"]
    when = fmt_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:MESSAGE_LIMIT],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME") or COMPONENT,
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": 1,
    }
