"""Where the model and tokenizer come from: a local folder, or a hub id resolved to its snapshot
folder in the Hugging Face cache (the one network call of `harness plan`, downloading unless
HF_HUB_OFFLINE is set). After this the worker only ever reads local folders."""
from __future__ import annotations

import os
import re
from pathlib import Path

from harness.plan.errors import Problem
from harness.plan.model import ModelSpec

def resolve_model(model: ModelSpec, base_dir: Path) -> tuple[ModelSpec, list[Problem]]:
    """The model with local folders only: a path made absolute, a hub id replaced by its snapshot
    folder in the Hugging Face cache, an unset tokenizer set to the model's own folder (bytes for
    a builtin); and the problems found on the way."""
    problems = []
    path = None
    if model.path is not None:
        path, why = _local_folder(model.path, base_dir)
        if path is not None and not (Path(path) / "config.json").is_file():
            path, why = None, f"a Hugging Face model folder with config.json ({path} has none)"
        if path is None:
            problems.append(("model.path", model.path, why))
    tokenizer = model.tokenizer
    if tokenizer is None and model.builtin is not None:
        tokenizer = "bytes"
    elif tokenizer is None and path is not None:
        tokenizer = path
        if not _has_tokenizer(Path(path)):
            problems.append(("model.tokenizer", None, f"unset, so the model's own tokenizer, but {path} has no tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)}): give `tokenizer: bytes` (the built-in byte tokenizer) or a tokenizer folder"))
    elif tokenizer is not None and tokenizer != "bytes":
        tokenizer, why = _local_folder(model.tokenizer, base_dir)
        if tokenizer is not None and not _has_tokenizer(Path(tokenizer)):
            tokenizer, why = None, f"{tokenizer} has no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        if tokenizer is None:
            problems.append(("model.tokenizer", model.tokenizer, f"'bytes' or a tokenizer folder: {why}"))
    return model.model_copy(update={"path": path, "tokenizer": tokenizer}), problems


# A hub model id: 'org/name' (a relative path of two parts that does not exist locally reads as one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Not needed to train with transformers: other frameworks' weights, and Llama's original/ checkpoint.
HUB_IGNORED = ["*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.tflite", "*.ot", "*.gguf", "original/*", "coreml/*", "openvino/*"]


def _local_folder(value: str, base_dir: Path) -> tuple[str | None, str]:
    """(absolute folder, '') for an existing local folder or a hub id the cache has (downloaded
    first unless offline); (None, why not) otherwise."""
    local = base_dir / os.path.expanduser(value)
    if local.is_dir():
        return str(local.resolve()), ""
    if not HUB_ID.match(value):
        return None, f"an existing folder ({local} is not one) or a hub model id 'org/name'"
    return _hub_snapshot(value)


def _hub_snapshot(repo_id: str) -> tuple[str | None, str]:
    # Imported here: only plans that name a hub id pay for it.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.is_offline_mode()
    not_local = f"not a local folder, so read as a hub model id: '{repo_id}'"
    try:
        return snapshot_download(repo_id, local_files_only=offline, ignore_patterns=HUB_IGNORED), ""
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded (no network?)"
        return None, (f"{not_local} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; "
                      f"download it first with `hf download {repo_id}` (same HF_HOME or HF_HUB_CACHE), or give a local folder")
    except GatedRepoError:
        return None, f"{not_local} is gated: accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
    except RepositoryNotFoundError:
        return None, f"{not_local} does not exist on the hub (or is private: log in with `hf auth login` or HF_TOKEN)"
    except (HfHubHTTPError, OSError) as error:
        return None, f"{not_local} could not be downloaded: {error}"


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))
