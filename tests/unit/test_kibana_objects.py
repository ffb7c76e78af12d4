"""Kibana saved objects (``include/kibana/gitops-ml.ndjson``), checked statically: no Kibana here.

Every line must be an importable saved object whose references resolve inside the file, the
data views must cover exactly the index template's patterns, and every field the objects name
(data view formats, saved search columns/sort/queries, Lens columns and KQL queries, filters)
must be mapped by ``gitops_ml.logs.TEMPLATE`` *and* be a field our documents really carry: log
fields are taken from a document built by ``logs.document``, run-record fields from
``records.outcome_record`` plus the keyword arguments of every ``record(...)`` call in the pipeline
source (read with ``ast``, so renaming a field there breaks this test).  Values compared in KQL
(``event.action : "deploy"``) must be step names and outcomes the pipeline really writes.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gitops_ml import logs, records
from tests.helpers import ROOT

NDJSON = ROOT / "include" / "kibana" / "gitops-ml.ndjson"
PACKAGE = ROOT / "include" / "gitops_ml"
RECORD_SOURCES = (PACKAGE / "pipeline.py", PACKAGE / "flow.py", PACKAGE / "runs.py")  # every record(...) call
DAG_FILE = ROOT / "dags" / "gitops_ml_pipeline.py"
DASHBOARD_TITLE = "gitops-ml: runs by commit"

EMBEDDED_JSON = {
    "searchSourceJSON",
    "panelsJSON",
    "optionsJSON",
    "fieldAttrs",
    "fieldFormatMap",
    "runtimeFieldMap",
    "visState",
    "uiStateJSON",
}
FIELD_KEYS = {"sourceField", "field", "sortField", "timeField", "timeFieldName", "breakdownField", "fieldName"}
QUERY_DSL_KEYS = {"match_phrase", "match", "term", "terms", "range", "prefix", "wildcard"}
NOT_A_FIELD = "___records___"  # Lens' pseudo field of the count operation
LENS_TYPES = {
    "number": {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float", "unsigned_long"},
    "string": {"keyword", "constant_keyword", "wildcard"},
    "date": {"date", "date_nanos"},
    "boolean": {"boolean"},
    "ip": {"ip"},
}


# ---------------------------------------------------------------------------------------------- loading
def load(path: Path = NDJSON) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def by_type(objects: list[dict], type_: str) -> list[dict]:
    return [o for o in objects if o["type"] == type_]


def parsed(obj: dict) -> dict:
    """The object with its embedded JSON strings (searchSourceJSON, panelsJSON, ...) parsed."""

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(json.loads(v) if k in EMBEDDED_JSON and isinstance(v, str) else v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(obj)


# ---------------------------------------------------------------------------------------------- KQL
_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([()])|(<=|>=|<|>|:)|([^\s()":<>]+))')


def kql_clauses(query: str) -> list[tuple[str, list[str]]]:
    """``(field, values)`` of every ``field : value``, ``field : ("a" or "b")`` and range clause."""
    tokens, pos, query = [], 0, query.strip()
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if not match:
            raise ValueError(f"cannot read KQL {query!r} at {pos}")
        pos = match.end()
        quoted, paren, op, word = match.groups()
        tokens.append(
            ("str", quoted)
            if quoted is not None
            else ("paren", paren)
            if paren
            else ("op", op)
            if op
            else ("word", word)
        )
    clauses, i = [], 0
    while i < len(tokens):
        if tokens[i][0] in ("word", "str") and i + 1 < len(tokens) and tokens[i + 1][0] == "op":
            field, values, j = tokens[i][1], [], i + 2
            if j < len(tokens) and tokens[j] == ("paren", "("):
                depth, start = 0, j
                for j in range(start, len(tokens)):
                    kind, value = tokens[j]
                    depth += (value == "(") - (value == ")") if kind == "paren" else 0
                    if kind == "paren" and depth == 0:
                        break
                    if kind == "str" or (kind == "word" and value.lower() not in ("and", "or", "not")):
                        values.append(value)
            elif j < len(tokens):
                values.append(tokens[j][1])
            clauses.append((field, values))
            i = j + 1
        else:
            i += 1
    return clauses


# ---------------------------------------------------------------------------------------------- field extraction
def scan(obj: dict) -> tuple[set[str], list[tuple[str, list[str]]]]:
    """Every field name an object refers to, and every KQL clause ``(field, values)`` it contains."""
    fields: set[str] = set()
    clauses: list[tuple[str, list[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                visit(value)
            return
        if not isinstance(node, dict):
            return
        if isinstance(node.get("query"), str) and node.get("language") in ("kuery", "lucene"):
            clauses.extend(kql_clauses(node["query"]))
        for key, value in node.items():
            if key in FIELD_KEYS and isinstance(value, str) and value != NOT_A_FIELD:
                fields.add(value)
            elif key in ("fieldAttrs", "fieldFormatMap") and isinstance(value, dict):
                fields.update(value)  # keyed by field name
            elif key in QUERY_DSL_KEYS and isinstance(value, dict):
                fields.update(value)
            elif key == "columns" and isinstance(value, list):  # saved search columns (Lens' are dicts)
                fields.update(v for v in value if isinstance(v, str))
            elif key == "sort" and isinstance(value, list) and value:
                pairs = value if all(isinstance(v, list) for v in value) else [value]
                fields.update(p[0] for p in pairs if p and isinstance(p[0], str))
            visit(value)

    visit(parsed(obj)["attributes"])
    fields.update(field for field, _ in clauses)
    return fields, clauses


def flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def mapped_fields(mappings: dict) -> dict[str, str]:
    """Dotted field name -> type, from nested ``properties`` (and multi-field ``fields``)."""
    out: dict[str, str] = {}

    def walk(properties: dict, prefix: str) -> None:
        for name, spec in properties.items():
            if "properties" in spec:
                walk(spec["properties"], f"{prefix}{name}.")
            if "type" in spec:
                out[f"{prefix}{name}"] = spec["type"]
            for sub, sub_spec in spec.get("fields", {}).items():
                out[f"{prefix}{name}.{sub}"] = sub_spec["type"]

    walk(mappings.get("properties", {}), "")
    return out


def dynamic_type(mappings: dict, field: str) -> str | None:
    for entry in mappings.get("dynamic_templates", []):
        (template,) = entry.values()
        if "path_match" in template and fnmatch.fnmatchcase(field, template["path_match"]):
            return template["mapping"]["type"]
    return None


# ---------------------------------------------------------------------------------------------- what we write
def _call_name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _strings(node: ast.AST) -> set[str]:
    """The string values an argument can take: a literal, or the literal branches of ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    return set()  # computed (e.g. the failed task's id): taken from the DAG below


