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
    restore, save = (next(s for s in steps if s.get("uses", "").startswith(f"actions/cache/{verb}")
                          and "env.RUN" in s["with"]["path"]) for verb in ("restore", "save"))
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


def test_the_nightly_job_keys_its_run_directory_on_the_tool_and_the_datas_fingerprint(tmp_path):
    """The key carries the tool's release and the data's fingerprint as the tool computes it; the step that
    computes it runs (here on the demo config) and prints one short digest."""
    import shlex
    import subprocess
    import sys

    steps, _ = _steps()
    data = next(s for s in steps if s.get("id") == "data")
    restore = next(s for s in steps if s.get("uses", "").startswith("actions/cache/restore")
                   and "env.RUN" in s["with"]["path"])
    assert "env.TOOL_REF" in restore["with"]["key"] and "steps.data.outputs.digest" in restore["with"]["key"]
    caches = [i for i, s in enumerate(steps) if "idap-compress" in str(s.get("with", {}).get("path", ""))]
    assert caches and caches[0] < steps.index(data), "the hash cache is restored before the fingerprint"
    line = next(x for x in data["run"].splitlines() if "data_fingerprint" in x)
    code = shlex.split(line.split("$(", 1)[1].rsplit(")", 1)[0])
    assert code[0] == ".venv/bin/python"
    out = subprocess.run([sys.executable, *code[1:-1], str(REPO / "configs" / "demo.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert len(out.stdout.strip()) == 16
