"""The Hugging Face hub in one place: the released checkpoints blip2 uses by default, whether the hub can be
reached, one-line errors instead of minutes of retries, and downloads for offline use later.

Every loader that may fetch from the hub (BLIP-2 checkpoints, language models, ``hf:`` and open_clip image
encoders, EVA ViT-g, CapFilt's captioner and ranker) calls :func:`require` (or :func:`require_open_clip`)
before the library does. ``require`` returns at once when the hub answers. When ``HF_HUB_OFFLINE=1`` is set,
or when the hub cannot be reached (a TCP connection to ``$HF_ENDPOINT``, or to the HTTPS proxy, that does
not open within ``PROBE_TIMEOUT_S``), the model must already be in the Hugging Face cache: then the libraries
are switched to offline mode for this process, so that they read the cache without retrying, and otherwise
a ``ModelNotFoundError`` says in one line which model, where it was looked for and how to fetch it.

``blip2 download model NAME...`` (:func:`download_targets`, :func:`download`) fetches what a recipe or
``blip2 ask`` needs into the cache, for use without network later (``HF_HUB_OFFLINE=1``).

Light on purpose: importing this module imports neither torch nor huggingface_hub.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from blip2cli.errors import Blip2Error, ModelNotFoundError

# The released checkpoint `blip2 ask` and `blip2 caption` use when no --model is given: the smallest stage-2
# BLIP-2 (about 4B parameters, 8 GB in fp16). `blip2 eval` defaults per task to the checkpoint the paper
# reports that task's number with instead (blip2cli/evaluation/tasks.py), because its point is the comparison.
DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
# The released stage-1 (Q-Former retrieval) checkpoint `blip2 embed` and `blip2 match` use.
DEFAULT_RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}
# What a repository download keeps: configs, tokenizer and processor files, and one copy of the weights.
_CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "qformer_tokenizer/*"]


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' older ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache() -> Path:
    """Where the Hugging Face libraries keep downloaded models (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is not a path on this machine."""
    name = str(name)
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".") and \
        not Path(name).expanduser().exists()


def is_cached(repo_id: str) -> bool:
    """Whether the cache holds a snapshot of ``repo_id`` (some of its files at least)."""
    snapshots = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@lru_cache(maxsize=None)
def reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (default: the hub), or to the proxy in between, opens
    within ``timeout`` seconds. Checked once per process."""
    target = urlparse(url or endpoint())
    proxy = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")) if target.scheme == "https" else (
        os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy"))
    proxy = proxy or os.environ.get("ALL_PROXY") or os.environ.get("all_proxy")
    if proxy:
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if not target.hostname:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Make this process (and its children) read the cache only, without network attempts or retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency
        return
    constants.HF_HUB_OFFLINE = True  # read at every request by huggingface_hub and transformers


def _missing(shown: str, why: str, download_name: str, local: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{shown} is not in the Hugging Face cache ({hub_cache()}) and {why}; fetch it where there is "
        f"network with `blip2 download model {download_name}` (into $HF_HOME/hub), or {local}"
    )


def require(repo_id: str, what: str = "model", download_name: str | None = None, shown: str | None = None,
            local: str = "give a local directory instead") -> None:
    """Call before a library fetches ``repo_id`` from the hub: see the module docstring. ``what`` names the
    model for the user ("language model", "CapFilt captioner"); ``download_name`` is what to pass to
    ``blip2 download model`` (default: ``repo_id``); ``shown`` replaces "WHAT REPO_ID" in the message;
    ``local`` ends it (the offline alternative)."""
    download_name = download_name or repo_id
    shown = shown or f"{what} {repo_id}"
    if offline_mode():
        if not is_cached(repo_id):
            raise _missing(shown, "HF_HUB_OFFLINE is set", download_name, local)
        return
    if reachable():
        return
    if is_cached(repo_id):
        go_offline()
        return
    raise _missing(shown, f"the hub ({endpoint()}) cannot be reached", download_name, local)


def open_clip_repo(model_name: str, tag: str | None) -> str | None:
    """The hub repository open_clip downloads ``model_name``'s ``tag`` weights from; None for a local file,
    an unknown tag or a tag served from a plain URL."""
    if not tag or os.path.isfile(tag):
        return None
    import open_clip

    # open_clip's convention: "owner/repo/" (default file name) or "owner/repo/file.bin".
    hf_hub = (open_clip.get_pretrained_cfg(model_name, tag) or {}).get("hf_hub") or ""
    return os.path.split(hf_hub)[0] or None


def require_open_clip(model_name: str, tag: str | None, what: str = "open_clip model",
                      download_name: str | None = None, local: str = "give a local weights file instead") -> None:
    """:func:`require` for open_clip pretrained weights given by tag."""
    repo = open_clip_repo(model_name, tag)
    if repo is not None:
        require(repo, what, download_name or f"open_clip:{model_name}:{tag}",
                shown=f"{what} open_clip:{model_name}:{tag} (hub repository {repo})", local=local)


def failure_reason(err: BaseException) -> str:
    """A hub error in a few words (offline, no such repository, gated...)."""
    from huggingface_hub import errors as hub_errors

    if isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)):
        return "no network, and not in the local Hugging Face cache"
    if isinstance(err, hub_errors.RepositoryNotFoundError):
        return "no such repository, or it is private"
    if isinstance(err, hub_errors.GatedRepoError):
        return "gated repository: log in with `hf auth login` after accepting its licence"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fetch(repo_id: str, what: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """A local snapshot of ``repo_id``: downloaded (configs, tokenizer and one copy of the weights unless
    ``allow_patterns`` says otherwise), or from the cache offline. One-line ``ModelNotFoundError`` on failure."""
    require(repo_id, what)
    from huggingface_hub import snapshot_download

    try:
        if allow_patterns is None and not offline_mode():
            allow_patterns = _weight_patterns(repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, cache_dir=hub_cache()))
    except Exception as err:  # offline, unknown repo, gated repo...
        raise ModelNotFoundError(f"could not fetch {what} {repo_id} from the Hugging Face hub "
                                 f"({failure_reason(err)})") from None


