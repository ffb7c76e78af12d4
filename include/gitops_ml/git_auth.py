"""Hand the credentials of a repository URL to git through its environment, never its command line.

``https://user:token@host/repo.git`` on git's argv is readable by every local user in
``/proc/<pid>/cmdline`` (and ``ps``).  ``git_command(url)`` instead returns the URL without
its credentials, to put on the command line, and the environment variables to run git
with: a one-line credential helper (configured through ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_<n>``,
so not on argv either) that prints the user name and password from two environment
variables of the git process itself.  Environment variables of a process are readable
only by its own user (and root), like the worker's own configuration.

No git import here, so the triggerer and DAG files can use it cheaply.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

USERNAME_ENV = "GITOPS_ML_GIT_USERNAME"
PASSWORD_ENV = "GITOPS_ML_GIT_PASSWORD"
# Runs in git's shell (``!`` helper); answers only "get", so "store"/"erase" do nothing.
# The values never appear in the helper's text: it reads them from its own environment.
_HELPER = (
    '!f() { test "$1" = get || return 0; '
    f'printf "username=%s\\npassword=%s\\n" "${USERNAME_ENV}" "${PASSWORD_ENV}"; }}; f'
)
_SCHEMES_WITH_SECRETS = ("http", "https", "ftp", "ftps")


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user info, user name, password)``; the names percent-decoded.

    Only for HTTP(S)/FTP(S) URLs: an SSH user name (``ssh://git@host``) is not a secret and stays.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in _SCHEMES_WITH_SECRETS or "@" not in parts.netloc:
        return url, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return (
        urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)),
        unquote(user),
        unquote(password) if password or ":" in userinfo else None,
    )


def git_command(url: str, base_env: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """``(URL for git's argv, environment for git)``.

    The environment is ``base_env`` (default: ``os.environ``) plus, when the URL holds credentials,
    the helper and the two variables it reads; any other configured credential helper is
    reset first so that ours answers.  Without credentials the URL and environment are unchanged.
    """
    env = dict(os.environ if base_env is None else base_env)
    safe, user, password = split_credentials(url)
    if user is None:
        return url, env
    count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
    env.update(
        {
            f"GIT_CONFIG_KEY_{count}": "credential.helper",
            f"GIT_CONFIG_VALUE_{count}": "",
            f"GIT_CONFIG_KEY_{count + 1}": "credential.helper",
            f"GIT_CONFIG_VALUE_{count + 1}": _HELPER,
            "GIT_CONFIG_COUNT": str(count + 2),
            USERNAME_ENV: user,
            PASSWORD_ENV: password or "",
            "GIT_TERMINAL_PROMPT": "0",
        }
    )
    return safe, env


def git_env_overrides(url: str) -> tuple[str, dict[str, str]]:
    """Like ``git_command`` but only the variables to add (for GitPython's ``env=``, merged into its own)."""
    current = {"GIT_CONFIG_COUNT": os.environ.get("GIT_CONFIG_COUNT", "0")}
    safe, env = git_command(url, base_env=current)
    return safe, ({} if env == current else env)
