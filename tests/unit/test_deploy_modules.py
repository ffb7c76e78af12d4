"""The deploy package's modules: the server does not load the deploy controller or its HTTP client."""

import json
import subprocess
import sys


def loaded_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys, json\n{statement}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {prefixes!r} "
        f"or m.startswith('gitops_ml.deploy.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_server_loads_neither_controller_nor_client_nor_a_backend():
    loaded = loaded_after("import gitops_ml.deploy.server", ("httpx", "tenacity", "mlflow", "tensorflow", "keras"))
    assert loaded == ["gitops_ml.deploy.metrics", "gitops_ml.deploy.server"]


def test_the_package_still_offers_deploy_and_deploy_error():
    from gitops_ml import deploy as package
    from gitops_ml.deploy import DeployError, controller
    from gitops_ml.errors import DeployError as error_class

    assert package.deploy is controller.deploy and DeployError is error_class
    assert controller.DeployError is error_class
