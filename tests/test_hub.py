"""Model card and Hub upload, against a loopback fake Hub (tests/hub_server.py) with the real client.

``huggingface_hub`` uploads through Xet whenever the ``hf_xet`` package is installed; the fake Hub speaks
only the plain-HTTP protocol (preupload, LFS batch + PUT, ndjson commit), so the ``loopback`` fixture
turns Xet off the way the library documents (``HF_HUB_DISABLE_XET``; the variables are read into
``huggingface_hub.constants`` at import, hence patched there) and lifts the offline mode that conftest
sets for every other test. It also sets ``HF_HUB_DISABLE_TELEMETRY`` (otherwise building the user agent
fetches ``/api/agent-harnesses`` from the default endpoint once a day) and points the default endpoint
at loopback too, so no request can leave 127.0.0.1. The fake Hub stops at the end of each test.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import socket
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import calibration_ids, make_tiny_model, make_tokenizer
from hub_server import FakeHub

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.evaluation import perplexity, sparsity_by_layer_type
from optimum_maiht.hub import HubPushError, push_to_hub
from optimum_maiht.model_card import render_model_card, write_model_card

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKEN = "hf_" + secrets.token_hex(16)  # made up per run: must never leave the Authorization header
REPO = "tester/tiny-llama-maiht-2of4"

# huggingface_hub's LFS upload passes a file object as ``data=``, which httpx2 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match[1])


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file: equal digests mean an untouched folder."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny 2:4-pruned Llama: pruner, model, report (with a short evaluation), saved folder with card."""
    tokenizer = make_tokenizer()
    model = make_tiny_model("llama")
    config = MAIHTConfig(pattern="2:4", num_samples=8, sequence_length=32, iterations=5, refit_iterations=5)
    pruner = MAIHTPruner(model, config, tokenizer=tokenizer)
    evaluate = dict(data="wikitext2-test", sequence_length=32, max_windows=4)
    before = perplexity(model, tokenizer, **evaluate)
    pruner.prune(calibration_ids(), progress=False)
    report = pruner.report
    report.evaluation = {
        "dataset": "wikitext-2-raw-v1 (test excerpt)",
        "split": "test",
        "sequence_length": 32,
        "windows": 4,
        "perplexity_before": before,
        "perplexity_after": perplexity(model, tokenizer, **evaluate),
    }
    folder = tmp_path_factory.mktemp("pruned") / "model"
    pruner.save_pretrained(folder)
    write_model_card(folder, report, base_model=BASE, license="apache-2.0")
    return SimpleNamespace(folder=folder, report=report, model=model, pruner=pruner)


@pytest.fixture
def folder(pruned, tmp_path):
    """A private copy of the saved folder, so that no test can disturb another."""
    return Path(shutil.copytree(pruned.folder, tmp_path / "model"))


