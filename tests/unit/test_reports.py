"""The report endpoint's pure parts: who a TokenReview vouches for, and which pod may report for
which stage (the real endpoint with real tokens is in tests/integration/test_runner_reports.py)."""

from __future__ import annotations

import asyncio

import pytest
from qjob_operator.reports import authorize
from qjob_operator.tokenreview import PodIdentity, TokenRefusedError, TokenReviewer, identity_from_review

AUDIENCE = "qjob.dev/report"


def review(**user) -> dict:
    return {
        "authenticated": True,
        "audiences": [AUDIENCE],
        "user": {
            "username": "system:serviceaccount:ml:default",
            "extra": {"authentication.kubernetes.io/pod-name": ["p"], "authentication.kubernetes.io/pod-uid": ["u"]},
            **user,
        },
    }


def test_review_names_the_pod():
    assert identity_from_review(review(), AUDIENCE) == PodIdentity("ml", "p", "u", "default")


@pytest.mark.parametrize(
    "status, why",
    [
        ({"authenticated": False, "error": "token expired"}, "token expired"),
        ({**review(), "audiences": ["https://kubernetes.default.svc"]}, "audience"),
        (review(username="alice"), "not a ServiceAccount"),
        (review(extra={}), "not bound to a pod"),
    ],
)
def test_review_refusals_say_why(status, why):
    with pytest.raises(TokenRefusedError, match=why):
        identity_from_review(status, AUDIENCE)


def test_reviews_are_cached_per_token_and_expire():
    calls, now = [], [0.0]

    async def fake_review(token, audiences):  # counts calls; the apiserver's part is integration-tested
        calls.append(token)
        return review() if token == "good" else {"authenticated": False}

    reviewer = TokenReviewer(fake_review, AUDIENCE, ttl_seconds=60, refused_ttl_seconds=10, clock=lambda: now[0])

    async def scenario():
        for _ in range(3):
            assert (await reviewer.identify("good")).pod_name == "p"
        for _ in range(2):
            with pytest.raises(TokenRefusedError):
                await reviewer.identify("bad")
        now[0] = 30.0  # refusals expire sooner than acceptances
        await reviewer.identify("good")
        with pytest.raises(TokenRefusedError):
            await reviewer.identify("bad")
        now[0] = 61.0
        await reviewer.identify("good")

    asyncio.run(scenario())
    assert calls == ["good", "bad", "bad", "good"]


JOB_UID, CHILD_UID = "qj-uid", "job-uid"
CHILD = {"metadata": {"uid": CHILD_UID, "ownerReferences": [{"kind": "QuantizationJob", "uid": JOB_UID,
                                                             "controller": True}]}}  # fmt: skip
POD = {
    "metadata": {"name": "p", "uid": "u", "ownerReferences": [{"kind": "Job", "uid": CHILD_UID, "controller": True}]}
}
WHO = PodIdentity("ml", "p", "u", "default")


def test_the_stages_own_pod_may_report():
    assert authorize(WHO, "ml", JOB_UID, [CHILD], [POD]) is None
    earlier_attempt = {"metadata": {"uid": "old", "ownerReferences": CHILD["metadata"]["ownerReferences"]}}
    assert authorize(WHO, "ml", JOB_UID, [earlier_attempt, CHILD], [POD]) is None


@pytest.mark.parametrize(
    "who, job_uid, child, pods, why",
    [
        (PodIdentity("other", "p", "u", "default"), JOB_UID, [CHILD], [POD], "not in namespace"),
        (WHO, None, [CHILD], [POD], "no such job"),
        (WHO, JOB_UID, [], [], "no such job or stage"),
        (WHO, "recreated-job", [CHILD], [POD], "does not belong"),  # an orphan of an earlier job
        (PodIdentity("ml", "p", "old-uid", "default"), JOB_UID, [CHILD], [POD], "does not run this stage"),
        (WHO, JOB_UID, [CHILD], [{"metadata": {**POD["metadata"], "ownerReferences": []}}], "does not run"),
        (WHO, JOB_UID, [CHILD], [], "does not run this stage"),
    ],
)
def test_everyone_else_may_not(who, job_uid, child, pods, why):
    assert why in authorize(who, "ml", job_uid, child, pods)
