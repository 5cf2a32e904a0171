"""Publish a saved pruned folder to the Hugging Face Hub (docs/design.md, "Model card and Hub").

The upload goes through ``huggingface_hub.HfApi`` and so honours ``HF_TOKEN``, the cached login and
``HF_ENDPOINT``; the token never appears in a file, a log line or an exception message. The folder and its
model card are written by :func:`optimum_maiht.serialization.save_pruned`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token

from .constants import CARD_NAME
from .model_card import check_repo_id

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload mAIHT-pruned model with optimum-maiht"


class HubPushError(RuntimeError):
    """Pushing to the Hub failed. The message says what failed and how to fix it, and never holds the token;
    the local folder is left as it was."""


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen and len(seen) < 8:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _failure_message(err: BaseException, stage: str, repo_id: str, endpoint: str, folder: Path) -> str:
    """A user-facing description of a failed push (the caller redacts the token from it)."""
    chain = _chain(err)
    status = next(
        (
            getattr(getattr(e, "response", None), "status_code", None)
            for e in chain
            if getattr(getattr(e, "response", None), "status_code", None) is not None
        ),
        None,
    )
    network = any(
        isinstance(e, (ConnectionError, TimeoutError))
        or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")
        for e in chain
    )
    if status == 401:
        hint = (
            "the Hub rejected the credentials (HTTP 401): the token is invalid or expired; pass token=, "
            "set HF_TOKEN or run `hf auth login` with a token that has write access"
        )
    elif status == 403:
        hint = (
            f"the token may not write to {repo_id!r} (HTTP 403): use a token with write access to the "
            f"namespace {repo_id.split('/')[0]!r}"
        )
    elif status == 404:
        hint = "the repository or revision was not found (HTTP 404): check repo_id and revision"
    elif status is not None and status >= 500:
        hint = f"the server failed (HTTP {status}); nothing was committed by this call: retry later"
    elif status is not None:
        hint = f"the server refused the request (HTTP {status})"
    elif network:
        hint = f"could not reach {endpoint}: check the network, proxy settings or HF_ENDPOINT"
    else:
        hint = "unexpected error"
    causes = " <- ".join(f"{type(e).__name__}: {' '.join(str(e).split())}" for e in chain)
    return (
        f"pushing {folder} to {repo_id!r} at {endpoint} failed while {stage}: {hint}. Details: {causes}. "
        "The local folder was not changed."
    )


def _saved_folder(folder: str | os.PathLike) -> Path:
    """``folder``, checked to be a saved model folder before anything is sent (a warning without a card)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot push {folder}: no such folder; save the model first with pruner.save_pretrained(folder)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"cannot push {folder}: it has no config.json, so it is not a saved model "
            "folder; save the model with pruner.save_pretrained(folder)"
        )
    if not (folder / CARD_NAME).is_file():
        logger.warning(
            "%s has no %s: the repository will have no model card (see write_model_card)", folder, CARD_NAME
        )
    return folder


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a saved pruned model folder to a Hub model repository and return the commit (or PR) URL.

    The repository is created if needed (``private`` applies then; asking for ``private=True`` on an
    existing public repository is refused rather than publishing). ``token`` / ``endpoint`` default to
    ``HF_TOKEN`` or the cached login, and ``HF_ENDPOINT``. ``revision`` names a branch (created from
    ``main`` if missing); ``create_pr=True`` opens a pull request instead of committing to the branch.
    Unchanged files are not uploaded again, so pushing the same folder twice is a no-op the second time.
    Any failure raises :class:`HubPushError`; the local folder is only read.
    """
    folder = _saved_folder(folder)
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise HubPushError("cannot push while offline mode is on: unset the HF_HUB_OFFLINE variable")
    secret = token if token is not None else get_token()
    if not secret:
        raise HubPushError(
            "no Hugging Face token found: pass token=..., set the HF_TOKEN environment "
            "variable or run `hf auth login` (the token needs write access)"
        )
    api = HfApi(endpoint=endpoint, token=secret)
    logger.info("pushing %s to %s at %s", folder, repo_id, api.endpoint)
    stage = "creating the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private:
            stage = "checking the repository's visibility"
            if not api.repo_info(repo_id, repo_type="model").private:
                raise HubPushError(
                    f"private=True was asked for but {repo_id!r} already exists and is public; nothing was "
                    "uploaded. Make it private in its settings (or HfApi.update_repo_settings) or choose "
                    "another repo_id"
                )
        branch = revision not in (None, constants.DEFAULT_REVISION) and not revision.startswith("refs/")
        if branch and not create_pr:
            stage = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        stage = "uploading the files"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except HubPushError as err:
        raise HubPushError(_redact(str(err), secret)) from None
    except Exception as err:  # every failure becomes one clear, token-free message
        message = _failure_message(err, stage, repo_id, api.endpoint, folder)
        raise HubPushError(_redact(message, secret)) from None
    url = info.pr_url if create_pr and info.pr_url else info.commit_url
    logger.info("pushed %s to %s", folder, url)
    return str(url)
