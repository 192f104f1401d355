"""Config sections of export, validation and the run's environment (the stage-free part of the config)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TensorRTConfig(Section):
    """A TensorRT engine built from the exported ONNX (needs the `gpu` extra and a CUDA device)."""

    mode: Literal["off", "auto", "required"] = Field(
        "auto", description="auto: build when TensorRT and a GPU are present, else skip and say why; "
        "required: missing TensorRT/GPU is an error (exit 2)")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="engine precision (fp32 is strict: no TF32); int8 builds model.engine from the INT8 QDQ "
        "model (explicit quantization; needs export.quantize: int8), layers left unquantized in FP32")
    workspace_gb: float = Field(4.0, gt=0.0, description="builder workspace memory limit")
    min_batch: int = Field(1, ge=1, description="optimization profile of the dynamic batch axis")
    opt_batch: int = Field(1, ge=1, description="the batch the engine is tuned for")
    max_batch: int = Field(32, ge=1, description="largest batch the engine takes (larger ones run in chunks)")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _ordered(self) -> TensorRTConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, "
                             f"{self.max_batch}")
        return self


class ExportConfig(Section):
    """ONNX export of the compressed model, and optionally a TensorRT engine."""

    opset: int = Field(17, ge=11, le=23, description="ONNX opset")
    exporter: Literal["auto", "torchscript", "dynamo"] = Field(
        "auto", description="auto: torchscript, falling back to the torch.export-based exporter when it fails")
    input_name: str = Field("input", description="graph input name")
    output_name: str = Field("logits", description="graph output name")
    dynamic_batch: bool = Field(True, description="dynamic batch axis")
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    quantize: Literal["int8"] | None = Field(
        None, description="int8: also write model.int8.onnx, the compressed model quantized after training (QDQ: "
        "INT8 weights per channel, INT8 activations calibrated on the calibration split, symmetric so that ONNX "
        "Runtime and TensorRT run the same file); validate scores and times it beside the FP32 model")
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are calibrated for quantize: int8")
    calibration_samples: int = Field(256, ge=1, description="calibration-split images the INT8 ranges are "
                                     "calibrated on")
    calibration_percentile: float = Field(99.999, gt=90.0, lt=100.0, description="calibration: percentile keeps "
                                          "this percentile of each activation's magnitudes")
    quantize_exclude: list[str] = Field(default_factory=list, description="layers kept in FP32 in the INT8 model: "
                                        "module names as model.named_modules() gives them (validate names the "
                                        "layers that cost most accuracy when the INT8 gate fails), or ONNX node "
                                        "names")

    @field_validator("quantize", mode="before")
    @classmethod
    def _no_quantize(cls, v: Any) -> Any:
        return None if v in (False, "none", "None", "off") else v

    @model_validator(mode="after")
    def _int8_engine(self) -> ExportConfig:
        if self.tensorrt.precision == "int8" and self.quantize != "int8":
            raise ValueError("export.tensorrt.precision int8 builds the engine from the INT8 QDQ model that "
                             "export.quantize: int8 writes; set export.quantize: int8 too (or precision fp32/fp16)")
        return self


class GatesConfig(Section):
    """Thresholds that fail the run with exit code 3; unset gates are not checked."""

    max_top1_drop: float | None = Field(None, ge=0.0, description="points of top-1 lost vs base")
    min_speedup: float | None = Field(None, gt=0.0, description="measured speedup vs base of the artifact that "
                                      "ships (the INT8 model with export.quantize: int8): the low end of its "
                                      "spread across timing blocks must reach this")
    min_flops_reduction: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of the base's MACs "
                                              "removed, e.g. 0.7")
    max_latency_ms: float | None = Field(None, gt=0.0, description="median latency of the artifact that ships "
                                         "(the INT8 model with export.quantize: int8), milliseconds")
    max_top1_drop_int8: float | None = Field(None, ge=0.0, description="export.quantize: int8: points of top-1 the "
                                             "INT8 model may lose vs the FP32 compressed model")
    max_parity_error: float | None = Field(1e-4, gt=0.0, description="max |artifact - PyTorch| of FP32 artifacts")
    max_parity_error_fp16: float | None = Field(5e-2, gt=0.0, description="FP16 TensorRT engines, relative: "
                                                "max |engine - PyTorch| / max |PyTorch logit|")


class ValidateConfig(Section):
    """Accuracy, parity and latency of the deployed artifact on the runtime that ships it."""

    runtime: Literal["auto", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-cuda"] = Field(
        "auto", description="auto: on the CPU ONNX Runtime; on CUDA the TensorRT engine when one is built, else "
        "ONNX Runtime's CUDA provider, else torch-cuda (PyTorch timed on the GPU with CUDA events, the ONNX file "
        "scored on ONNX Runtime's CPU provider). summary.json `target` says what it resolved to")

    warmup: int = Field(20, ge=0, description="untimed runs per model before timing")
    runs: int = Field(100, ge=1, description="timed runs per model, at least")
    block_seconds: float = Field(0.2, ge=0.0, description="each model's timing block lasts at least this long "
                                 "(sub-millisecond models get more runs)")
    blocks: int = Field(10, ge=1, description="the runs are timed in this many interleaved blocks; the speedup's "
                        "spread is taken across blocks")
    batch: int = Field(1, ge=1, description="latency batch")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: every core of "
                                "the process's CPU affinity)")
    parity_samples: int = Field(16, ge=1, description="validation images compared between PyTorch and the "
                                "artifact")
    gates: GatesConfig = Field(default_factory=GatesConfig)


class RuntimeConfig(Section):
    """Where and how the run executes; not part of any stage's config hash."""

    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="where stages run; auto takes CUDA when "
                                                   "visible")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    tf32: bool = Field(False, description="TF32 math for FP32 work on GPUs (Ampere and newer) in ONNX Runtime, "
                       "TensorRT FP32 engines and torch-cuda timing: faster, but logits move by about 1e-3, past "
                       "the default FP32 parity gate")
    progress: bool = Field(True, description="progress display: bars on a terminal, plain lines otherwise")
    progress_interval: float = Field(30.0, gt=0.0, description="off a terminal: seconds between progress lines")


class LoggingConfig(Section):
    """What a run records besides its checkpoints; not part of any stage's config hash."""

    tensorboard: bool = Field(False, description="also write TensorBoard scalars to <run_dir>/tensorboard")
    report: bool = Field(True, description="write report.md/.html and figures/ at the end of `compress pipeline`")
