"""Hugging Face Hub model ids wherever a model dir is accepted: ``resolve_model``.

    edgetune train --model microsoft/Phi-3-mini-4k-instruct [--revision TAG_OR_COMMIT] ...

An existing local dir is used as it is. Anything else that is a valid Hub id (``org/name``)
is fetched with ``huggingface_hub.snapshot_download`` into the Hub's own cache (``HF_HOME`` /
``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads the cache only, ``HF_TOKEN`` or
``huggingface-cli login`` for gated and private repos): only config, tokenizer and
safetensors files, never pickled ``.bin`` / ``.pt`` weights, and no repo code (edgetune never
passes ``trust_remote_code``). The snapshot dir it returns names its repo and commit
(``models--org--name/snapshots/<commit>``), which is how runs record the exact Hub commit
they used (``hub_source``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError
from .models import TOKENIZER_FILES

#: what edgetune reads from a Hub repo (``model*.safetensors``: transformers' own names for
#: the weights and their shards; not e.g. Mistral's duplicate ``consolidated.safetensors``)
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.json",
)
_LOGIN = "log in with `huggingface-cli login` or set HF_TOKEN"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id ``org/name`` (huggingface_hub's own rules)."""
    if name.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local model dir of ``name_or_path``: an existing dir as it is, a Hub id (at
    ``revision``: branch, tag or commit; default main) as its snapshot in the Hub cache,
    downloaded when not there. A user's mistake is a one-line ModelError."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision:
            raise ModelError(
                f"{path}: --revision {revision} is for Hugging Face Hub ids (org/name), "
                "not a local directory"
            )
        return path
    name = str(name_or_path)
    try:
        hub_id = is_hub_id(name)
    except ImportError:  # huggingface_hub comes with the train and export extras
        raise ModelError(
            f"{name}: model directory not found (Hub ids need huggingface_hub: "
            "pip install 'edgetune[train]')"
        ) from None
    if not hub_id:
        raise ModelError(
            f"{name}: model directory not found (and not a Hugging Face Hub id, org/name)"
        )
    snapshot = Path(_download(name, revision))
    if not any(snapshot.glob("*.safetensors")):
        raise ModelError(
            f"{name}: no safetensors weights (model*.safetensors) at revision "
            f"{revision or 'main'}; edgetune loads safetensors only, never pickled .bin/.pt"
        )
    return snapshot


def _download(repo_id: str, revision: str | None) -> str:
    """``snapshot_download`` of edgetune's files, its errors as one-line ModelErrors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
    except GatedRepoError:
        raise ModelError(
            f"{repo_id}: a gated model on the Hugging Face Hub: accept its terms on "
            f"https://huggingface.co/{repo_id}, then {_LOGIN}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id}: not a local directory, and no such model on the Hugging Face Hub "
            f"(if it is private, {_LOGIN})"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"{repo_id}: no revision {revision or 'main'!r} on the Hugging Face Hub"
        ) from None
    except LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"{repo_id}: not a local directory, and not in the Hugging Face cache "
                f"({cache}){at} with HF_HUB_OFFLINE set: download it once online (unset "
                "HF_HUB_OFFLINE)"
            ) from None
        raise ModelError(
            f"{repo_id}: not a local directory; the Hugging Face Hub could not be reached "
            f"and the cache ({cache}) does not have it{at}"
        ) from None
    except OSError as e:  # other HTTP errors (HfHubHTTPError), the network, the disk
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{repo_id}: Hugging Face Hub download failed ({first})") from None


def hub_source(model_dir: str | os.PathLike) -> dict[str, str] | None:
    """``{"repo_id", "revision"}`` (the commit hash) of a dir in the Hub cache's layout
    (``.../models--org--name/snapshots/<commit>``, what ``resolve_model`` returns), else None:
    what a run records so that its base can be fetched again, commit for commit."""
    p = Path(model_dir).absolute()
    repo = p.parent.parent.name
    if p.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return {"repo_id": repo[len("models--") :].replace("--", "/"), "revision": p.name}
