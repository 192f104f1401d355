"""The README stays true: every config key is documented, and the commands it gives exist."""

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


def test_every_config_key_is_in_the_reference():
    missing = [k for k in _keys(Config) if f"`{k}`" not in README]
    assert not missing, f"README config reference lacks {missing}"


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
