"""Resolving a model source to local files: a path as is, or a Hugging Face Hub repo id.

From the hub only what the pipeline needs is downloaded: the configs first, then for each
component one weights format (safetensors preferred, the requested precision variant
preferred). Network problems become one HubError that says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dite.engine.errors import HubError

# Trained demo models (see models/demo/README.md): name -> folder. Most ship as package data of
# dite.models.demo; those in OUTSIDE_WHEEL are too large for the wheel's ~40 MB demo budget and
# live in a source checkout's demos/ folder, or in dite's user cache once tools/fetch_demo.py
# has put them there.
DEMO_MODELS = {"demo-sd3": "sd3", "demo-dit": "dit", "demo-pixart": "pixart", "demo-sd3-128": "sd3_128"}
DEMO_FAMILIES = {"demo-sd3": "sd3", "demo-dit": "dit", "demo-pixart": "pixart", "demo-sd3-128": "sd3"}
OUTSIDE_WHEEL = {"demo-sd3-128"}


def demo_locations(source: str) -> list[Path]:
    """Where the demo `source` may be, in the order searched."""
    from importlib.resources import files

    name = DEMO_MODELS[source]
    if source not in OUTSIDE_WHEEL:
        return [Path(str(files("dite.models.demo") / name))]
    from dite.engine.runtime.user_cache import cache_dir

    return [checkout_demos() / name, cache_dir() / "demos" / name]


def checkout_demos() -> Path:
    """demos/ of the source checkout an editable install runs from (absent in a wheel install)."""
    from importlib.resources import files

    return Path(str(files("dite.models"))).parent / "demos"


def demo_folder(source) -> "Path | None":
    """The folder of a demo model ("demo-sd3", "demo-dit", "demo-pixart", "demo-sd3-128"), or None
    when `source` is not a demo name."""
    if not isinstance(source, str) or source not in DEMO_MODELS:
        return None
    from dite.engine.errors import CheckpointError

    places = demo_locations(source)
    for folder in places:
        if (folder / "model_index.json").is_file():
            return folder
    if source in OUTSIDE_WHEEL:
        raise CheckpointError(f"the demo model {source!r} does not ship in the wheel; from a dite source checkout run "
                              f"`python tools/fetch_demo.py {source}` (copies it to {places[-1]}), or pass its folder")
    raise CheckpointError(f"the demo model {source!r} is not in this installation ({places[0]} is missing); "
                          "reinstall dite, or train and export it (tools/train_all_demo.sh, tools/train_all_demo_v2.sh)")


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.model"]


def looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) >= 2 and bool(REPO_ID.match("/".join(parts[:2]))) and not source.startswith((".", "/", "~"))


def resolve_source(source: str | os.PathLike, *, revision: str | None = None, variant: str | None = None) -> Path:
    """A local path (file or folder) for `source`, downloading from the hub if needed.

    "owner/name" downloads a diffusers pipeline repo; "owner/name/path/in/repo.safetensors"
    one file of it.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    text = str(source)
    if not looks_like_repo_id(text):
        raise HubError(f"{text}: no such file or folder (and not a hub repo id like 'owner/name')")
    parts = text.split("/")
    repo_id = "/".join(parts[:2])
    if len(parts) > 2:
        return Path(_hub_call(repo_id, "hf_hub_download", repo_id=repo_id, filename="/".join(parts[2:]), revision=revision))
    folder = Path(_hub_call(repo_id, "snapshot_download", repo_id=repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS))
    if not (folder / "model_index.json").exists():
        raise HubError(f"hub repo {repo_id} has no model_index.json; for a single checkpoint file give its path in the repo, e.g. {repo_id}/model.safetensors")
    from dite.engine.loading.config_files import read_model_index

    components = [k for k, v in read_model_index(folder).items() if isinstance(v, list) and not k.startswith("_")]
    files = _hub_call(repo_id, "list_repo_files", repo_id=repo_id, revision=revision)
    wanted = [f for comp in components for f in choose_weights(files, comp, variant)]
    if wanted:
        _hub_call(repo_id, "snapshot_download", repo_id=repo_id, revision=revision, allow_patterns=wanted)
    return folder


TOKENIZER_PATTERNS = ["tokenizer/*", "tokenizer_2/*", "tokenizer_3/*"]


def resolve_tokenizers(source: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder holding SD3's tokenizer/, tokenizer_2/, tokenizer_3/: a path as is, or
    a hub repo id of which only those folders (a few MB) are downloaded."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    text = str(source)
    if not looks_like_repo_id(text) or len(text.split("/")) != 2:
        raise HubError(f"tokenizers {text}: no such folder (and not a hub repo id like 'owner/name')")
    return Path(_hub_call(text, "snapshot_download", repo_id=text, revision=revision,
                          allow_patterns=TOKENIZER_PATTERNS))


WEIGHT_FILE = re.compile(r"^\w+?(?:\.(?P<var>[\w]+))?(?:-\d+-of-\d+)?\.(?P<ext>safetensors|bin)$")
INDEX_FILE = re.compile(r"^\w+?(?:\.(?P<var1>\w+))?\.(?P<ext>safetensors|bin)\.index(?:\.(?P<var2>\w+))?\.json$")


def choose_weights(files: list[str], component: str, variant: str | None) -> list[str]:
    """The weight files of one component to download: safetensors over .bin, the variant
    over the default precision, a whole shard set with its index."""
    kinds: dict[tuple[str, str | None], list[str]] = {}
    for f in files:
        folder, _, name = f.partition("/")
        if folder != component or "/" in name:
            continue
        if m := WEIGHT_FILE.match(name):
            kinds.setdefault((m["ext"], m["var"]), []).append(f)
        elif m := INDEX_FILE.match(name):
            kinds.setdefault((m["ext"], m["var1"] or m["var2"]), []).append(f)
    for ext in ("safetensors", "bin"):
        for var in ([variant, None] if variant else [None]):
            chosen = kinds.get((ext, var), [])
            if any(not f.endswith(".json") for f in chosen):
                return sorted(chosen)
    return []


def _hub_call(repo: str, fn: str, **kwargs):
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - a runtime dependency
        raise HubError("huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        if fn == "list_repo_files":
            return huggingface_hub.HfApi().list_repo_files(**kwargs)
        return getattr(huggingface_hub, fn)(**kwargs)
    except errors.LocalEntryNotFoundError:
        raise HubError(
            f"could not download {repo} from the Hugging Face Hub: no connection (or HF_HUB_OFFLINE "
            "is set) and it is not in the local cache; connect to the network, or pass a local path"
        ) from None
    except errors.GatedRepoError:
        raise HubError(f"hub repo {repo} is gated: accept its licence on the hub and log in (hf auth login)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"hub repo {repo} does not exist or is private (log in with hf auth login if it is yours)") from None
    except (errors.RevisionNotFoundError, errors.EntryNotFoundError) as exc:
        raise HubError(f"hub repo {repo}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # connection errors come in many types (httpx, requests, OSError)
        raise HubError(
            f"could not download {repo} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no details'}); check the network, "
            "or pass a local path to the model"
        ) from None
