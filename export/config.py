"""Config of the export stage and of the gates validation checks: read by the converters and runtimes here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.config import Section

INT8_RUNTIMES = ("auto", "onnxruntime-cpu", "tensorrt")  # runtimes that run a QDQ model with INT8 kernels


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
