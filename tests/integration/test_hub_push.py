"""Model card and push, with the real huggingface_hub client against a local Hub-protocol server.

Why a server and not mocks: the client's real requests (create, validate-yaml, preupload, NDJSON
commit, retries) are what break in practice; mocking HfApi would only test the mock.
"""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants
from huggingface_hub.utils import _http

from distillkit.export.card import CardInfo, render_model_card, write_model_card
from distillkit.export.push import HubError, push_output
from tests.helpers.local_hub import LocalHub

REPO = "local-user/tiny-student"
PLANTED = "hf_PLANTEDsecret123"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """A local Hub with huggingface_hub pointed at it, and no token unless a test sets one."""
    home = tmp_path / "hf_home"
    with LocalHub() as server:
        # huggingface_hub reads these at import time: patch the constants as well as the env.
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        yield server


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client retries 5xx and dropped requests with 1-8 s sleeps: record them, don't wait."""
    waits: list[float] = []
    fake = types.SimpleNamespace(sleep=waits.append, time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr(_http, "time", fake)
    return waits


def card_info(**overrides: object) -> CardInfo:
    fields: dict = dict(
        teacher_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        teacher_revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
        family="sd15",
        pipeline_class="StableDiffusionPipeline",
        recipe="dmd2",
        student="lora",
        num_inference_steps=1,
        guidance_scale=0.0,
        scheduler="LCMScheduler",
        license="creativeml-openrail-m",
        config_summary={"lr": 1e-5, "lora.rank": 4, "batch_size": 2, "dmd2.gan": "off|on"},
        eval_results={"accuracy": 0.91, "fd": 123.4},
        sample_grid="samples/grid.png",
        has_lora=True,
        repo_id=REPO,
    )
    fields.update(overrides)
    return CardInfo(**fields)  # type: ignore[arg-type]


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    """A fake export: pipeline/ with a binary weights blob in a subfolder, and lora/."""
    rng = random.Random(0)
    out = tmp_path / "run" / "output"
    files = {
        "pipeline/model_index.json": b'{"_class_name": "StableDiffusionPipeline"}\n',
        "pipeline/scheduler/scheduler_config.json": b'{"_class_name": "LCMScheduler"}\n',
        "pipeline/unet/config.json": b'{"block_out_channels": [32, 64]}\n',
        "pipeline/unet/diffusion_pytorch_model.safetensors": (
            (30).to_bytes(8, "little") + b'{"__metadata__":{"a":"b"}}    ' + rng.randbytes(70_000)
        ),
        "pipeline/samples/grid.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "lora/pytorch_lora_weights.safetensors": rng.randbytes(5_000),
    }
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    write_model_card(out / "pipeline", card_info())
    return out


def expected_remote(out: Path) -> dict[str, bytes]:
    """Repo path -> bytes that a push of `out` should produce."""
    remote = {
        p.relative_to(out / "pipeline").as_posix(): p.read_bytes()
        for p in (out / "pipeline").rglob("*")
        if p.is_file()
    }
    remote |= {
        "lora/" + p.relative_to(out / "lora").as_posix(): p.read_bytes()
        for p in (out / "lora").rglob("*")
        if p.is_file()
    }
    return remote


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_push_arrives_byte_identical(hub: LocalHub, output_dir: Path) -> None:
    url = push_output(output_dir, REPO, token="hf_test")
    assert hub.files(REPO) == expected_remote(output_dir)
    assert url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert url.endswith(hub.commits(REPO)[-1].oid)
    assert [len(c.changed) for c in hub.commits(REPO)] == [0, 6, 1]  # init, pipeline, lora
    assert hub.count("validate-yaml") == 1  # the client checked the card's metadata


def test_push_without_lora_and_to_a_branch(hub: LocalHub, output_dir: Path) -> None:
    push_output(output_dir, REPO, token="hf_test", include_lora=False, revision="v1")
    assert hub.files(REPO) == {}  # main untouched
    assert not any(p.startswith("lora/") for p in hub.files(REPO, revision="v1"))
    assert "unet/diffusion_pytorch_model.safetensors" in hub.files(REPO, revision="v1")


def test_second_push_commits_only_the_changed_file(hub: LocalHub, output_dir: Path) -> None:
    push_output(output_dir, REPO, token="hf_test")
    first_head = hub.commits(REPO)[-1].oid
    (output_dir / "pipeline/unet/config.json").write_bytes(b'{"block_out_channels": [64, 64]}\n')
    url = push_output(output_dir, REPO, token="hf_test")
    commits = hub.commits(REPO)
    assert hub.files(REPO) == expected_remote(output_dir)
    assert commits[-1].oid != first_head and url.endswith(commits[-1].oid)
    assert commits[-1].changed == ["unet/config.json"]  # preupload oids let the client skip
    assert len(commits) == 4  # the unchanged lora/ made no empty commit


@pytest.mark.parametrize(
    ("status", "cause"),
    [(500, "HTTP 500"), (None, "lost the connection to"), (403, "HTTP 403")],
    ids=["http-500", "dropped-connection", "http-403"],
)
def test_failure_mid_upload_is_a_clear_hub_error(
    hub: LocalHub, output_dir: Path, no_backoff_sleep: list[float], status: int | None, cause: str
) -> None:
    before = tree_hashes(output_dir)
    hub.fail("commit", status)
    with pytest.raises(HubError) as err:
        push_output(output_dir, REPO, token="hf_test")
    message = str(err.value)
    assert "\n" not in message and cause in message and hub.endpoint in message
    assert "uploading pipeline/" in message
    assert tree_hashes(output_dir) == before
    assert hub.files(REPO) == {}  # nothing half-committed
    retried = status != 403  # 5xx and dropped links are retried by the client, 4xx are not
    assert hub.count("commit") == (6 if retried else 1)
    assert len(no_backoff_sleep) == (5 if retried else 0)


def test_dropped_and_failed_first_attempts_are_retried_to_completion(
    hub: LocalHub, output_dir: Path, no_backoff_sleep: list[float]
) -> None:
    """A link that drops the first preupload and a Hub that answers 503 to the first two
    commits: huggingface_hub's backoff retries them (the library's, not ours), and the push
    completes byte-identical, with one commit per part and none duplicated."""
    hub.fail("preupload", None, times=1)
    hub.fail("commit", 503, times=2)
    url = push_output(output_dir, REPO, token="hf_test")
    assert hub.files(REPO) == expected_remote(output_dir)
    assert [len(c.changed) for c in hub.commits(REPO)] == [0, 6, 1]
    assert url.endswith(hub.commits(REPO)[-1].oid) and len(no_backoff_sleep) == 3


def test_pushing_the_same_export_twice_adds_no_commit(hub: LocalHub, output_dir: Path) -> None:
    first = push_output(output_dir, REPO, token="hf_test")
    commits = len(hub.commits(REPO))
    second = push_output(output_dir, REPO, token="hf_test")
    assert len(hub.commits(REPO)) == commits and second == first
    assert hub.files(REPO) == expected_remote(output_dir)


def test_failure_on_the_lora_commit_says_what_was_pushed(hub: LocalHub, output_dir: Path) -> None:
    hub.fail("commit", 409, after=1)
    with pytest.raises(HubError, match=r"uploading lora/.*re-run to finish.*HTTP 409"):
        push_output(output_dir, REPO, token="hf_test")
    assert "unet/config.json" in hub.files(REPO)
    hub.failures.clear()
    push_output(output_dir, REPO, token="hf_test")  # the re-run completes it
    assert hub.files(REPO) == expected_remote(output_dir)


def test_unreachable_endpoint(hub: LocalHub, output_dir: Path, monkeypatch) -> None:
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    before = tree_hashes(output_dir)
    with pytest.raises(HubError, match=rf"could not reach {dead}: ConnectError"):
        push_output(output_dir, REPO, token="hf_test")
    assert tree_hashes(output_dir) == before


def test_no_token_tells_how_to_log_in(hub: LocalHub, output_dir: Path) -> None:
    with pytest.raises(HubError, match=r"hf auth login.*HF_TOKEN"):
        push_output(output_dir, REPO)
    assert hub.count("create") == 0


def test_missing_pipeline_dir_is_named(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=str(tmp_path / "empty" / "pipeline")):
        push_output(tmp_path / "empty", REPO, token="hf_test")


def test_planted_token_never_leaks(
    hub: LocalHub, output_dir: Path, monkeypatch, caplog, capsys, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    caplog.set_level(logging.DEBUG)
    push_output(output_dir, REPO)  # the token comes from the environment
    assert f"Bearer {PLANTED}" in hub.authorizations
    assert PLANTED not in caplog.text  # not even debug logs of the HTTP stack show it
    hub.fail("commit", 401, echo_auth=True)  # a server that quotes the token back
    (output_dir / "pipeline/unet/config.json").write_bytes(b"{}\n")
    with pytest.raises(HubError) as err:
        push_output(output_dir, REPO)
    assert "HTTP 401" in str(err.value) and "***" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # (httpcore's debug log does show the echoed response header: the server's doing, not ours)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("distillkit", "hugg"))]
    seen = [str(err.value), *ours, *capsys.readouterr()]
    seen += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert not [text for text in seen if PLANTED in text]


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_metadata_and_body() -> None:
    meta, body = split_card(render_model_card(card_info()))
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "creativeml-openrail-m"
    assert {"distillkit", "dmd2", "sd15", "one-step", "lora"} <= set(meta["tags"])
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "usage", "exec")  # the snippet is valid Python
    assert f'DiffusionPipeline.from_pretrained("{REPO}"' in code
    assert "num_inference_steps=1" in code and "guidance_scale=0.0" in code
    assert f'load_lora_weights("{REPO}", subfolder="lora"' in code
    stacking = body.split("### Stacking with a style LoRA", 1)[1].split("```python\n", 1)[1]
    stacking = stacking.split("```", 1)[0]
    compile(stacking, "stacking", "exec")
    assert 'set_adapters(["speed", "style"]' in stacking and 'adapter_name="speed"' in stacking
    assert "| `lr` | 1e-05 |" in body and "| `dmd2.gan` | off\\|on |" in body
    assert "| fd | 123.4 |" in body and "](samples/grid.png)" in body
    assert "451f4fe" in body


def test_model_card_minimal_and_local_teacher(tmp_path: Path) -> None:
    teacher = tmp_path / "teachers" / "tiny-sd15"
    teacher.mkdir(parents=True)
    info = card_info(
        teacher_id=str(teacher),
        teacher_revision=None,
        license=None,
        config_summary={},
        eval_results=[{"steps": 1, "fd": 9.5}, {"steps": 4}],
        sample_grid=None,
        has_lora=False,
        repo_id=None,
        num_inference_steps=4,
    )
    text = render_model_card(info)
    meta, body = split_card(text)
    assert "base_model" not in meta and "license" not in meta  # a local path is no hub id
    assert "few-step" in meta["tags"] and str(tmp_path) not in text
    assert "load_lora_weights" not in body and "| steps | fd |" in body and "| 4 |  |" in body
    compile(body.split("```python\n", 1)[1].split("```", 1)[0], "usage", "exec")


def test_model_card_of_a_flux_dev_student_names_its_licence_and_guidance(tmp_path: Path) -> None:
    """license: other with the teacher's licence name and link in the metadata, a Licence
    section in the body, and the usage snippet calls the student at dev's guidance input."""
    info = card_info(
        teacher_id="black-forest-labs/FLUX.1-dev",
        family="flux",
        pipeline_class="FluxPipeline",
        scheduler="FlowMatchLCMScheduler",
        license="other",
        license_name="flux-1-dev-non-commercial-license",
        license_link="https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
        guidance_scale=3.5,
        has_lora=False,
    )
    meta, body = split_card(render_model_card(info))
    assert (meta["license"], meta["license_name"]) == ("other", "flux-1-dev-non-commercial-license")
    assert meta["license_link"].endswith("FLUX.1-dev/blob/main/LICENSE.md")
    licence = body.split("## Licence", 1)[1]
    assert "`flux-1-dev-non-commercial-license`" in licence and "derivative" in licence
    assert "guidance_scale=3.5" in body.split("```python\n", 1)[1] and "FLUX.1" in body
