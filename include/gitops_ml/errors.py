"""Errors a user can act on.

Every error names the thing that was wrong (the SHA, the file, the key) in its
message.  ``InputError`` marks problems with the user's commit or data: retrying
cannot fix them, so the Airflow adapters fail the task at once instead of
retrying.
"""

from __future__ import annotations


class GitopsMLError(Exception):
    """Base class of every error raised on purpose by gitops-ml."""


class InputError(GitopsMLError):
    """The commit, its params or its data are wrong; retrying will not help."""


class CommitNotFound(InputError):
    """The requested SHA does not exist in the repository."""


class CommitNotOnBranch(InputError):
    """The SHA exists but is not reachable from the tracked branch."""


class InvalidRef(InputError):
    """A branch name or SHA is malformed (or looks like a command-line option)."""


class SignatureRejected(InputError):
    """The commit is not signed by an allowed key and its watch enforces signatures."""


class ParamsError(InputError):
    """``params.yaml`` is missing, unparsable, lacks a key or has a wrong type."""


class DataError(InputError):
    """DVC data is missing, does not match its hash, or is not a valid image folder."""


class ModelCodeError(InputError):
    """The commit's model code (``model/model.py`` or ``model.module``) cannot be imported, built or
    trained: the message names the file and line, or the ``params.yaml`` key."""


class ModelCodeTimeout(ModelCodeError):
    """The model code ran longer than ``train.timeout_minutes``."""


class DownloadRefused(ModelCodeError):
    """Model code tried to download something at training time (weights, data): not reproducible."""


class RegistryError(GitopsMLError):
    """The model registry refused an operation."""


class DeployError(GitopsMLError):
    """Deployment failed; the previous model was restored."""
