"""Deploy: a reconcile of desired state (the registry alias) and observed state (the servers' ``/version``).

1. Desired state: alias ``champion`` -> the new version.
2. The server loads the new version beside the serving one and replays the smoke
   sample (evaluation images with the classes the evaluation predicted) before it
   switches traffic with one reference swap.
3. ``/version`` must report the new version and its commit.
4. Watch window (``deploy.watch_seconds`` in ``params.yaml``): the server's own
   ``/metrics`` for the new version (error rate, mean latency, share of
   low-confidence predictions) are compared with the previous version's; past a
   limit the deploy rolls back by itself and says why. Public traffic is untrusted:
   the judged numbers count at most a few requests per client (see
   ``metrics.WATCH_REQUESTS_PER_CLIENT``) and nothing is decided before
   ``deploy.min_clients`` distinct clients were seen, so one client cannot roll a
   healthy version back (nor keep a broken one by flooding it with good traffic).

Any failure restores the alias, returns the server to the previous model (still
loaded, so a swap) and raises ``DeployError`` naming the version, the commit and
the reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from gitops_ml.config import Settings
from gitops_ml.deploy import metrics
from gitops_ml.deploy.client import ServingClient
from gitops_ml.errors import DeployError
from gitops_ml.polling import poll

__all__ = ["DEFAULT_POLICY", "DeployError", "deploy", "judge", "watch_window"]

log = logging.getLogger(__name__)

DEFAULT_POLICY = {
    "watch_seconds": 0,
    "min_requests": 20,
    "min_clients": 3,
    "max_error_rate": 0.05,
    "max_latency_ratio": 3.0,
    "max_low_confidence_increase": 0.2,
}


def deploy(settings: Settings, model_version: str, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """Converge the alias and every server on ``model_version``; roll back on any failure."""
    from gitops_ml import registry  # noqa: PLC0415 - mlflow is heavy

    policy = {**DEFAULT_POLICY, **(policy or {})}
    model_version = str(model_version)
    target = registry.get_version(settings, model_version)
    commit_sha = registry.served_for(target) or ""  # what the servers report once they serve it
    smoke = registry.load_run_json(settings, target.run_id, "evaluation/smoke_sample.json")
    previous = registry.get_alias(settings)
    previous_version = previous.version if previous is not None else None
    servers = [ServingClient(settings, base_url=url) for url in settings.serving_urls]
    try:
        observed, before = {}, {}
        for server in servers:
            try:
                observed[server.base_url] = server.version()
                before[server.base_url] = server.metrics()
            except httpx.HTTPError as exc:
                raise DeployError(
                    f"serving endpoint {server.base_url} is not reachable ({exc}); model version "
                    f"{model_version} (commit {commit_sha}) was not deployed"
                ) from None
        if previous_version == model_version and all(_serves(o, model_version, commit_sha) for o in observed.values()):
            log.info("model version %s (commit %s) is already champion on every server", model_version, commit_sha)
            return {"changed": False, "previous_version": previous_version, "serving": observed, "watch": None}
        registry.set_alias(settings, model_version)
        for server in servers:
            try:
                server.reload(model_version, timeout=settings.deploy_timeout, smoke=smoke)
                observed[server.base_url] = _wait_for(server, model_version, commit_sha, settings.deploy_timeout)
            except (DeployError, httpx.HTTPError) as exc:
                _roll_back(settings, servers, previous_version)
                raise DeployError(
                    f"deploy of model version {model_version} (commit {commit_sha}) failed on "
                    f"{server.base_url} and was rolled back to version {previous_version}: "
                    f"{exc}"
                ) from None
        log.info(
            "serving model version %s of commit %s on %s", model_version, commit_sha, ", ".join(settings.serving_urls)
        )
        watch = None
        if policy["watch_seconds"] > 0:
            watch = watch_window(servers, model_version, previous_version, before, policy)
            if watch["verdict"] != "healthy":
                _roll_back(settings, servers, previous_version)
                raise DeployError(
                    f"model version {model_version} (commit {commit_sha}) was rolled back to version "
                    f"{previous_version} after {watch['elapsed_s']:.1f} s of live traffic: "
                    f"{watch['reason']}"
                )
        return {"changed": True, "previous_version": previous_version, "serving": observed, "watch": watch}
    finally:
        for server in servers:
            server.close()


def _serves(observed: dict | None, model_version: str, commit_sha: str) -> bool:
    return (
        observed is not None
        and observed.get("model_version") == model_version
        and observed.get("commit_sha") == commit_sha
    )


def _wait_for(serving: ServingClient, model_version: str, commit_sha: str, timeout: float) -> dict:
    observed, served = poll(serving.version, lambda o: _serves(o, model_version, commit_sha), timeout, 0.2)
    if not served or observed is None:
        raise DeployError(
            f"server still reports {observed} after {timeout:.0f} s, "
            f"expected version {model_version} of commit {commit_sha}"
        )
    return observed


def _delta(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
    return {k: now[k] - then.get(k, 0.0) for k in now}


def judge(new: dict[str, float], old: dict[str, float] | None, policy: dict[str, Any]) -> str | None:
    """Why the new version's live numbers are worse than allowed, or ``None``.

    Nothing is decided before ``min_requests`` judged requests from ``min_clients``
    distinct clients.
    """
    if new["requests"] < policy["min_requests"] or new.get("clients", 0) < policy.get("min_clients", 1):
        return None
    error_rate = new["errors"] / new["requests"]
    if error_rate > policy["max_error_rate"]:
        return (
            f"error rate {error_rate:.1%} over {int(new['requests'])} requests is above "
            f"deploy.max_error_rate {policy['max_error_rate']:.1%}"
        )
    if old and old["requests"] >= policy["min_requests"] and old["latency_count"] and new["latency_count"]:
        new_latency = new["latency_sum"] / new["latency_count"]
        old_latency = old["latency_sum"] / old["latency_count"]
        if old_latency > 0 and new_latency / old_latency > policy["max_latency_ratio"]:
            return (
                f"mean latency {new_latency * 1000:.1f} ms is {new_latency / old_latency:.1f}x the previous "
                f"version's {old_latency * 1000:.1f} ms (deploy.max_latency_ratio {policy['max_latency_ratio']})"
            )
    if new["predictions"]:
        new_share = new["low_confidence"] / new["predictions"]
        old_share = old["low_confidence"] / old["predictions"] if old and old["predictions"] else 0.0
        if new_share - old_share > policy["max_low_confidence_increase"]:
            return (
                f"{new_share:.1%} low-confidence predictions against {old_share:.1%} for the previous version "
                f"(deploy.max_low_confidence_increase {policy['max_low_confidence_increase']:.0%})"
            )
    return None


def _stats(servers: list[ServingClient], version: str, samples: dict | None = None) -> dict[str, float]:
    """One version's numbers summed over every server (from ``samples`` or a fresh scrape).

    Distinct clients are the largest count of any one server, not the sum: a client
    that reaches several servers is still one client.
    """
    total: dict[str, float] = {}
    for server in servers:
        scraped = samples[server.base_url] if samples is not None else server.metrics()
        for key, value in metrics.version_stats(scraped, version).items():
            total[key] = max(total.get(key, 0.0), value) if key == "clients" else total.get(key, 0.0) + value
    return total


def watch_window(
    servers: list[ServingClient],
    model_version: str,
    previous_version: str | None,
    before: dict[str, list],
    policy: dict[str, Any],
) -> dict[str, Any]:
    """Poll every server's ``/metrics`` for ``watch_seconds``; stop at the first breached limit.

    The new version's numbers count from ``before`` (scraped before the switch), so
    every judged request since the switch counts; distinct clients are those of the
    version's current serving period (a gauge the server resets at the switch).
    """
    old = _stats(servers, previous_version, before) if previous_version else None
    start_stats = _stats(servers, model_version, before)
    started = time.monotonic()

    def observe() -> tuple[dict[str, float], str | None]:
        now = _stats(servers, model_version)
        new = {**_delta(now, start_stats), "clients": now.get("clients", 0.0)}
        return new, judge(new, old, policy)

    (new, reason), breached = poll(observe, lambda observed: observed[1] is not None, policy["watch_seconds"], 0.5)
    elapsed = time.monotonic() - started
    if breached:
        log.error("watch window: %s", reason)
        return {"verdict": "rolled_back", "reason": reason, "elapsed_s": elapsed, "stats": new}
    log.info(
        "watch window of %.0f s passed: %d requests, %d errors", policy["watch_seconds"], new["requests"], new["errors"]
    )
    return {"verdict": "healthy", "reason": None, "elapsed_s": elapsed, "stats": new}


def _roll_back(settings: Settings, servers: list[ServingClient], previous_version: str | None) -> None:
    from gitops_ml import registry  # noqa: PLC0415

    registry.set_alias(settings, previous_version)
    # previous_version None: the first model ever failed; the servers follow the registry and serve nothing.
    for server in servers:
        try:
            server.reload(previous_version, timeout=settings.deploy_timeout)
        except (DeployError, httpx.HTTPError) as exc:
            log.error("rollback: %s did not return to previous version %s: %s", server.base_url, previous_version, exc)
