"""``[core] hostname_callable`` of the test cluster's Celery workers.

Both workers run on one machine, so the default (the machine's FQDN) would not tell them apart in
the task instances; each worker names itself with ``GITOPS_ML_TEST_HOSTNAME`` instead, as two
machines would by their host names.
"""

import os


def worker_hostname() -> str:
    return os.environ["GITOPS_ML_TEST_HOSTNAME"]
