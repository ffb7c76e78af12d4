from gitops_ml import gate

RULES = {"min_accuracy": 0.8, "max_accuracy_drop": 0.02, "min_class_recall": None}


def result(accuracy, recall=None):
    return {"accuracy": accuracy, "recall": recall or {"a": accuracy, "b": accuracy}}


def test_first_model_needs_only_absolute_thresholds():
    assert gate.decide(result(0.85), None, RULES)["passed"]
    failed = gate.decide(result(0.5), None, RULES)
    assert not failed["passed"] and "below gate.min_accuracy 0.8" in failed["reasons"][0]


def test_drop_against_champion():
    assert gate.decide(result(0.95), result(0.96), RULES)["passed"]
    failed = gate.decide(result(0.90), result(0.96), RULES)
    assert not failed["passed"] and "0.0600 below the champion's 0.9600" in failed["reasons"][0]
    assert abs(failed["checks"]["accuracy_drop"] - 0.06) < 1e-9


def test_per_class_recall_floor_names_the_class():
    rules = {**RULES, "min_class_recall": 0.7}
    failed = gate.decide(result(0.9, {"cat": 0.95, "dog": 0.6}), None, rules)
    assert not failed["passed"] and "dog (0.6)" in failed["reasons"][0]
    assert gate.summary(failed, None).startswith("NOT PROMOTED: recall below")
    assert gate.summary(gate.decide(result(0.9), None, RULES), None) == "gate passed against no champion (first model)"


def test_recall_floor_and_worst_class_logged_then_tagged_on_the_version():
    recall = {"cat": 0.95, "dog": 0.6, "eel": 0.6001}
    metrics = gate.recall_metrics(recall, {**RULES, "min_class_recall": 0.7})
    assert metrics == {"worst_class_recall": 0.6, "gate_min_class_recall": 0.7}
    assert gate.recall_metrics(recall, RULES) == {"worst_class_recall": 0.6}  # no floor: none logged
    logged = {**{f"test_recall_{c}": r for c, r in recall.items()}, **metrics, "test_accuracy": 0.9}
    assert gate.recall_tags(logged) == {"min_class_recall": 0.7, "worst_class": "dog", "worst_class_recall": 0.6}
    no_floor = gate.recall_tags({k: v for k, v in logged.items() if k != "gate_min_class_recall"})
    assert no_floor["min_class_recall"] is None and no_floor["worst_class"] == "dog"
    assert gate.recall_tags({"test_accuracy": 0.9}) == {"min_class_recall": None}
