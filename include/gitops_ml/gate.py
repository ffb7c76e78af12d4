"""The evaluation gate: may the challenger replace the champion?

Rules come from ``params.yaml`` (``gate.*``).  Both models are scored on the same
held-out images of the new commit.  The first model ever has no champion and only
meets the absolute rules.  Pure Python: the numbers come from ``training.evaluate``.
"""

from __future__ import annotations

from typing import Any


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, rules: dict[str, Any]) -> dict[str, Any]:
    """Return ``{"passed", "reasons", "checks"}``; every failed check is one human-readable reason."""
    reasons: list[str] = []
    checks: dict[str, Any] = {"challenger_accuracy": challenger["accuracy"]}
    if challenger["accuracy"] < rules["min_accuracy"]:
        reasons.append(f"accuracy {challenger['accuracy']:.4f} is below gate.min_accuracy {rules['min_accuracy']}")
    floor = rules.get("min_class_recall")
    if floor is not None:
        low = {c: round(r, 4) for c, r in challenger["recall"].items() if r < floor}
        checks["classes_below_recall_floor"] = low
        if low:
            reasons.append(
                f"recall below gate.min_class_recall {floor} for class(es) "
                + ", ".join(f"{c} ({r})" for c, r in sorted(low.items()))
            )
    if champion is not None:
        drop = champion["accuracy"] - challenger["accuracy"]
        checks.update(champion_accuracy=champion["accuracy"], accuracy_drop=drop)
        if drop > rules["max_accuracy_drop"]:
            reasons.append(
                f"accuracy {challenger['accuracy']:.4f} is {drop:.4f} below the champion's "
                f"{champion['accuracy']:.4f} (gate.max_accuracy_drop {rules['max_accuracy_drop']})"
            )
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


RECALL_PREFIX = "test_recall_"
RECALL_FLOOR_METRIC = "gate_min_class_recall"


def recall_metrics(recall: dict[str, float], rules: dict[str, Any]) -> dict[str, float]:
    """The per-class recall figures the evaluation logs beside ``test_recall_<class>``: the worst class's
    recall (``worst_class_recall``) and the gate's floor (``gate_min_class_recall``) when one is set."""
    metrics = {"worst_class_recall": min(recall.values())} if recall else {}
    if rules.get("min_class_recall") is not None:
        metrics[RECALL_FLOOR_METRIC] = float(rules["min_class_recall"])
    return metrics


def recall_tags(metrics: dict[str, float]) -> dict[str, Any]:
    """The model version's tags of the per-class recall check, from its run's metrics: the floor
    (``min_class_recall``, absent without one), the worst class and its recall."""
    recall = {k.removeprefix(RECALL_PREFIX): v for k, v in metrics.items() if k.startswith(RECALL_PREFIX)}
    tags: dict[str, Any] = {"min_class_recall": metrics.get(RECALL_FLOOR_METRIC)}
    if recall:
        worst = min(sorted(recall), key=recall.__getitem__)
        tags.update(worst_class=worst, worst_class_recall=round(recall[worst], 6))
    return tags


def summary(decision: dict[str, Any], champion_version: str | None) -> str:
    if decision["passed"]:
        against = f"champion version {champion_version}" if champion_version else "no champion (first model)"
        return f"gate passed against {against}"
    return "NOT PROMOTED: " + "; ".join(decision["reasons"])
