"""TensorRT operator audit: the real stages pass; planted unsupported nodes and attribute misuse fail."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper, numpy_helper

from catome_export.errors import CatomeError
from catome_export.export.audit import audit_model, audit_stages, load_rules


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _t(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


def _scatter_model(index_type: int, reduction: str = "add", op: str = "ScatterElements"):
    data, idx, upd = _t("data", TensorProto.FLOAT, [2, 8, 4]), _t("idx", index_type, [2, 3, 4]), \
        _t("upd", TensorProto.FLOAT, [2, 3, 4])
    node = helper.make_node(op, ["data", "idx", "upd"], ["out"], reduction=reduction,
                            **({"axis": 1} if op == "ScatterElements" else {}))
    return _model([node], [data, idx, upd], [_t("out", TensorProto.FLOAT, [2, 8, 4])], opset=18)


def test_real_stages_pass(exported):
    folder, _ = exported
    report = audit_stages(folder)
    assert report.passed, [str(f) for f in report.errors]
    assert len(report.files) == 6
    assert report.plugins == ["ScatterElements"]
    assert report.op_counts["ScatterElements"] == 5  # one scatter-add per merge site
    assert "pass" in report.summary()
    assert report.to_dict()["passed"] is True


def test_planted_unsupported_op_fails():
    x = _t("x", TensorProto.FLOAT, [4])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Unique", ["a"], ["y"])]
    findings = audit_model(_model(nodes, [x], [_t("y", TensorProto.FLOAT, None)]))
    errors = _errors(findings)
    assert [(f.op_type, f.rule) for f in errors] == [("Unique", "operator")]


def test_unknown_op_and_custom_domain_fail():
    x = _t("x", TensorProto.FLOAT, [4])
    nodes = [helper.make_node("FancyOp", ["x"], ["a"]),
             helper.make_node("MyPlugin", ["a"], ["y"], domain="com.example")]
    model = _model(nodes, [x], [_t("y", TensorProto.FLOAT, [4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    rules = {f.rule for f in _errors(audit_model(model))}
    assert rules == {"operator", "domain"}


def test_scatter_elements_with_reduction_needs_int64_indices():
    bad = _errors(audit_model(_scatter_model(TensorProto.INT32)))
    assert [f.rule for f in bad] == ["scatter-elements-plugin-indices"]
    assert "int64" in bad[0].message
    good = audit_model(_scatter_model(TensorProto.INT64))
    assert not _errors(good)
    assert [f.rule for f in good] == ["plugin:ScatterElements"]
    # Without a reduction TensorRT runs it natively: int32 indices are fine, no plugin.
    plain = audit_model(_scatter_model(TensorProto.INT32, reduction="none"))
    assert not plain


def test_scatter_nd_with_reduction_is_rejected():
    data, upd = _t("data", TensorProto.FLOAT, [8, 4]), _t("upd", TensorProto.FLOAT, [3, 4])
    idx = _t("idx", TensorProto.INT64, [3, 1])
    model = _model([helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"], reduction="add")],
                   [data, idx, upd], [_t("out", TensorProto.FLOAT, [8, 4])], opset=18)
    assert [f.rule for f in _errors(audit_model(model))] == ["scatter-nd-reduction"]


@pytest.mark.parametrize("k,ok", [(100, True), (4000, False), (None, False)])
def test_topk_k_must_be_a_constant_below_3840(k, ok):
    import numpy as np

    x = _t("x", TensorProto.FLOAT, [1, 5000])
    inits, inputs = [], [x]
    if k is None:
        inputs.append(_t("k", TensorProto.INT64, [1]))
    else:
        inits.append(numpy_helper.from_array(np.array([k], dtype=np.int64), "k"))
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)
    model = _model([node], inputs, [_t("v", TensorProto.FLOAT, None), _t("i", TensorProto.INT64, None)], inits)
    errors = _errors(audit_model(model))
    assert (not errors) == ok
    if not ok:
        assert errors[0].rule == "topk-k-constant"


def test_resize_mode_and_opset_and_types():
    x = _t("x", TensorProto.FLOAT, [1, 1, 4, 4])
    import numpy as np

    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    cubic = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")
    errors = _errors(audit_model(_model([cubic], [x], [_t("y", TensorProto.FLOAT, None)], [scales])))
    assert [f.rule for f in errors] == ["resize-mode"]
    old = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_t("y", TensorProto.FLOAT, None)], opset=7)
    assert "opset" in {f.rule for f in _errors(audit_model(old))}
    s = _t("s", TensorProto.STRING, [2])
    strings = _model([helper.make_node("Identity", ["s"], ["y"])], [s], [_t("y", TensorProto.STRING, None)])
    assert [f.rule for f in _errors(audit_model(strings))] == ["type"]


def test_rules_file_is_consistent():
    rules = load_rules()
    kinds = {"plugin", "input_dtype", "reject", "note", "input_constant", "input_constant_below", "attribute_in",
             "attribute_absent", "attribute_all", "max_used_outputs"}
    for rule in rules["rules"]:
        assert rule["op"] in rules["operators"], rule["id"]
        assert rule["check"] in kinds, rule["id"]
        assert rule["severity"] in ("error", "warning", "info")
        assert rule["source"] in rules["sources"], rule["id"]
    assert rules["operators"]["ScatterElements"]["supported"] and not rules["operators"]["Unique"]["supported"]
    ids = [r["id"] for r in rules["rules"]]
    assert len(ids) == len(set(ids))


def test_missing_file_is_a_catome_error(tmp_path):
    with pytest.raises(CatomeError, match="does not exist"):
        audit_model(tmp_path / "nothing.onnx")
    with pytest.raises(CatomeError, match="no stage_"):
        audit_stages(tmp_path)
