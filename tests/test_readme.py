"""The README and docs/ stay true: the configuration reference is the schema's, every docs page is reachable
from the README, the method is cited inside the repository, and the commands given exist."""

from __future__ import annotations

from pydantic import BaseModel

from pipeline.config import Config
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        key = prefix + (field.alias or name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, key + ".")
        else:
            out.append(key)
    return out


def test_the_configuration_reference_is_the_schemas():
    """docs/configuration.md's tables are what `make docs` generates now: adding, removing or re-describing a
    key without regenerating fails here."""
    from pipeline._reference import current, reference

    text = (REPO / "docs" / "configuration.md").read_text()
    assert current(text) == reference(), "docs/configuration.md is stale: run `make docs`"
    missing = [k for k in _keys(Config) if f"`{k}`" not in text]
    assert not missing, missing


def test_readme_is_a_landing_page_that_reaches_every_docs_page():
    import re

    assert len(README.splitlines()) < 200
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README))
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"
    for page in (REPO / "docs").glob("*.md"):  # links between pages resolve
        for target in re.findall(r"\]\(([\w.-]+\.md)", page.read_text()):
            assert (REPO / "docs" / target).is_file(), f"{page.name} links to missing {target}"
    first = re.search(r"```\n(.+?)\n", README).group(1)
    assert first.startswith("make demo"), "the first command shown runs on a fresh clone"


def test_the_method_is_cited_inside_the_repository():
    """No file a user gets points outside the repository for the method (../shared is not shipped)."""
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".txt"}
    for path in REPO.rglob("*"):
        if {".venv", ".git", "runs"} & set(path.parts) or not path.is_file() or path.suffix not in suffixes:
            continue
        if path.name == "test_readme.py":
            continue
        text = path.read_text(errors="replace")
        assert "../shared" not in text and "METHOD.md" not in text, path


def test_readme_commands_exist():
    makefile = (REPO / "Makefile").read_text()
    for target in ("install", "demo", "test", "lint", "bench", "bench-quick", "bench-arch"):
        assert f"\n{target}:" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_examples_use_real_commands_and_config_keys():
    import re

    import yaml

    keys = set(_keys(Config))
    workflow = (REPO / "examples" / "nightly-compress.yml").read_text()
    yaml.safe_load(workflow)
    for name in ("nightly-compress.yml", "Makefile.deploy"):
        text = (REPO / "examples" / name).read_text()
        used = re.findall(r"--set ([\w.]+)=", text)
        assert used and set(used) <= keys, f"{name} sets unknown keys {set(used) - keys}"
        verbs = set(re.findall(r"(?:\$\(COMPRESS\)|/compress) (\w+) ", text))
        assert verbs and verbs <= {"pipeline", "validate", "export"}, verbs
    assert "gpu-check:" in (REPO / "Makefile").read_text()