def free_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What ``HF_ENDPOINT=url`` sets when huggingface_hub is imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def loopback(monkeypatch):
    """Let the client talk HTTP, but only to 127.0.0.1 (see the module docstring); returns the patcher."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
    return monkeypatch


@pytest.fixture
def hub(loopback):
    with FakeHub(TOKEN) as server:
        use_endpoint(loopback, server.url)
        yield server


# -- the card ------------------------------------------------------------------------------------------


def test_card_metadata_and_body(pruned):
    report, model = pruned.report.to_dict(), pruned.model
    text = (pruned.folder / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == BASE
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "mAIHT", "optimum", "2:4-sparsity"} <= set(meta["tags"])
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test" and result["dataset"]["config"] == "wikitext-2-raw-v1"
    values = [m["value"] for m in result["metrics"] if m["type"] == "perplexity"]
    evaluation = report["evaluation"]
    expected = [evaluation["perplexity_before"], evaluation["perplexity_after"]]
    assert values == pytest.approx(expected, abs=1e-4)
    # every layer type with the sparsity measured on the weights themselves, not copied from the report
    measured = sparsity_by_layer_type(model)
    for kind, share in measured.items():
        if kind != "overall":
            assert f"| `{kind}` | 2 | {100 * share:.2f}% |" in text
    assert f"**{100 * measured['overall']:.2f}%**" in text
    assert f'from_pretrained("{BASE}", config)' in text
    assert "AutoModelForCausalLM.from_pretrained(model_id)" in text
    assert "pages     = {66575--66596}" in text and "Wen, Canhong and Zuo, Yihong and Pan, Wenliang" in text
    config_rows = [line for line in text.splitlines() if re.match(r"^\| `(ignore|targets|pattern)` \|", line)]
    assert len(config_rows) == 3
    for line in config_rows:  # the regexes' "|" must not split the table row
        assert len(re.findall(r"(?<!\\)\|", line)) == 3


def test_card_unstructured_without_evaluation(pruned):
    report = dict(pruned.report.to_dict(), base_model="/some/local/folder", evaluation=None)
    report["config"] = dict(report["config"], pattern="unstructured", sparsity=0.6)
    card = render_model_card(report)
    meta = front_matter(str(card))
    assert "unstructured-sparsity" in meta["tags"] and "2:4-sparsity" not in meta["tags"]
    assert "base_model" not in meta and "license" not in meta and "model-index" not in meta
    assert "60% unstructured sparsity" in str(card) and "No evaluation was recorded" in str(card)
    assert card.data.to_dict()["tags"] == meta["tags"]  # huggingface_hub reads back what we wrote


def test_card_repo_id_and_errors(pruned):
    card = render_model_card(pruned.report, base_model=BASE, repo_id=REPO)
    assert f'model_id = "{REPO}"' in str(card)
    assert front_matter(str(card))["model-index"][0]["name"] == REPO.split("/")[1]
    with pytest.raises(ValueError, match="base_model"):
        render_model_card(pruned.report, base_model="/not/a/hub/id")
    with pytest.raises(ValueError, match="prune"):
        render_model_card({})
    with pytest.raises(ValueError, match="repo_id"):
        render_model_card(pruned.report, repo_id="two//slashes")


def test_card_for_a_compressed_folder(pruned, tmp_path):
    text = write_model_card(tmp_path, pruned.report, repo_id=REPO, storage_format="compressed").read_text()
    assert "model = MAIHTModelForCausalLM.from_pretrained(model_id)" in text
    assert "after `import optimum_maiht`: AutoModelForCausalLM.from_pretrained(model_id)" in text
    assert "Dense storage" not in text
    assert "Dense storage" in str(render_model_card(pruned.report))  # the default
    with pytest.raises(ValueError, match="storage_format"):
        render_model_card(pruned.report, storage_format="bitmask")


# -- pushing -------------------------------------------------------------------------------------------


def test_push_uploads_the_folder(hub, folder):
    before = digest(folder)
    url = push_to_hub(folder, REPO, private=True, token=TOKEN, endpoint=hub.url, commit_message="first")
    repo = hub.repos[REPO]
    (commit,) = repo.commits
    assert url == f"{hub.url}/{REPO}/commit/{repo.heads['main']}" and commit["summary"] == "first"
    assert repo.private
    create = next(r for r in hub.requests if r.route == "create")
    assert json.loads(create.body)["visibility"] == "private"
    uploaded = repo.branches["main"]
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert uploaded == local
    expected = {"model.safetensors", "config.json", "maiht_config.json", "maiht_report.json", "README.md"}
    assert expected <= set(uploaded)
    assert hub.lfs[hashlib.sha256(local["model.safetensors"]).hexdigest()] == local["model.safetensors"]
    meta = front_matter(uploaded["README.md"].decode())
    assert meta["base_model"] == BASE and "2:4-sparsity" in meta["tags"]
    assert all(
        r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r.route != "lfs_upload"
    )
    assert not any(TOKEN.encode() in content for content in uploaded.values())
    assert not any(TOKEN.encode() in r.body for r in hub.requests)
    assert "unknown" not in hub.routes()
    assert digest(folder) == before


def test_published_config_reproduces_the_run(hub, folder, pruned, tmp_path):
    push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url)
    config = MAIHTConfig.from_pretrained(REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    assert config.to_dict() == pruned.report.config


def test_create_pr_and_public_default(hub, folder):
    url = push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url, create_pr=True)
    repo = hub.repos[REPO]
    assert url == f"{hub.url}/{REPO}/discussions/1"
    assert not repo.private and "visibility" not in json.loads(
        next(r for r in hub.requests if r.route == "create").body
    )
    commit = next(r for r in hub.requests if r.route == "commit")
    assert commit.query.get("create_pr") == ["1"]
    assert repo.branches["main"] == {} and "model.safetensors" in repo.branches["refs/pr/1"]


def test_second_push_is_a_no_op_and_a_change_is_a_clean_commit(hub, folder):
    first = push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url) == first
    assert len(hub.repos[REPO].commits) == 1
    card = folder / "README.md"
    card.write_text(card.read_text() + "\nOne more line.\n")
    third = push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert third != first
    assert hub.repos[REPO].commits[-1]["files"] == ["README.md"]


def test_revision_goes_to_a_new_branch(hub, folder):
    push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url, revision="experiment")
    repo = hub.repos[REPO]
    assert "branch" in hub.routes()
    assert "model.safetensors" in repo.branches["experiment"] and repo.branches["main"] == {}


def test_token_and_endpoint_from_the_environment(hub, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_to_hub(folder, REPO)  # the hub fixture set the default endpoint, as HF_ENDPOINT does
    assert url.startswith(hub.url) and "model.safetensors" in hub.repos[REPO].branches["main"]


def test_private_is_refused_on_an_existing_public_repo(hub, folder):
    push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nchanged\n")
    with pytest.raises(HubPushError, match="already exists and is public"):
        push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url, private=True)
    assert len(hub.repos[REPO].commits) == 1


# -- failures --------------------------------------------------------------------------------------------


def assert_token_free(error: BaseException, token: str = TOKEN) -> None:
    assert token not in "".join(traceback.format_exception(error))


def test_server_error_keeps_the_folder_and_says_what_failed(hub, folder):
    before = digest(folder)
    hub.fail["commit"] = 500
    with pytest.raises(HubPushError, match=r"uploading the files.*HTTP 500") as info:
        push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert "local folder was not changed" in str(info.value)
    assert_token_free(info.value)
    assert hub.repos[REPO].commits == [] and digest(folder) == before


def test_unreachable_endpoint(loopback, folder):
    before = digest(folder)
    with pytest.raises(HubPushError, match="could not reach") as info:
        push_to_hub(folder, REPO, token=TOKEN, endpoint=f"http://127.0.0.1:{free_port()}")
    assert_token_free(info.value)
    assert digest(folder) == before


def test_rejected_token_is_never_echoed(loopback, folder):
    wrong = "hf_" + secrets.token_hex(16)
    with FakeHub(TOKEN, echo_credentials=True) as hub:
        with pytest.raises(HubPushError, match="HTTP 401") as info:
            push_to_hub(folder, REPO, token=wrong, endpoint=hub.url)
    assert "Bearer ***" in str(info.value)  # the server did echo it: the redaction is what kept it out
    assert_token_free(info.value, wrong)


def test_missing_token(hub, folder, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        push_to_hub(folder, REPO, endpoint=hub.url)
    assert hub.requests == []


def test_offline_mode_is_a_clear_error(folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_to_hub(folder, REPO, token=TOKEN)


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "bad repo", "user/../x", "user/name--x"])
def test_invalid_repo_id(folder, repo_id):
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(folder, repo_id, token=TOKEN)


def test_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        push_to_hub(tmp_path / "absent", REPO, token=TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_to_hub(tmp_path / "empty", REPO, token=TOKEN)


# -- MAIHTPruner integration -----------------------------------------------------------------------------


def test_pruner_save_pretrained_writes_the_card(pruned, tmp_path):
    folder = pruned.pruner.save_pretrained(tmp_path / "saved", model_card={"base_model": BASE})
    meta = front_matter((folder / "README.md").read_text())
    assert meta["base_model"] == BASE and "2:4-sparsity" in meta["tags"]


def test_pruner_push_to_hub(hub, pruned):
    url = pruned.pruner.push_to_hub(
        REPO, token=TOKEN, endpoint=hub.url, private=True, model_card={"base_model": BASE}
    )
    files = hub.repos[REPO].branches["main"]
    card = files["README.md"].decode()
    assert url.startswith(f"{hub.url}/{REPO}/commit/") and hub.repos[REPO].private
    assert front_matter(card)["base_model"] == BASE and f'model_id = "{REPO}"' in card
    assert {"model.safetensors", "config.json", "maiht_config.json", "maiht_report.json"} <= set(files)
