"""The model card (``README.md``, Hub format) of a merged adapter, in every export; ``push_to_hub`` and the CLI's
``merge --tasks / --push-to-hub`` with ``huggingface_hub.HfApi`` mocked (nothing leaves the machine)."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

import geometry
from geometry.cli import main
from geometry.errors import AtlasError
from geometry.evaluation.merge_eval import MergeEvaluation
from geometry.io import hub
from geometry.merging import merge
from geometry.merging.card import CARD_FILE, model_card
from geometry.testing import random_adapter

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_adapters" / "synthetic"
PAIR = ("nli", "paraphrase")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def front_matter(card: str) -> dict:
    """The YAML between the card's first two ``---`` lines."""
    lines = card.splitlines()
    assert lines[0] == "---", card[:200]
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


def section(card: str, title: str) -> str:
    """The text of the card's ``## title`` section (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.M | re.S)
    assert match, f"no section {title!r} in the card"
    return match.group(1)


@pytest.fixture(scope="module")
def merged():
    """A TIES merge of two synthetic sample adapters (MiniLM base, hub id in their config)."""
    ads = geometry.load(SAMPLES)
    return geometry.merge(ads[list(PAIR)], method="ties", density=0.2)


@pytest.fixture(scope="module")
def scores():
    """Hand-made scores (no model run): two tasks, ANP the mean of ``normalized``."""
    frame = pd.DataFrame({"task": list(PAIR), "adapter": list(PAIR), "finetuned": [0.8, 0.9],
                          "merged": [0.7, 0.85], "normalized": [87.5, 94.44444]})
    return MergeEvaluation(method="ties", params={"density": 0.2}, frame=frame, anp=float(frame["normalized"].mean()),
                           tasks_total=2)


# ------------------------------------------------------------------------------------------------ the card
def test_card_front_matter_is_hub_yaml(merged):
    meta = front_matter(merged.model_card())
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == MINILM
    assert "ties" in meta["tags"] and "lora" in meta["tags"] and "merge" in meta["tags"]
    assert "license" not in meta  # not known unless given
    assert front_matter(merged.model_card(license="apache-2.0"))["license"] == "apache-2.0"


def test_card_lists_the_adapters_method_parameters_ranks_and_energy_of_merge_info(merged, tmp_path):
    folder = merged.to_peft_folder(tmp_path / "m")
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    info = json.loads((folder / "merge_info.json").read_text())
    adapters = section(card, "Adapters merged")
    for name, digest in zip(PAIR, merged.source_hashes):
        assert re.search(rf"^\| \d \| {name} \| .*{name}.* \| `{digest[:16]}` \|$", adapters, re.M), adapters
    params = section(card, "Method and parameters")
    assert "- method: `ties`" in params and "- density: `0.2`" in params
    assert "- weights: nli: 1, paraphrase: 1" in params
    ranks = sorted(set(info["ranks"].values()))
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    assert f"- rank per module: {shown} ({info['rank_rule']}), {len(info['ranks'])} modules" in params
    energy = re.search(r"- energy kept: ([0-9.]+)% .*lowest module ([0-9.]+)%", params)
    assert energy, params
    assert float(energy.group(1)) == pytest.approx(100 * info["energy_kept_total"], rel=1e-3)
    assert float(energy.group(2)) == pytest.approx(100 * info["energy_kept_min"], rel=1e-3)
    assert info["energy_kept_total"] < 1.0  # TIES truncates: the number is not a trivial 100
    assert f"- head in the weights: `{info['head']}`" in params
    # the card written in the folder is the one model_card gives for the same merge
    assert card == merged.model_card()


def test_card_without_scores_says_not_measured(merged):
    scores_text = section(merged.model_card(), "Scores")
    assert "Not measured" in scores_text and "ANP" not in scores_text


def test_card_with_scores_has_the_anp_and_one_row_per_task(merged, scores):
    card = merged.model_card(scores=scores)
    text = section(card, "Scores")
    anp = re.search(r"ANP \(average normalized performance\): ([0-9.]+)%", text)
    assert anp and anp.group(1) == f"{scores.anp:.2f}" and "Not measured" not in text
    assert "tasks scored" not in text  # complete: no "over the k of n tasks"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert len(rows) == 1 + len(scores.frame)  # the rule row, then one per task
    assert rows[1].startswith("| nli | nli | 0.8000 | 0.7000 | 87.50 |")
    partial = MergeEvaluation(method="ties", params={}, frame=scores.frame.iloc[:1], anp=87.5, tasks_total=2)
    assert "(over the 1 of 2 tasks scored)" in merged.model_card(scores=partial)


def test_card_scores_default_to_card_scores(merged, scores, tmp_path, monkeypatch):
    monkeypatch.setattr(merged, "card_scores", scores)
    card = (merged.to_peft_folder(tmp_path / "m") / CARD_FILE).read_text(encoding="utf-8")
    assert f"{scores.anp:.2f}%" in card and f"{scores.anp:.2f}%" in merged.model_card()
    other = MergeEvaluation(method="ties", params={}, frame=scores.frame, anp=12.345, tasks_total=2)
    assert "12.35%" in merged.model_card(scores=other)  # scores= wins over card_scores


def test_recipe_appears_as_yaml(merged):
    recipe = {"method": "ties", "density": 0.2, "adapters": list(PAIR)}
    block = re.search(r"## Recipe\n\n```yaml\n(.*?)\n```", merged.model_card(recipe=recipe), re.S)
    assert block and yaml.safe_load(block.group(1)) == recipe
    own = re.search(r"## Recipe\n\n```yaml\n(.*?)\n```", merged.model_card(), re.S)  # default: the merge's recipe
    assert own and own.group(1) == merged.recipe().strip()
    text = "method: ties\ndensity: 0.2\n"
    block = re.search(r"```yaml\n(.*?)\n```", merged.model_card(recipe=text), re.S)
    assert yaml.safe_load(block.group(1)) == {"method": "ties", "density": 0.2}


@pytest.mark.parametrize("where", ["absolute", "relative", "dotted"])
def test_a_local_base_gives_no_base_model_line(tmp_path, monkeypatch, where):
    base_dir = tmp_path / "models" / "minilm"
    base_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    base = {"absolute": str(base_dir), "relative": "models/minilm", "dotted": "./models/minilm"}[where]
    ads = [random_adapter(f"t{i}", layers=1, r=2, seed=i, base=base) for i in range(2)]
    card = model_card(merge(ads, "task_arithmetic"))
    assert "base_model" not in front_matter(card)
    outside_recipe = re.sub(r"## Recipe\n\n```yaml\n.*?\n```", "", card, flags=re.S)  # the recipe names its base
    assert not any(line.startswith("base_model:") for line in outside_recipe.splitlines())
    assert f"on the base model `{base}`." in card and "huggingface.co/models" not in card


def test_a_hub_base_is_linked(tmp_path):
    ads = [random_adapter(f"t{i}", layers=1, r=2, seed=i, base="some-org/some-base") for i in range(2)]
    card = model_card(merge(ads, "task_arithmetic"))
    assert front_matter(card)["base_model"] == "some-org/some-base"
    assert "[some-org/some-base](https://huggingface.co/some-org/some-base)" in card


def test_folder_and_zip_exports_hold_the_card(merged, scores, tmp_path):
    folder = merged.to_peft_folder(tmp_path / "m", scores=scores)
    assert (folder / "README.md").is_file()
    with zipfile.ZipFile(io.BytesIO(merged.to_zip_bytes(scores=scores))) as zf:
        assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "merge_info.json"} <= set(zf.namelist())
        assert zf.read("README.md").decode() == (folder / "README.md").read_text(encoding="utf-8")
    assert f"{scores.anp:.2f}%" in (folder / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ push_to_hub
class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call, and what the uploaded folder held at the time
    (the temporary folder is gone once ``push_to_hub`` returns)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.tokens: list[str | None] = []

    def __call__(self, token=None, **_):
        self.tokens.append(token)
        return self

    def create_repo(self, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", kwargs))
        return RepoUrl(f"https://huggingface.co/{kwargs['repo_id']}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub, "HfApi", fake)
    return fake


def test_push_to_hub_creates_a_private_repo_and_uploads_the_export(merged, fake_hub):
    url = merged.push_to_hub("owner/merged", token="hf_x")
    assert url == "https://huggingface.co/owner/merged"
    (name1, create), (name2, upload) = fake_hub.calls
    assert name1 == "create_repo" and name2 == "upload_folder"
    assert create["repo_id"] == "owner/merged" and create["private"] is True and create["exist_ok"] is True
    assert create.get("repo_type", "model") == "model" and upload["repo_id"] == "owner/merged"
    assert "ties" in upload["commit_message"] and "nli" in upload["commit_message"]
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(fake_hub.uploaded)
    assert front_matter(fake_hub.uploaded["README.md"].decode())["library_name"] == "peft"
    assert fake_hub.tokens == ["hf_x"]
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is cleaned up


def test_push_to_hub_public_and_with_scores(merged, scores, fake_hub):
    merged.push_to_hub("owner/merged", private=False, scores=scores, commit_message="mine")
    create, upload = (kw for _, kw in fake_hub.calls)
    assert create["private"] is False and upload["commit_message"] == "mine"
    assert f"{scores.anp:.2f}%" in fake_hub.uploaded["README.md"].decode()


def test_a_failing_hub_is_one_atlas_error_naming_the_repo(merged, monkeypatch):
    class Refusing(FakeHub):
        def create_repo(self, **kwargs):
            raise PermissionError("401 Client Error: Unauthorized\nfor url: https://huggingface.co/api/repos/create")

    monkeypatch.setattr(hub, "HfApi", Refusing())
    with pytest.raises(AtlasError) as exc:
        merged.push_to_hub("owner/merged")
    message = str(exc.value)
    assert "owner/merged" in message and "PermissionError" in message and "Unauthorized" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------ the CLI
def _paths() -> list[str]:
    return [str(SAMPLES / name) for name in PAIR]


def test_cli_merge_push_to_hub(fake_hub, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["merge", *_paths(), "--method", "task_arithmetic", "--push-to-hub", "owner/name",
                 "--token", "hf_t"]) == 0
    out = capsys.readouterr().out
    assert "pushed to https://huggingface.co/owner/name" in out and "wrote" not in out  # no --out: no folder
    create = fake_hub.calls[0][1]
    assert create["private"] is True and create["exist_ok"] is True and fake_hub.tokens == ["hf_t"]
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(fake_hub.uploaded)
    assert "Not measured" in fake_hub.uploaded["README.md"].decode()


def test_cli_merge_push_public_token_from_environment_and_out(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    out = tmp_path / "m"
    assert main(["merge", *_paths(), "--method", "task_arithmetic", "--out", str(out), "--push-to-hub", "owner/name",
                 "--public"]) == 0
    assert fake_hub.calls[0][1]["private"] is False and fake_hub.tokens == ["hf_env"]
    assert (out / "README.md").read_bytes() == fake_hub.uploaded["README.md"]
    assert "pushed to" in capsys.readouterr().out


def test_cli_push_failure_is_one_error_line(monkeypatch, capsys):
    class Refusing(FakeHub):
        def upload_folder(self, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.setattr(hub, "HfApi", Refusing())
    assert main(["merge", *_paths(), "--method", "task_arithmetic", "--push-to-hub", "owner/name"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: push to hub owner/name") and "no network" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra, message", [
    ([], "give --out DIR"),
    (["--out", "OUT", "--limit", "3"], "--limit applies to the scores of --tasks DIR"),
])
def test_cli_merge_argument_errors_are_one_line(tmp_path, capsys, extra, message):
    extra = [str(tmp_path / "o") if e == "OUT" else e for e in extra]
    assert main(["merge", *_paths(), "--method", "task_arithmetic", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # loads the MiniLM base and scores two tasks
def test_cli_merge_tasks_puts_the_scores_in_the_card(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", *_paths(), "--method", "task_arithmetic", "--out", str(out),
                 "--tasks", str(SAMPLES / "tasks"), "--limit", "4"]) == 0
    printed = re.search(r"scored on 2 tasks: ANP ([0-9.]+)%", capsys.readouterr().out)
    assert printed
    card = (out / "README.md").read_text(encoding="utf-8")
    text = section(card, "Scores")
    assert "ANP" in text and "Not measured" not in text
    assert f"ANP (average normalized performance): {printed.group(1)}%" in text
    assert all(f"| {name} | {name} |" in text for name in PAIR)


@pytest.mark.slow  # loads the MiniLM base and scores two tasks
def test_card_anp_equals_evaluate_merge(merged):
    scores = geometry.evaluate_merge(merged, tasks=SAMPLES / "tasks", limit=4)
    card = merged.model_card(scores=scores)
    assert f"**ANP (average normalized performance): {scores.anp:.2f}%**" in card
    assert len(scores.frame) == 2 and all(f"| {name} | {name} |" in card for name in PAIR)