def _weight_patterns(repo_id: str) -> list[str]:
    """safetensors weights where the repository has them, else PyTorch .bin ones (never TF/Flax/ONNX)."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo_id)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    return [*_CONFIG_PATTERNS, weights]


# ============================================================================ blip2 download model
@dataclass(frozen=True)
class Target:
    """One thing to download: a hub repository, or open_clip weights by model name and tag."""

    what: str  # for the user: "language model opt-2.7b", "image encoder eva-vit-g"...
    repo_id: str | None = None
    open_clip: tuple[str, str] | None = None


def download_targets(names: list[str]) -> list[Target]:
    """What ``names`` need from the hub. A name is a hub id (``owner/name``), an LLM preset (``opt-2.7b``),
    an image-encoder name (``eva-vit-g``, ``clip-vit-l``, ``open_clip:MODEL:TAG``, ``hf:ID``) or a recipe (a
    shipped name or a TOML file), which means its image encoder, LLM, Q-Former BERT and ``init_from``."""
    targets: list[Target] = []
    for name in names:
        for target in _targets(name):
            if target not in targets:
                targets.append(target)
    return targets


def _targets(name: str) -> list[Target]:
    from blip2cli.models.llm import LLM_PRESETS
    from blip2cli.recipes import list_recipe_names

    if name.endswith(".toml") or name in list_recipe_names():
        from blip2cli.recipes import load_recipe

        return recipe_targets(load_recipe(name))
    if name in LLM_PRESETS:
        return [Target(f"language model {name}", repo_id=LLM_PRESETS[name])]
    if looks_like_hub_id(name):
        return [Target("model", repo_id=name)]
    vision = _vision_targets(name)
    if vision or name.startswith(("eva-vit-g:", "open_clip:", "hf:")):
        return vision
    raise Blip2Error(
        f"unknown model name {name!r}: give a hub id (owner/name), an LLM preset ({', '.join(LLM_PRESETS)}), an "
        "image encoder (eva-vit-g, clip-vit-l, open_clip:MODEL:TAG, hf:ID) or a recipe (`blip2 recipes list`)"
    )


def recipe_targets(recipe) -> list[Target]:
    """What a recipe's model needs from the hub: its image encoder, Q-Former BERT, LLM and ``init_from``."""
    from blip2cli.models.llm import LLM_PRESETS

    m = recipe.model
    found = _vision_targets(m.vision) + _plain(m.qformer_init, "Q-Former BERT")
    if m.llm:
        found += _plain(LLM_PRESETS.get(m.llm, m.llm), f"language model {m.llm}")
    if m.init_from:
        found += _plain(m.init_from, "checkpoint")
    return found


def require_all(targets: list[Target]) -> None:
    """:func:`require` for each target: a run fails in seconds, before anything is built, when a part is
    neither reachable nor cached."""
    for target in targets:
        if target.repo_id is not None:
            require(target.repo_id, target.what)
        else:
            model_name, tag = target.open_clip
            require_open_clip(model_name, tag, target.what)


# Recipe values that name models built from a config (tests, the demo), not hub repositories.
_BUILT_NAMES = {"tiny", "tiny-opt", "tiny-t5"}


def _plain(name: str | None, what: str) -> list[Target]:
    """``name`` as a hub repository: ``owner/name``, or a bare legacy id such as ``bert-base-uncased``."""
    name = str(name or "")
    bare = re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) is not None and name not in _BUILT_NAMES
    if looks_like_hub_id(name) or (bare and not Path(name).expanduser().exists()):
        return [Target(what, repo_id=name)]
    return []


def _vision_targets(name: str) -> list[Target]:
    from blip2cli.models.vision_loading import EVA_OPEN_CLIP, _spec_from_name

    try:
        spec = _spec_from_name(name, None)
    except ValueError:
        return []
    what = f"image encoder {name}"
    if spec["kind"] == "eva":
        return [] if spec.get("pretrained") else [Target(what, open_clip=EVA_OPEN_CLIP)]
    if spec["kind"] == "open_clip":
        tag = spec.get("pretrained")
        return [Target(what, open_clip=(spec["model_name"], tag))] if tag and not os.path.isfile(tag) else []
    return _plain(spec.get("name_or_path"), what)


def download(target: Target) -> Path:
    """Fetch ``target`` into the Hugging Face cache; the local path of what was fetched."""
    if target.repo_id is not None:
        return fetch(target.repo_id, target.what)
    import open_clip

    model_name, tag = target.open_clip
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise Blip2Error(f"open_clip {model_name} has no pretrained tag {tag!r}")
    require_open_clip(model_name, tag, target.what, f"open_clip:{model_name}:{tag}")
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as err:
        raise ModelNotFoundError(f"could not fetch {target.what} ({model_name}:{tag}): {failure_reason(err)}") from None
