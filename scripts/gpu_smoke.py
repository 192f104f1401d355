"""A few minutes on a CUDA machine that has torch with CUDA but maybe neither TensorRT nor onnxruntime-gpu, and
no package index: what of the GPU path runs there, and what could not.

    make gpu-smoke                   # this environment as it is
    make gpu-smoke WHEELS=wheels/    # first install what is missing from wheels downloaded beforehand
                                     # (on a connected machine: make wheels)

It prints the machine, the deployment target a CUDA config resolves to, runs a latency-targeted pipeline on CUDA
(timed with ONNX Runtime's CUDA provider where installed, else PyTorch with CUDA events) and the gpu-marked tests,
and ends with what ran and what was skipped. Exit 0 when nothing that ran failed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution to install; torch, timm, onnx, onnxruntime are expected on the machine already
NEEDED = {"torch_pruning": "torch-pruning", "typer": "typer", "pydantic": "pydantic", "yaml": "pyyaml",
          "rich": "rich", "matplotlib": "matplotlib", "onnxscript": "onnxscript", "pytest": "pytest",
          "sklearn": "scikit-learn", "mlxtend": "mlxtend", "PIL": "pillow", "timm": "timm", "onnx": "onnx",
          "onnxruntime": "onnxruntime"}


def _missing() -> list[str]:
    return [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]


def _install(wheels: Path) -> None:
    missing = _missing()
    if missing:
        print(f"installing from {wheels}: {', '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                        *missing], check=True)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, help="a folder of wheels to install what is missing from (no index)")
    ap.add_argument("--out", type=Path, help="keep the run directory and the log here")
    args = ap.parse_args()
    if args.wheels:
        _install(args.wheels)
    missing = _missing()
    if missing:
        print(f"missing: {', '.join(missing)}; pass --wheels DIR (pip download them on a connected machine: "
              f"make wheels)")
        return 2
    import torch

    sys.path.insert(0, str(REPO))
    from export.runtime import cuda_provider_problem
    from export.target import resolve
    from export.tensorrt import unavailable_reason
    from pipeline.config import Config
    from tests.conftest import tiny_config, write_config

    ran: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    ort, trt = cuda_provider_problem(), unavailable_reason()
    print(f"ONNX Runtime CUDA provider: {'yes' if ort is None else 'no (' + ort + ')'}")
    print(f"TensorRT: {'yes' if trt is None else 'no (' + trt + ')'}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing of the GPU path can run here")
        return 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)

    cfg = tiny_config(model={"source": "timm", "name": "resnet18", "num_classes": 4, "in_chans": 3,
                             "input_size": [64, 64]},
                      runtime={"progress": False, "device": "auto"},
                      filter_prune={"target_speedup": 1.5, "target_flops_reduction": None, "steps": 4},
                      validate={"warmup": 10, "runs": 50, "gates": {"max_parity_error": 1e-3}})
    target = resolve(Config.model_validate(cfg))
    print(f"deployment target of runtime.device auto: {json.dumps(target.record())}")
    path = write_config(work / "smoke.yaml", cfg)
    code, out, secs = _run([sys.executable, "-m", "pipeline.cli", "pipeline", str(path), "--run-dir",
                            str(work / "run")], env, 900)
    (work / "pipeline.log").write_text(out)
    name = f"pipeline on CUDA with target_speedup 1.5 (exit {code}, {secs:.0f} s)"
    summary_path = work / "run" / "summary.json"
    if code in (0, 3) and summary_path.is_file():
        s = json.loads(summary_path.read_text())
        fp = json.loads((work / "run" / "manifest.json").read_text())["stages"]["filter_prune"]["metrics"]
        lm = s["latency_ms"]
        print(f"{name}: loop timed with {fp.get('latency_runtime')}, validate on {lm['backend']} "
              f"({lm['device']}): {lm['speedup']:.2f}x ({lm['speedup_low']:.2f}-{lm['speedup_high']:.2f}), "
              f"base {lm['base']:.3f} ms, compressed {lm['compressed']:.3f} ms; parity "
              f"{s['parity']['max_abs_diff']:.2e}; top-1 {s['compressed']['top1']:.2f}")
        same = fp.get("latency_runtime") == s["target"]["timing"] and s["target"]["device"] == "cuda"
        (ran if same else failed).append(name + ("" if same else ": the loop and validate timed different "
                                                 "devices"))
    else:
        print(out[-4000:])
        failed.append(name)

    code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                            "tests/gpu", "tests/export"], env, 1200)
    (work / "pytest.log").write_text(out)
    tail = [line for line in out.splitlines() if line.startswith(("SKIPPED", "FAILED", "ERROR"))
            or " passed" in line or " failed" in line]
    print("\n".join(tail[-40:]))
    skipped += [line for line in tail if line.startswith("SKIPPED")]
    (ran if code in (0, 5) else failed).append(f"pytest -m gpu (exit {code}, {secs:.0f} s)")

    print("\nran:\n  " + "\n  ".join(ran or ["nothing"]))
    print("skipped:\n  " + "\n  ".join(skipped or ["nothing"]))
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
    print(f"logs and the run directory: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
