"""Fuzzing the images API's request bodies against a real replica's work (ImageService on the tiny engine, in-process,
no Ray): whatever the body, the answer is never a 5xx, it is JSON in the API's shape, the replica stays healthy, and
the next good request is answered with the same image as before the fuzzing.

The bodies: JSON objects whose fields take valid, boundary and hostile values (lone surrogates, huge and non-finite
numbers, wrong types, unknown keys), and raw bodies (bytes, deep nesting, integers of thousands of digits, cut-short
JSON). Valid bodies are generated too (few steps, small sizes), so the pipeline itself is fuzzed, not only validation.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catome_export.serve.protocol import render
from catome_export.serve.service import ImageService, ServeOptions

pytest.importorskip("PIL", reason="pillow is not installed")

GOOD = b'{"prompt": "a red fox", "size": "128x128", "seed": 5, "steps": 2}'
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(alphabet=st.one_of(st.characters(), SURROGATES), max_size=24)
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(10**40), 10**40), st.floats(), TEXT,
                 st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, st.integers(), max_size=2))


PLAIN_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
VALID: dict[str, st.SearchStrategy] = {
    "prompt": PLAIN_TEXT.filter(str.strip),
    "negative_prompt": st.one_of(st.none(), st.just(""), PLAIN_TEXT),
    "n": st.integers(1, 2),
    "size": st.sampled_from(["128x128", "136x128", "128x136"]),
    "steps": st.integers(1, 3),
    "guidance_scale": st.floats(min_value=0, max_value=100),
    "seed": st.integers(0, 2**31),
    "threshold": st.one_of(st.none(), st.floats(-1, 1)),
    "response_format": st.just("b64_json"),
}
"""Values the service accepts (kept cheap: at most 2 images of 3 steps at 136 px)."""
HOSTILE: dict[str, st.SearchStrategy] = {
    "prompt": st.one_of(TEXT, st.sampled_from([" ", "\ud800", "fox \udfff", "\x00", "x" * 10_001]), JUNK),
    "negative_prompt": st.one_of(TEXT, st.sampled_from(["\udc00", "x" * 10_001]), JUNK),
    "n": st.one_of(st.integers(-1, 3), JUNK),
    "size": st.one_of(st.sampled_from(["128X192", " 128 x 128 ", "130x128", "8x8", "0x0", "999999x999999", "256x256",
                                       "128x128x128"]), TEXT, JUNK),
    "steps": st.one_of(st.integers(-2, 0), st.sampled_from([1000, 1001, 2**63, -(2**63)]), JUNK),
    "guidance_scale": st.one_of(st.floats(), st.sampled_from([100.000001, 1e30, 1e308, 5e-324, -0.0, 10**400]), JUNK),
    "seed": st.one_of(st.integers(-(2**70), 2**70), JUNK),
    "threshold": st.one_of(st.floats(), JUNK),
    "response_format": st.one_of(TEXT, JUNK),
}
"""Boundary and hostile values: lone surrogates, huge and non-finite numbers, wrong types."""


ONE_IN_TEN = st.sampled_from([False] * 9 + [True])


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """A valid request with up to three fields made hostile (or dropped) and maybe an unknown key."""
    optional = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True))
    data = {name: draw(VALID[name]) for name in ["prompt", *optional]}
    count = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))  # about half the bodies stay valid and are generated
    for name in draw(st.lists(st.sampled_from(sorted(HOSTILE)), unique=True, min_size=count, max_size=count)):
        if draw(ONE_IN_TEN):
            data.pop(name, None)
        else:
            data[name] = draw(HOSTILE[name])
    if draw(ONE_IN_TEN):
        data.update(draw(st.dictionaries(TEXT, JUNK, min_size=1, max_size=2)))
    # json.dumps writes lone surrogates as \ud800 escapes and NaN/inf as NaN/Infinity, as a client might send them
    return json.dumps(data).encode()


def _deep(depth: int, opener: bytes) -> bytes:
    return opener * depth


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 200_000).map(lambda d: _deep(d, b"[")),
    st.integers(1, 200_000).map(lambda d: _deep(d, b'{"a": ')),
    st.integers(4000, 20_000).map(lambda d: b'{"prompt": "a fox", "steps": ' + b"1" * d + b"}"),
    st.integers(300, 400).map(lambda d: b'{"prompt": "a fox", "guidance_scale": 1' + b"0" * d + b"}"),
    st.sampled_from([b"", b"null", b"NaN", b"[]", b'"a fox"', b"\xef\xbb\xbf{}", b'{"prompt": "a fox"',
                     b'{"prompt": "a", "prompt": 3}', b'{"prompt": "a fox", "guidance_scale": -Infinity}']),
    st.builds(lambda body, cut: body[:cut], json_bodies(), st.integers(0, 40)),
)


@pytest.fixture(scope="module")
def service(tiny_engine):
    svc = ImageService(ServeOptions(str(tiny_engine), backend="ort", max_batch=2, steps=2, threads=1, max_images=2))
    yield svc
    svc.close()


def _pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _good_image(service: ImageService) -> np.ndarray:
    status, body = service.answer(GOOD)
    assert status == 200, body
    return _pixels(body["data"][0]["b64_json"])


def test_no_body_breaks_the_replica(service):
    before = _good_image(service)
    seen: dict[int, int] = {}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.one_of(json_bodies(), json_bodies(), RAW_BODIES))  # two in three are JSON objects
    def one_body(raw: bytes) -> None:
        status, body = service.answer(raw)
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400, 422), body
        text = render(body).decode("ascii")  # what the deployment writes: ASCII JSON, whatever the body held
        assert json.loads(text) == body
        if status == 200:
            assert body["data"] and all(_pixels(d["b64_json"]).ndim == 3 for d in body["data"])
            assert set(body["catome"]) == {"engine_sha256", "images"}  # no replica_pid
        else:
            error = body["error"]
            assert error["type"] == "invalid_request_error" and error["message"]
            assert "\n" not in error["message"]
        service.check_health()

    one_body()
    assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen  # both refused and generated bodies were tried
    np.testing.assert_array_equal(_good_image(service), before)
