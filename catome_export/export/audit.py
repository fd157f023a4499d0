"""Static audit: will the TensorRT 10 ONNX parser accept every node of the stage graphs?

The rules are data (``trt_onnx_rules.json``, with their sources): the
operator support matrix (supported ops and the types of their first input),
the opset range, the op domains, and per-op attribute / input rules such as
"ScatterElements with a reduction runs as a plugin that takes int64 indices
only", "ScatterND with a reduction is rejected", "TopK's K must be a
constant < 3840". Tensor dtypes come from ``onnx.shape_inference``.

This runs on machines without TensorRT, at the end of every build, so a
graph that TensorRT would refuse is caught where it is made.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

RULES_FILE = "trt_onnx_rules.json"
SEVERITIES = ("error", "warning", "info")

# ONNX TensorProto data types -> the names the TensorRT matrix uses.
_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64",
               16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4", 4: "UINT16",
               5: "INT16", 8: "STRING", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 21: "UINT4"}


@dataclass(frozen=True)
class Finding:
    """One audit result for one node (or the whole model)."""

    severity: str
    """``error`` (TensorRT would refuse it), ``warning`` (may fail or be slow), ``info`` (e.g. needs a plugin)."""
    rule: str
    """Rule id (see ``trt_onnx_rules.json``) or a built-in check name."""
    op_type: str
    node: str
    """Node name (or output name when unnamed); empty for model-level findings."""
    message: str
    source: str = ""
    """Where the rule comes from (a key of the rules' ``sources``)."""
    file: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        node = f" {self.node}" if self.node else ""
        return f"{where}{self.severity}: {self.op_type}{node}: {self.message} [{self.rule}]"


@dataclass
class AuditReport:
    """Findings over one or more graph files."""

    files: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def plugins(self) -> list[str]:
        """TensorRT plugins the graphs need (from ``plugin`` rules)."""
        return sorted({f.rule.split(":", 1)[1] for f in self.findings if f.rule.startswith("plugin:")})

    def summary(self) -> str:
        state = "pass" if self.passed else "FAIL"
        plugins = f"; plugins: {', '.join(self.plugins)}" if self.plugins else ""
        return (f"TensorRT operator audit: {state} ({len(self.files)} graphs, {sum(self.op_counts.values())} nodes, "
                f"{len(self.errors)} errors, {len(self.warnings)} warnings{plugins})")

    def to_dict(self) -> dict:
        rules = load_rules()
        return {"passed": self.passed, "errors": len(self.errors), "warnings": len(self.warnings),
                "plugins": self.plugins, "rules": f"{RULES_FILE} (TensorRT {rules.get('tensorrt', '?')})",
                "findings": [asdict(f) for f in self.findings if f.severity != "info"][:50]}


@lru_cache(maxsize=1)
def load_rules() -> dict:
    """The bundled rules (``catome_export/export/trt_onnx_rules.json``)."""
    text = resources.files("catome_export.export").joinpath(RULES_FILE).read_text()
    rules = json.loads(text)
    if rules.get("format_version") != 1:
        raise CatomeError(f"{RULES_FILE}: unknown format_version {rules.get('format_version')!r}")
    return rules


# -- graph helpers ------------------------------------------------------------------------
def _load(model_or_path: Any):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_file():
            raise CatomeError(f"{path} does not exist: nothing to audit")
        try:
            return onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise CatomeError(f"cannot read {path} as ONNX ({type(exc).__name__}): rebuild it") from None
    return model_or_path


def _iter_graphs(graph) -> Iterator[Any]:
    """A graph and all its subgraphs (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _iter_graphs(attr.g)
            for g in attr.graphs:
                yield from _iter_graphs(g)


def _type_map(model) -> dict[str, int]:
    """Tensor name -> ONNX element type, from inputs, outputs, initializers, value_info (after inference)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception as exc:  # inference gaps leave types unknown; the rules then skip those checks
        logger.debug("shape inference failed (%s); auditing with declared types only", exc)
        inferred = model
    types: dict[str, int] = {}
    for graph in _iter_graphs(inferred.graph):
        for vi in (*graph.input, *graph.output, *graph.value_info):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        types[node.output[0]] = attr.t.data_type
    return types


def _constants(model) -> dict[str, Any]:
    """Names whose values are known at build time: initializers and Constant outputs (name -> TensorProto)."""
    consts: dict[str, Any] = {}
    for graph in _iter_graphs(model.graph):
        for init in graph.initializer:
            consts[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        consts[node.output[0]] = attr.t
                    elif attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                        consts[node.output[0]] = attr
    return consts


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _const_values(proto) -> list[float]:
    from onnx import numpy_helper

    try:
        return [float(v) for v in numpy_helper.to_array(proto).reshape(-1)]
    except Exception:
        return []


# -- the audit ----------------------------------------------------------------------------
def audit_model(model_or_path: Any, rules: dict | None = None, file: str = "") -> list[Finding]:
    """Audit one ONNX model (a ``ModelProto`` or a path) against the TensorRT parser rules."""
    rules = rules or load_rules()
    model = _load(model_or_path)
    if not file and isinstance(model_or_path, (str, Path)):
        file = Path(model_or_path).name
    findings: list[Finding] = []

    def add(severity: str, rule: str, op: str, node: str, message: str, source: str = "") -> None:
        findings.append(Finding(severity, rule, op, node, message, source, file))

    opset = rules["opset"]
    domains = set(rules["domains"])
    for imp in model.opset_import:
        if imp.domain in domains and not opset["min"] <= imp.version <= opset["max"]:
            add("error", "opset", "model", "", f"opset {imp.version} is outside TensorRT's range "
                f"{opset['min']}..{opset['max']}", opset.get("source", ""))
    types = _type_map(model)
    consts = _constants(model)
    ops = rules["operators"]
    by_op: dict[str, list[dict]] = {}
    for rule in rules["rules"]:
        by_op.setdefault(rule["op"], []).append(rule)
    limited = rules.get("limited_types", {})
    src = "onnx-tensorrt-operators"
    for graph in _iter_graphs(model.graph):
        for node in graph.node:
            label = node.name or (node.output[0] if node.output else "")
            op = node.op_type
            if node.domain not in domains:
                add("error", "domain", op, label, f"custom op domain {node.domain!r}: the TensorRT ONNX parser only "
                    "imports standard ONNX ops (or registered plugins)", src)
                continue
            entry = ops.get(op)
            if entry is None:
                add("error", "operator", op, label, "not in TensorRT's ONNX operator support matrix", src)
                continue
            if not entry["supported"]:
                add("error", "operator", op, label, "not supported by the TensorRT ONNX parser", src)
                continue
            first = node.input[0] if node.input else ""
            dtype = _ONNX_TYPES.get(types.get(first, 0)) if first else None
            if dtype is not None and entry.get("types") and dtype not in entry["types"]:
                if dtype in limited:
                    add("warning", "type", op, label, f"input type {dtype}: {limited[dtype]}", src)
                else:
                    add("error", "type", op, label, f"input type {dtype} is not among the supported "
                        f"{', '.join(entry['types'])}", src)
            for rule in by_op.get(op, ()):
                _apply(rule, node, label, types, consts, add)
    return findings


def _applies(rule: dict, node) -> bool:
    when = rule.get("when")
    if not when:
        return True
    value = _attr(node, when["attribute"], when.get("default"))
    if "not_in" in when:
        return value not in when["not_in"]
    if "in" in when:
        return value in when["in"]
    return True


def _apply(rule: dict, node, label: str, types: dict[str, int], consts: dict[str, Any], add) -> None:
    if not _applies(rule, node):
        return
    kind, sev, msg, src, rid, op = (rule["check"], rule["severity"], rule["message"], rule.get("source", ""),
                                    rule["id"], node.op_type)
    if kind in ("reject", "note"):
        add(sev, rid, op, label, msg, src)
    elif kind == "plugin":
        add(sev, f"plugin:{rule['plugin']}", op, label, msg, src)
    elif kind == "input_dtype":
        i = rule["input"]
        name = node.input[i] if i < len(node.input) else ""
        dtype = _ONNX_TYPES.get(types.get(name, 0)) if name else None
        if dtype is None:
            add("warning", rid, op, label, f"{msg} (input {i} type unknown)", src)
        elif dtype not in rule["allowed"]:
            add(sev, rid, op, label, f"{msg} (input {i} is {dtype})", src)
    elif kind == "attribute_in":
        value = _attr(node, rule["attribute"], rule.get("default"))
        if value not in rule["allowed"]:
            add(sev, rid, op, label, f"{msg} ({rule['attribute']}={value!r})", src)
    elif kind == "attribute_absent":
        present = [a.name for a in node.attribute if a.name in rule["attributes"]]
        if present:
            add(sev, rid, op, label, f"{msg} ({', '.join(present)})", src)
    elif kind == "attribute_all":
        value = _attr(node, rule["attribute"], [])
        if any(v != rule["value"] for v in value):
            add(sev, rid, op, label, f"{msg} ({rule['attribute']}={list(value)})", src)
    elif kind in ("input_constant", "input_constant_below"):
        i = rule["input"]
        name = node.input[i] if i < len(node.input) else ""
        if not name:
            return  # optional input left out: nothing to check
        if name not in consts:
            add(sev, rid, op, label, f"{msg} (input {i} {name!r} is computed at run time)", src)
        elif kind == "input_constant_below":
            values = _const_values(consts[name])
            if not values or any(v >= rule["limit"] for v in values):
                add(sev, rid, op, label, f"{msg} (K={values})", src)
    elif kind == "max_used_outputs":
        used = [o for o in node.output if o]
        if len(used) > rule["count"]:
            add(sev, rid, op, label, f"{msg} ({len(used)} outputs used)", src)
    else:
        raise CatomeError(f"{RULES_FILE}: rule {rid!r} has unknown check {kind!r}")


def stage_files(engine_dir: str | Path) -> list[Path]:
    """``stage_<k>.onnx`` files of a folder, in stage order."""
    folder = Path(engine_dir)
    files = sorted(folder.glob("stage_*.onnx"), key=lambda p: int(p.stem.split("_")[1]) if
                   p.stem.split("_")[1].isdigit() else 10 ** 9)
    if not files:
        raise CatomeError(f"no stage_<k>.onnx files in {folder}: build the engine first (catome-export build ...)")
    return files


def audit_stages(engine_dir_or_paths: str | Path | Sequence[str | Path], rules: dict | None = None) -> AuditReport:
    """Audit every stage graph of an engine folder (or a list of ONNX files)."""
    if isinstance(engine_dir_or_paths, (str, Path)) and Path(engine_dir_or_paths).is_dir():
        paths: Iterable[Path] = stage_files(engine_dir_or_paths)
    elif isinstance(engine_dir_or_paths, (str, Path)):
        paths = [Path(engine_dir_or_paths)]
    else:
        paths = [Path(p) for p in engine_dir_or_paths]
    report = AuditReport()
    for path in paths:
        model = _load(path)
        report.files.append(path.name)
        for graph in _iter_graphs(model.graph):
            for node in graph.node:
                report.op_counts[node.op_type] = report.op_counts.get(node.op_type, 0) + 1
        report.findings.extend(audit_model(model, rules, file=path.name))
    return report
