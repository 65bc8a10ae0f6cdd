"""Publish a run's export to the Hub: refresh its model card (repo id, eval table, sample
grid) from the run's own files, then upload, never persisting or echoing the user's token.

Why the refresh: the card is written at export time, before the repo id, the evaluation and the
final grid are known. Both the end-of-run push (hub.push: true) and `distillkit push` rebuild it,
so the Hub page is always current. Network access happens only in ``push_output``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from distillkit.export.card import CardInfo, card_info, export_call_defaults, write_model_card
from distillkit.export.eval_card import generated_section, replace_section

logger = logging.getLogger(__name__)
_LOGIN_HINT = "run `hf auth login` or set the HF_TOKEN environment variable (a write token)"

GRID = "samples/grid.png"  # where the card's grid lives inside pipeline/


def latest_grid(output_dir: Path) -> Path | None:
    grids = sorted((Path(output_dir) / "samples").glob("step-*.png"))
    return grids[-1] if grids else None


def eval_rows(output_dir: Path) -> list[dict[str, Any]]:
    """One table row per eval JSON in the run dir (eval*.json, eval/*.json): scalar metrics."""
    output_dir = Path(output_dir)
    files = sorted(output_dir.glob("eval*.json")) + sorted(output_dir.glob("eval/*.json"))
    rows = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("skipping unreadable eval file %s", path)
            continue
        if not isinstance(data, dict):
            continue
        protocol = data.get("protocol") or {}
        row: dict[str, Any] = {"eval": path.stem, "steps": protocol.get("steps", "")}
        row |= {
            k: v
            for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "n"
        }
        row["samples"] = data.get("n", protocol.get("samples", ""))
        rows.append(row)
    return rows


def card_for_run(output_dir: Path, repo_id: str | None) -> CardInfo | None:
    """The run's CardInfo rebuilt from run.yaml + pipeline/distillkit.json; None if not a run."""
    from distillkit.config import RunConfig

    output_dir = Path(output_dir)
    run_file = output_dir / "run.yaml"
    if not run_file.is_file():
        return None
    try:
        saved = yaml.safe_load(run_file.read_text())
        cfg = RunConfig.model_validate(saved["config"])
    except Exception as err:  # an older schema: push as exported rather than fail
        logger.warning("cannot rebuild the card from %s: %s", run_file, err)
        return None
    info = card_info(cfg, bool(saved.get("smoke")))
    call = export_call_defaults(output_dir / "pipeline")
    info.num_inference_steps = int(call.get("num_inference_steps", info.num_inference_steps))
    info.guidance_scale = float(call.get("guidance_scale", info.guidance_scale))
    info.has_lora = (output_dir / "lora").is_dir()
    info.repo_id = repo_id
    info.eval_results = eval_rows(output_dir) or None
    return info


def refresh_card(output_dir: Path, repo_id: str | None) -> bool:
    """Copy the last sample grid into pipeline/ and rewrite README.md; False if not a run dir.

    An evaluation section written by `distillkit eval --card` (table + protocol line) is kept in
    place of the eval*.json table: it is the more specific one.
    """
    output_dir = Path(output_dir)
    info = card_for_run(output_dir, repo_id)
    if info is None:
        return False
    readme = output_dir / "pipeline" / "README.md"
    kept = generated_section(readme.read_text(encoding="utf-8")) if readme.is_file() else None
    if kept:
        info.eval_results = None
    grid = latest_grid(output_dir)
    if grid is not None:
        target = output_dir / "pipeline" / GRID
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, target)
        info.sample_grid = GRID
    write_model_card(output_dir / "pipeline", info)
    if kept:
        text = replace_section(readme.read_text(encoding="utf-8"), kept)
        readme.write_text(text, encoding="utf-8", newline="\n")
    return True


def publish(
    output_dir: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> tuple[str, bool]:
    """Refresh the card when the run's files allow it, then push; (commit URL, card refreshed)."""
    output_dir = Path(output_dir)
    refreshed = (output_dir / "pipeline").is_dir() and refresh_card(output_dir, repo_id)
    url = push_output(output_dir, repo_id, private=private, revision=revision, token=token)
    return url, refreshed


class HubError(RuntimeError):
    """A push failed; the message is one line, safe to show (never contains the token)."""


def _resolve_token(token: str | None) -> str:
    """Explicit token, else HF_TOKEN, else the saved `hf auth login` token."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange
        raise HubError(
            f"could not get a Hugging Face token ({type(exc).__name__}): {_LOGIN_HINT}"
        ) from None
    if not found:
        raise HubError(f"no Hugging Face token found: {_LOGIN_HINT}")
    return found


def _describe(exc: BaseException, endpoint: str) -> str:
    """One line naming the cause; HTTP errors keep status, route and the server's message."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    name = type(exc).__name__
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so {endpoint} is not contacted: unset it to push"
    response = getattr(exc, "response", None)
    if isinstance(exc, HfHubHTTPError) and response is not None:
        request = response.request
        cause = f"{endpoint} answered HTTP {response.status_code} to {request.method} "
        cause += request.url.path
        if exc.server_message:
            cause += f": {exc.server_message.strip().splitlines()[0]}"
        if response.status_code in (401, 403):
            cause += f" (check the token's write access: {_LOGIN_HINT})"
        return cause
    if type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore"} or isinstance(
        exc, ConnectionError
    ):
        verb = "could not reach" if name.startswith("Connect") else "lost the connection to"
        return f"{verb} {endpoint}: {name}" + (f" ({first})" if first and first != name else "")
    return f"{name}: {first}" if first else name


def push_output(
    output_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    include_lora: bool = True,
) -> str:
    """Upload output_dir/pipeline/ as the repo root (and lora/ as `lora/`); return the commit URL.

    Two commits (pipeline, then LoRA): re-running after a failure uploads only what changed.
    Local files are only read. HF_ENDPOINT is honoured, even when set after import.
    """
    output_dir = Path(output_dir)
    pipeline_dir, lora_dir = output_dir / "pipeline", output_dir / "lora"
    if not pipeline_dir.is_dir():
        raise HubError(f"nothing to push: {pipeline_dir} does not exist (run the export first)")
    if not (pipeline_dir / "model_index.json").is_file():
        raise HubError(f"{pipeline_dir} has no model_index.json: not a diffusers pipeline export")
    token = _resolve_token(token)

    from huggingface_hub import HfApi

    api = HfApi(
        endpoint=os.environ.get("HF_ENDPOINT", "").rstrip("/") or None, library_name="distillkit"
    )
    stage = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if revision and revision != "main":
            stage = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        stage = "uploading pipeline/"
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=pipeline_dir,
            revision=revision,
            token=token,
            commit_message="Upload distilled pipeline (distillkit)",
        )
        if include_lora and lora_dir.is_dir():
            stage = "uploading lora/ (pipeline/ is already pushed: re-run to finish)"
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=lora_dir,
                path_in_repo="lora",
                revision=revision,
                token=token,
                commit_message="Upload distilled LoRA (distillkit)",
            )
    except Exception as exc:
        message = f"push to {repo_id} failed while {stage}: {_describe(exc, api.endpoint)}"
        leaked = token in str(exc) or token in repr(exc.args)
        raise HubError(message.replace(token, "***")) from (None if leaked else exc)
    url = str(getattr(commit, "commit_url", commit))
    logger.info("pushed %s to %s", output_dir, url)
    return url
