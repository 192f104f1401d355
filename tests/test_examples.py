"""The deployment examples do what a nightly job needs: a pinned tool, the GPU runtime's files in place, the run
directory restored and saved (after a gate failure too), the report uploaded, and engines never left stale."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def _steps() -> list[dict]:
    doc = yaml.safe_load((REPO / "examples" / "nightly-compress.yml").read_text())
    return doc["jobs"]["compress"]["steps"], doc["jobs"]["compress"]["env"]


def test_the_nightly_job_pins_the_tool_and_installs_the_gpu_runtime_last():
    steps, env = _steps()
    tool = next(s for s in steps if s.get("with", {}).get("repository"))
    assert tool["with"]["ref"] == "${{ env.TOOL_REF }}" and env["TOOL_REF"]
    install = next(s for s in steps if s.get("name") == "Install")["run"]
    assert install.index("[gpu]") < install.index("--force-reinstall --no-deps \"onnxruntime-gpu==")
    assert "pip uninstall" not in install


def test_the_nightly_job_keeps_its_run_directory_after_a_gate_failure_and_uploads_the_report():
    steps, _ = _steps()
    restore = next(s for s in steps if s.get("uses", "").startswith("actions/cache/restore"))
    save = next(s for s in steps if s.get("uses", "").startswith("actions/cache/save"))
    assert save.get("if") == "always()", "saved after exit 3 as well"
    assert "env.TOOL_REF" in restore["with"]["key"] and "restore-keys" in restore["with"]
    assert save["with"]["key"] == restore["with"]["key"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload.get("if") == "always()"
    for name in ("report.html", "figures/", "summary.json", "model.engine"):
        assert name in upload["with"]["path"]


def test_make_engines_always_asks_compress_which_knows_every_input():
    text = (REPO / "examples" / "Makefile.deploy").read_text()
    assert "$(OUT)/$(MODEL).engine: FORCE" in text and "\nFORCE:" in text
    assert "make install-gpu" not in text
