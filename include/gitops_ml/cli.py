"""``gitops-ml``: the one command-line entry point.

gitops-ml init-demo PATH            create the demo model repository (digits + DVC)
gitops-ml serve                     run the model server (champion alias)
gitops-ml run [SHA] --local         run the pipeline in this process, without Airflow
gitops-ml trigger [SHA] [--wait]    start the Airflow run ``commit__<sha>``
gitops-ml stack up|down             start/stop Airflow, MLflow UI and the server (embedded)
gitops-ml trace SHA|VERSION         commit -> run -> model version -> deploys -> serving now
gitops-ml logs SHA [--task T]       a commit's log lines (Elasticsearch or the local spool)
gitops-ml demo                      init (once), start the stack, commit, follow the run, predict
gitops-ml gc [--dry-run]            remove old work trees and DVC cache objects no one needs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError
from gitops_ml.refs import redact
from gitops_ml.runs import PIPELINE_DAG_ID


def _settings(args) -> Settings:
    settings = Settings.from_env()
    overrides = {k: getattr(args, k, None) for k in ("repo_url", "branch")}
    return settings.with_overrides(**overrides)


def cmd_init_demo(args) -> int:
    from gitops_ml import demo

    settings = _settings(args)
    remote = args.remote_url or str(settings.home / "dvc-remote")
    info = demo.init_demo(Path(args.path), remote, branch=args.branch or "main")
    print(json.dumps(info, indent=2))
    return 0


def cmd_serve(args) -> int:
    from gitops_ml.deploy import server

    settings = _settings(args)
    server.serve(settings, args.host, args.port)
    return 0


def cmd_run(args) -> int:
    from gitops_ml import flow
    from gitops_ml.payloads import RunConf

    conf = RunConf.parse({"watch": args.watch, "trigger": "manual"})
    settings = flow.settings_for(conf).with_overrides(repo_url=args.repo_url, branch=args.branch)
    result = flow.run_local(settings, args.commit_sha, deploy_model=not args.no_deploy, conf=conf)
    print(result.model_dump_json(indent=2))
    return 0


def _airflow_url(args, settings: Settings) -> str:
    """``--airflow-url``, else ``AIRFLOW_API_URL``, else the stack ``stack up`` started, else port 8080."""
    from gitops_ml import stack
    from gitops_ml.airflow.client import DEFAULT_URL

    return (
        getattr(args, "airflow_url", None)
        or settings.airflow_api_url
        or stack.recorded_urls(settings).get("airflow")
        or DEFAULT_URL
    )


def cmd_trigger(args) -> int:
    from gitops_ml import source, stack
    from gitops_ml.airflow.client import AirflowClient

    settings, conf = stack.trigger_target(_settings(args), args.watch)
    commit = source.resolve_commit(settings.repo_url, settings.branch, args.commit_sha, settings.git_cache_dir)
    client = AirflowClient(_airflow_url(args, settings))
    watch = conf.pop("watch", None)
    run = client.trigger_commit(commit.commit_sha, conf={**conf, "trigger": "manual"}, rerun=args.rerun, watch=watch)
    print(f"run {run['dag_run_id']} for commit {commit.commit_sha} of {commit.repo_url}: {run['state']}")
    if args.wait:
        run = client.wait_for_run(
            run["dag_run_id"],
            timeout=args.timeout,
            on_change=lambda task, state: print(f"  {task}: {state}", flush=True),
        )
        print(f"run {run['dag_run_id']}: {run['state']}")
        return 0 if run["state"] == "success" else 1
    return 0


def cmd_stack(args) -> int:
    from gitops_ml import stack

    settings = _settings(args)
    if args.action == "up":
        ports = {"airflow_port": args.airflow_port, "mlflow_port": args.mlflow_port, "serve_port": args.serve_port}
        _, where = stack.locate_repository(settings)
        urls = stack.up(settings, **ports)
        exported = stack.stack_settings(settings, **ports)
        for name, url in urls.items():
            print(f"{name}: {url}")
        print(f"repository: {where}")
        print(
            f"the stack deploys to GITOPS_ML_SERVING_URL={exported.serving_url}, links to "
            f"GITOPS_ML_MLFLOW_UI_URL={exported.mlflow_ui_url}; `gitops-ml trigger` finds Airflow at "
            f"{urls['airflow']} (or set AIRFLOW_API_URL)"
        )
    else:
        stopped = stack.down(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_demo(args) -> int:
    from gitops_ml import demo, stack
    from gitops_ml.airflow.client import AirflowClient

    settings = _settings(args)
    repo_path = stack.demo_repo_path(settings)
    if settings.repo_url and Path(settings.repo_url).resolve() != repo_path.resolve():
        print(
            f"gitops-ml: error: `gitops-ml demo` commits to the demo repository {repo_path}, but "
            f"GITOPS_ML_REPO_URL (or --repo-url) names another one; unset it for the demo",
            file=sys.stderr,
        )
        return 2
    if not (repo_path / ".git").exists():
        info = demo.init_demo(repo_path, str(settings.home / "dvc-remote"))
        print(f"demo repository {repo_path}: {info['images']} images, data hash {info['data_hash']}")
    settings = settings.with_overrides(repo_url=str(repo_path))

    print("starting Airflow, MLflow UI and the model server (first start takes a minute) ...", flush=True)
    urls = stack.up(settings)
    import yaml

    epochs = yaml.safe_load((repo_path / "params.yaml").read_text())["train"]["epochs"]
    message = "demo: retrain with a different number of epochs"
    commit_sha = demo.bump_param(repo_path, "train.epochs", epochs + 1 if epochs < 20 else 10, message)
    print(f"committed {commit_sha} to {repo_path} ({message})")
    client = AirflowClient(urls["airflow"])
    client.wait_for_dag()
    client.unpause()
    _, conf = stack.trigger_target(settings)
    watch = conf.pop("watch", None)
    run = client.trigger_commit(commit_sha, conf={**conf, "trigger": "manual"}, watch=watch)
    print(f"Airflow run {run['dag_run_id']} ... following it", flush=True)
    run = client.wait_for_run(
        run["dag_run_id"], timeout=1800, on_change=lambda task, state: print(f"  {task}: {state}", flush=True)
    )
    if run["state"] != "success":
        print(f"run {run['dag_run_id']} ended {run['state']}; see {urls['airflow']}", file=sys.stderr)
        return 1
    import httpx

    sample = sorted((settings.work_dir / commit_sha / "data" / "images" / "7").glob("*.png"))[0]
    response = httpx.post(urls["serving"] + "/predict", files={"file": (sample.name, sample.read_bytes(), "image/png")})
    prediction = response.json()
    print()
    print(f"commit SHA:      {commit_sha}")
    print(f"model version:   {prediction.get('model_version')} of {settings.model_name}")
    print(f"serving URL:     {urls['serving']}  (served commit {prediction.get('commit_sha')})")
    print(
        f"prediction:      {sample.relative_to(settings.work_dir / commit_sha)} -> "
        f"class {prediction['predictions'][0]['class']}"
    )
    print(f"Airflow UI:      {urls['airflow']}/dags/{PIPELINE_DAG_ID}/runs/{run['dag_run_id']}")
    print(f"MLflow UI:       {urls['mlflow']}")
    print(f"GitOps page:     {urls['airflow']}/plugin/gitops  (every commit, what serves now, roll back)")
    print("stop everything with: make stop")
    return 0


def cmd_trace(args) -> int:
    from gitops_ml import trace

    chain = trace.trace(_settings(args), args.ref)
    print(json.dumps(chain, indent=2, default=str) if args.json else trace.render(chain))
    return 0


def cmd_logs(args) -> int:
    from gitops_ml import logs

    settings = _settings(args)
    if args.ship:
        result = logs.ship(settings.home)
        print(f"shipped {result['shipped']}, kept {result['kept']} in the spool, dropped {result['dropped']}")
        return 0
    if not args.commit_sha:
        print("gitops-ml: error: give a commit SHA (or --ship)", file=sys.stderr)
        return 2
    docs = logs.search(settings.home, args.commit_sha, task_id=args.task, level=args.level)
    for d in docs:
        print(f"{d['@timestamp']} {d['labels'].get('task_id', '-'):18} {d['log']['level'].upper():8} {d['message']}")
    if not docs:
        print(f"no log lines for commit {args.commit_sha}", file=sys.stderr)
    return 0


def cmd_watch(args) -> int:
    """List the watched repositories, or show what the watcher would do (dry run, nothing started)."""
    from gitops_ml import watch

    watches = watch.load_watches()
    if args.action == "list":
        for w in watches:
            print(
                f"{w.name:16} {w.safe_url} [{w.branch}] policy={w.policy} signatures={w.signatures} "
                f"poll={w.poll_interval:g}s retrain={w.retrain_schedule}"
            )
        if not watches:
            print(f"no watched repository (configure {watch.config_path()} or GITOPS_ML_REPO_URL)", file=sys.stderr)
        return 0
    if not args.name:
        print("gitops-ml: error: give the name of a watched repository", file=sys.stderr)
        return 2
    watched = watch.get_watch(args.name)
    plan = watch.plan_branch(watched, Settings.from_env().git_cache_dir, args.since)
    if plan.force_push:
        print(f"force-push: removed {', '.join(plan.force_push['removed'])}")
    for d in plan.decisions:
        print(f"{d.commit_sha}  {d.action:11} {d.reason}" + (f"  WARNING: {d.warning}" if d.warning else ""))
    return 0


def cmd_gc(args) -> int:
    """Remove the work trees of finished runs beyond the retention limits and trim the DVC cache."""
    from gitops_ml import retention

    print(retention.collect(_settings(args), dry_run=args.dry_run).render())
    return 0


def cmd_doctor(args) -> int:
    """Check every configured endpoint and secret; one line per check, non-zero when one fails."""
    from gitops_ml import doctor

    text, status = doctor.report(doctor.run(_settings(args)))
    print(text)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gitops-ml", description="GitOps for machine learning on Airflow")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_repo(p):
        p.add_argument("--repo-url", help="model repository (default: GITOPS_ML_REPO_URL)")
        p.add_argument("--branch", help="tracked branch (default: GITOPS_ML_BRANCH or main)")
        return p

    p = sub.add_parser("init-demo", help="create the demo model repository")
    p.add_argument("path")
    p.add_argument("--remote-url", help="DVC remote (default: <GITOPS_ML_HOME>/dvc-remote)")
    p.add_argument("--branch", default="main")
    p.set_defaults(func=cmd_init_demo)

    p = sub.add_parser("serve", help="run the model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=cmd_serve)

    p = with_repo(sub.add_parser("run", help="run the pipeline in this process (no Airflow)"))
    p.add_argument("commit_sha", nargs="?")
    p.add_argument("--local", action="store_true", help="(the default; kept for clarity)")
    p.add_argument("--no-deploy", action="store_true")
    p.add_argument("--watch", help="a watched repository by name (its URL, branch, model and signature policy)")
    p.set_defaults(func=cmd_run)

    p = with_repo(sub.add_parser("trigger", help="start the Airflow run for a commit"))
    p.add_argument("commit_sha", nargs="?")
    p.add_argument(
        "--airflow-url", help="default: AIRFLOW_API_URL, else the stack `stack up` started, else http://127.0.0.1:8080"
    )
    p.add_argument("--wait", action="store_true")
    p.add_argument("--rerun", action="store_true", help="start another run even if this commit has one")
    p.add_argument("--watch", help="a watched repository by name (its URL, branch, model and run ids)")
    p.add_argument("--timeout", type=float, default=1800)
    p.set_defaults(func=cmd_trigger)

    p = with_repo(sub.add_parser("stack", help="start or stop the embedded stack"))
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--airflow-port", type=int, default=8080, help="Airflow UI and REST API (default 8080)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI (default 5000)")
    p.add_argument("--serve-port", type=int, default=8765, help="model server (default 8765)")
    p.set_defaults(func=cmd_stack)

    p = with_repo(sub.add_parser("trace", help="commit -> Airflow run -> MLflow version -> deploys -> serving"))
    p.add_argument("ref", help="a commit SHA (full or abbreviated) or a model version number")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("logs", help="a commit's log lines (Elasticsearch, or the local spool)")
    p.add_argument("commit_sha", nargs="?")
    p.add_argument("--task", help="only this task id")
    p.add_argument("--level", help="only this level (info, warning, error)")
    p.add_argument("--ship", action="store_true", help="bulk-load the local spool into ES_URL now")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("watch", help="watched repositories: list them, or plan (dry run) from a SHA")
    p.add_argument("action", choices=["list", "plan"])
    p.add_argument("name", nargs="?", help="watched repository (for plan)")
    p.add_argument("--since", help="plan the commits after this SHA (default: only the head)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "gc",
        help="remove old work trees (GITOPS_ML_KEEP_WORKTREES, GITOPS_ML_KEEP_FAILED_HOURS) "
        "and the DVC cache objects they no longer need",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("doctor", help="check every configured endpoint and secret (exit 1 on a failure)")
    p.set_defaults(func=cmd_doctor)

    p = with_repo(sub.add_parser("demo", help="the whole demo"))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        # Airflow, Keras, Matplotlib and MLflow, imported by some commands and by the processes the
        # stack starts, would otherwise create their files in the user's home.
        from gitops_ml.stack import contained_env

        for name, value in contained_env(Settings.from_env()).items():
            os.environ.setdefault(name, value)
        return args.func(args)
    except GitopsMLError as exc:
        print(f"gitops-ml: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"gitops-ml: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