def record_calls() -> dict[str, set[str]]:
    """Steps, outcomes and extra fields of the run records the pipeline writes, read from its source.

    ``record(settings, commit, run_id, step, outcome, **fields)`` calls give steps, outcomes and
    keyword field names; ``outcome_of`` builds the fields of the final ``pipeline`` record.
    """
    found: dict[str, set[str]] = {"steps": set(), "outcomes": set(), "fields": set()}
    for path in RECORD_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _call_name(node.func) == "record" and len(node.args) >= 5:
                found["steps"] |= _strings(node.args[3])
                found["outcomes"] |= _strings(node.args[4])
                found["fields"] |= {k.arg for k in node.keywords if k.arg}
            elif isinstance(node, ast.FunctionDef) and node.name == "outcome_of":
                for item in ast.walk(node):  # the dict it builds and returns, and keys added to it
                    if isinstance(item, ast.Dict):
                        found["fields"] |= {k.value for k in item.keys if isinstance(k, ast.Constant)}
                    elif (
                        isinstance(item, ast.Subscript)
                        and isinstance(item.ctx, ast.Store)
                        and isinstance(item.slice, ast.Constant)
                    ):
                        found["fields"].add(item.slice.value)
    # a failure record's step is the Airflow task id that failed
    for node in ast.walk(ast.parse(DAG_FILE.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and any(
            _call_name(d.func if isinstance(d, ast.Call) else d) == "task" for d in node.decorator_list
        ):
            found["steps"].add(node.name)
    return found


def written() -> dict[str, Any]:
    """Field names really carried by documents of each data view, and the values we compare against."""
    log_doc = logs.document(
        dict.fromkeys(logs.LABEL_KEYS, "x"), 1, "INFO", "gitops_ml.test", "x" * (logs.MAX_MESSAGE_BYTES + 1)
    )  # oversize: the truncation fields too
    run_doc = records.outcome_record("0" * 40, "commit__" + "0" * 40, "train", "success")
    calls = record_calls()
    return {
        "gitops-ml-logs": {"exact": set(flatten(log_doc)) - {"_id"}, "roots": set()},
        "gitops-ml-runs": {"exact": set(flatten(run_doc)) - {"_id"}, "roots": calls["fields"]},
        "values": {
            "event.action": calls["steps"],
            "event.outcome": calls["outcomes"],
            "log.level": {name.lower() for name in logging.getLevelNamesMapping()},
        },
        "calls": calls,
    }


# ---------------------------------------------------------------------------------------------- the checker
def problems(objects: list[dict], facts: dict | None = None, mappings: dict | None = None) -> list[str]:
    """Every field or value of ``objects`` that the mapping or our documents do not have (empty: all good)."""
    facts = facts or written()
    mappings = mappings or logs.TEMPLATE["template"]["mappings"]
    explicit = mapped_fields(mappings)
    all_written = facts["gitops-ml-logs"]["exact"] | facts["gitops-ml-runs"]["exact"]
    found = []

    def type_of(field: str) -> str | None:
        if field in explicit:
            return explicit[field]
        dynamic = dynamic_type(mappings, field)
        return dynamic if dynamic and field in all_written else None  # dynamic: only for fields we write

    for obj in objects:
        fields, clauses = scan(obj)
        views = {r["id"] for r in obj.get("references", []) if r["type"] == "index-pattern"}
        if obj["type"] == "index-pattern":
            views = {obj["id"]}
        for field in sorted(fields):
            if type_of(field) is None:
                found.append(f"{obj['id']}: field {field!r} is not in the mapping of logs.TEMPLATE")
            for view in sorted(views & {"gitops-ml-logs", "gitops-ml-runs"}):
                if field not in facts[view]["exact"] and field.split(".")[0] not in facts[view]["roots"]:
                    found.append(f"{obj['id']}: field {field!r} is never written to {view} documents")
        for field, values in clauses:
            allowed = facts["values"].get(field)
            if type_of(field) == "boolean":
                allowed = {"true", "false"}
            for value in values:
                if allowed is not None and value != "*" and value not in allowed:
                    found.append(f"{obj['id']}: {field} : {value!r} is never written (known: {sorted(allowed)})")
        if obj["type"] == "lens":
            for column in lens_columns(obj):
                field = column.get("sourceField")
                if field in (None, NOT_A_FIELD) or type_of(field) is None:
                    continue
                if type_of(field) not in LENS_TYPES.get(column.get("dataType"), set()):
                    found.append(
                        f"{obj['id']}: Lens column on {field!r} has dataType {column.get('dataType')!r} "
                        f"but the field is mapped as {type_of(field)!r}"
                    )
    return found


def lens_layers(obj: dict) -> dict[str, dict]:
    return obj["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]


def lens_columns(obj: dict) -> Iterator[dict]:
    for layer in lens_layers(obj).values():
        yield from layer["columns"].values()


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return load()


def test_every_line_is_a_saved_object():
    lines = NDJSON.read_text(encoding="utf-8").splitlines()
    assert lines, "empty file"
    ids = set()
    for number, line in enumerate(lines, 1):
        obj = json.loads(line)  # one JSON object per line, nothing else
        assert isinstance(obj, dict), f"line {number}"
        for key in ("type", "id", "attributes"):
            assert obj.get(key), f"line {number}: no {key}"
        assert isinstance(obj["attributes"], dict) and obj["attributes"].get("title"), f"line {number}: no title"
        assert isinstance(obj.get("references", []), list), f"line {number}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", obj.get("typeMigrationVersion", "")), f"line {number}"
        assert (obj["type"], obj["id"]) not in ids, f"line {number}: duplicate {obj['type']} {obj['id']}"
        ids.add((obj["type"], obj["id"]))
        parsed(obj)  # every embedded JSON string parses


def test_references_resolve_inside_the_file(objects):
    known = {(o["type"], o["id"]) for o in objects}
    for obj in objects:
        names = {}
        for ref in obj.get("references", []):
            assert {"type", "id", "name"} <= set(ref), (obj["id"], ref)
            assert (ref["type"], ref["id"]) in known, f"{obj['id']} references missing {ref['type']} {ref['id']}"
            assert ref["name"] not in names, f"{obj['id']}: reference name {ref['name']} twice"
            names[ref["name"]] = ref
        attrs = parsed(obj)["attributes"]
        if obj["type"] == "search":
            ref_name = attrs["kibanaSavedObjectMeta"]["searchSourceJSON"]["indexRefName"]
            assert names[ref_name]["type"] == "index-pattern", obj["id"]
        if obj["type"] == "lens":
            state = attrs["state"]
            for layer_id, layer in lens_layers(obj).items():
                assert names[f"indexpattern-datasource-layer-{layer_id}"]["type"] == "index-pattern"
                assert set(layer["columnOrder"]) == set(layer["columns"]), (obj["id"], layer_id)
                for column in layer["columns"].values():
                    order_by = column.get("params", {}).get("orderBy", {})
                    assert order_by.get("type") != "column" or order_by["columnId"] in layer["columns"]
            vis = state["visualization"]
            columns = {c for layer in lens_layers(obj).values() for c in layer["columns"]}
            accessors = [
                a
                for layer in vis.get("layers", [vis])
                for a in [
                    layer.get("xAccessor"),
                    layer.get("splitAccessor"),
                    *layer.get("accessors", []),
                    *(c["columnId"] for c in layer.get("columns", [])),
                ]
                if a
            ]
            assert accessors and set(accessors) <= columns, obj["id"]
        if obj["type"] == "dashboard":
            panels = attrs["panelsJSON"]
            assert len({p["panelIndex"] for p in panels}) == len(panels)
            for panel in panels:
                assert panel["gridData"]["i"] == panel["panelIndex"]
                ref = names[f"{panel['panelIndex']}:{panel['panelRefName']}"]
                assert ref["type"] == panel["type"], panel


def test_data_views_cover_exactly_the_index_template(objects):
    views = by_type(objects, "index-pattern")
    assert sorted(v["attributes"]["title"] for v in views) == sorted(logs.TEMPLATE["index_patterns"])
    assert {v["id"] for v in views} == {logs.LOGS_INDEX, logs.RUNS_INDEX}
    explicit = mapped_fields(logs.TEMPLATE["template"]["mappings"])
    for view in views:
        assert view["attributes"]["title"] == f"{view['id']}*"
        assert explicit[view["attributes"]["timeFieldName"]] == "date"


def test_every_field_is_mapped_and_written_by_our_documents(objects):
    facts = written()
    # the source reading found the real record calls (a refactor there must not make this test vacuous)
    assert {"pipeline", "deploy", "train"} <= facts["calls"]["steps"]
    assert {"failure", "promoted", "rolled_back", "success", "not_promoted"} <= facts["calls"]["outcomes"]
    assert {"test_accuracy", "model_version", "deployed", "reason"} <= facts["calls"]["fields"]
    assert problems(objects, facts) == []
    referenced = set().union(*(scan(o)[0] for o in objects))
    assert {
        "labels.commit_sha",
        "labels.task_id",
        "log.level",
        "message",
        "event.action",
        "event.outcome",
        "test_accuracy",
    } <= referenced


def test_dashboard_runs_by_commit(objects):
    (dashboard,) = [d for d in by_type(objects, "dashboard") if d["attributes"]["title"] == DASHBOARD_TITLE]
    panels = parsed(dashboard)["attributes"]["panelsJSON"]
    ids = {r["id"] for r in dashboard["references"]}
    lenses = [o for o in by_type(objects, "lens") if o["id"] in ids]
    cells = set()
    for panel in panels:
        grid = panel["gridData"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 48, panel
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, f"panel {panel['panelIndex']} overlaps another"
        cells |= area

    def shows(query: dict[str, str], metric: tuple[str, str | None], bucket: str | None = None) -> bool:
        for obj in lenses:
            clauses = {f: tuple(v) for f, v in kql_clauses(obj["attributes"]["state"]["query"]["query"])}
            cols = list(lens_columns(obj))
            if (
                all(clauses.get(f) == (v,) for f, v in query.items())
                and any((c["operationType"], c.get("sourceField")) == metric for c in cols if not c["isBucketed"])
                and (bucket is None or any(c.get("sourceField") == bucket for c in cols if c["isBucketed"]))
            ):
                return True
        return False

    assert shows({"event.action": "pipeline"}, ("count", NOT_A_FIELD), "labels.commit_sha"), "runs per commit"
    assert shows({"event.action": "pipeline"}, ("max", "test_accuracy"), "@timestamp"), "accuracy over time"
    assert shows({"event.action": "pipeline"}, ("last_value", "test_accuracy"), "labels.commit_sha"), "by commit"
    assert shows({"event.outcome": "failure"}, ("count", NOT_A_FIELD), "event.action"), "failures by step"
    assert shows({"event.action": "deploy"}, ("count", NOT_A_FIELD), "event.outcome"), "deploys and rollbacks"


def test_log_lines_search_shows_commit_task_level_and_message(objects):
    searches = [s for s in by_type(objects, "search") if "gitops-ml-logs" in {r["id"] for r in s["references"]}]
    assert any(
        s["attributes"]["columns"][:1] == ["labels.commit_sha"]
        and {"labels.task_id", "log.level", "message"} <= set(s["attributes"]["columns"])
        for s in searches
    )


def test_the_checker_catches_wrong_fields_and_values(objects):
    wrong_lens = {
        "type": "lens",
        "id": "wrong-lens",
        "attributes": {
            "title": "x",
            "state": {
                "datasourceStates": {
                    "formBased": {
                        "layers": {
                            "l": {
                                "columnOrder": ["a", "b"],
                                "columns": {
                                    "a": {
                                        "operationType": "max",
                                        "sourceField": "test_acuracy",
                                        "dataType": "number",
                                        "isBucketed": False,
                                    },
                                    "b": {
                                        "operationType": "terms",
                                        "sourceField": "test_accuracy",
                                        "dataType": "string",
                                        "isBucketed": True,
                                    },
                                },
                            }
                        }
                    }
                },
                "query": {
                    "query": 'event.actoin : "deploy" and event.outcome : ("failure" or "rollback")',
                    "language": "kuery",
                },
            },
        },
        "references": [{"type": "index-pattern", "id": "gitops-ml-runs", "name": "indexpattern-datasource-layer-l"}],
    }
    wrong_search = {
        "type": "search",
        "id": "wrong-search",
        "attributes": {
            "title": "x",
            "columns": ["labels.comit_sha", "message"],
            "sort": [["@timestamp", "desc"]],
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": json.dumps(
                    {
                        "query": {"query": "labels.task_id : train", "language": "kuery"},
                        "filter": [{"query": {"match_phrase": {"log.levle": "error"}}}],
                    }
                )
            },
        },
        "references": [{"type": "index-pattern", "id": "gitops-ml-runs", "name": "x"}],
    }
    found = "\n".join(problems([wrong_lens, wrong_search]))
    for expected in (
        "'test_acuracy' is not in the mapping",
        "'event.actoin' is not in the mapping",
        "'labels.comit_sha' is not in the mapping",
        "'log.levle' is not in the mapping",
        "event.outcome : 'rollback' is never written",
        "'message' is never written to gitops-ml-runs",  # a log field on the runs data view
        "'labels.task_id' is never written to gitops-ml-runs",
        "on 'test_accuracy' has dataType 'string'",
    ):
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    for fine in ("'@timestamp'", "event.outcome : 'failure'", "'event.outcome' is"):
        assert fine not in found
    # and the real file, with one field renamed, fails
    renamed = [json.loads(json.dumps(o).replace("test_accuracy", "accuracy_test")) for o in objects]
    assert any("'accuracy_test' is not in the mapping" in p for p in problems(renamed))
    # and so does the mapping without a field the objects use
    mappings = copy.deepcopy(logs.TEMPLATE["template"]["mappings"])
    del mappings["properties"]["reason"]
    assert any("'reason' is not in the mapping" in p for p in problems(objects, mappings=mappings))


@pytest.mark.parametrize(
    "query,expected",
    [
        ('event.action : "deploy"', [("event.action", ["deploy"])]),
        (
            'event.outcome : ("failure" or "rolled_back") and not labels.step:train',
            [("event.outcome", ["failure", "rolled_back"]), ("labels.step", ["train"])],
        ),
        ('test_accuracy >= 0.9 or message : "a: b (c)"', [("test_accuracy", ["0.9"]), ("message", ["a: b (c)"])]),
        ("", []),
    ],
)
def test_kql_clauses(query, expected):
    assert kql_clauses(query) == expected


def test_compose_loads_the_objects_into_kibana():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    setup = services["kibana-setup"]
    assert "kibana" in setup["depends_on"]
    assert "./include/kibana:/kibana:ro" in setup["volumes"]
    script = json.dumps(setup.get("command")) + json.dumps(setup.get("entrypoint"))
    for needle in (
        "http://kibana:5601/api/saved_objects/_import?overwrite=true",
        "kbn-xsrf: true",
        "file=@/kibana/" + NDJSON.name,
    ):
        assert needle in script, needle
    assert setup.get("restart") in ("no", "on-failure")  # one-shot: never restarted once the import succeeded
