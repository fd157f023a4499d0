"""Request validation of the images API, without Ray: every bad request is a RequestError (HTTP 400) naming what to send."""

from __future__ import annotations

import json

import pytest

from catome_export.serve.protocol import EngineLimits, RequestError, error_body, parse_request, render


def limits(batch: tuple[int, int] = (1, 2), threshold_allowed: bool = True, max_steps: int = 1000) -> EngineLimits:
    """The tiny test engine's limits: 128..192 px, U-Net batch 1..2."""
    return EngineLimits.from_ranges({"batch": batch, "latent_height": (16, 24), "latent_width": (16, 24)},
                                    default_size=(192, 192), default_steps=20, max_steps=max_steps,
                                    default_guidance=7.5, max_images=4, threshold_allowed=threshold_allowed,
                                    scheduler="PNDMScheduler")


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a red fox", **fields}).encode()


def test_a_full_request_is_parsed_into_one_job_per_image():
    req = parse_request(body(n=3, size="128x160", seed=5, steps=7, guidance_scale=5.0, negative_prompt="blur",
                             threshold=0.8, response_format="b64_json", model="x", user="u"), limits())
    assert (req.width, req.height) == (128, 160)
    jobs = req.jobs()
    assert [j.seed for j in jobs] == [5, 6, 7]
    assert {(j.steps, j.guidance, j.threshold, j.negative_prompt, j.height, j.width) for j in jobs} == \
        {(7, 5.0, 0.8, "blur", 160, 128)}


def test_defaults_come_from_the_engine():
    req = parse_request(b'{"prompt": "a red fox"}', limits())
    assert (req.n, req.steps, req.guidance, req.height, req.width, req.threshold) == (1, 20, 7.5, 192, 192, None)
    assert 0 <= req.seed < 2**31


@pytest.mark.parametrize("raw, fragment, param", [
    (b'{"prompt": ', "not valid JSON", None),
    (b'\xff\xfe', "not valid JSON", None),
    (b'["a red fox"]', "must be a JSON object", None),
    (b'{"n": 1}', "prompt is missing", "prompt"),
    (body(prompt=""), "prompt must be a non-empty string", "prompt"),
    (body(prompt=12), "prompt must be a non-empty string", "prompt"),
    (body(prompt="x" * 10_001), "at most 10000", "prompt"),
    (body(n=0), "n must be an integer in 1..4", "n"),
    (body(n=5), "n must be an integer in 1..4", "n"),
    (body(n="2"), "n must be an integer in 1..4", "n"),
    (body(n=1.5), "n must be an integer in 1..4", "n"),
    (body(n=True), "n must be an integer in 1..4", "n"),
    (body(steps=0), "steps must be an integer in 1..1000", "steps"),
    (body(steps=1001), "steps must be an integer in 1..1000", "steps"),
    (body(seed=-1), "seed must be an integer", "seed"),
    (body(size="130x128"), "width 130 is not a multiple of 8", "size"),
    (body(size="128x100"), "height 100 is not a multiple of 8", "size"),
    (body(size="256x256"), "outside the engine's built range 128x128..192x192", "size"),
    (body(size="120x128"), "outside the engine's built range", "size"),
    (body(size="big"), "size must be a string \"WIDTHxHEIGHT\"", "size"),
    (body(size=128), "size must be a string", "size"),
    (body(guidance_scale="7"), "guidance_scale must be a number in 0..100", "guidance_scale"),
    (body(guidance_scale=-1), "guidance_scale must be a number in 0..100", "guidance_scale"),
    (b'{"prompt": "a", "guidance_scale": NaN}', "guidance_scale must be a number in 0..100", "guidance_scale"),
    (body(threshold=1.5), "threshold must be a number in [-1, 1]", "threshold"),
    (body(threshold="0.7"), "threshold must be a number in [-1, 1]", "threshold"),
    (body(negative_prompt=3), "negative_prompt must be a string or null", "negative_prompt"),
    (body(response_format="url"), "response_format \"url\" is not supported", "response_format"),
    (body(seeds=3), "unknown field(s) 'seeds'", "seeds"),
])
def test_bad_requests_name_the_field_and_what_to_send(raw, fragment, param):
    with pytest.raises(RequestError) as info:
        parse_request(raw, limits())
    assert fragment in str(info.value)
    assert info.value.param == param
    assert "\n" not in str(info.value)


def test_guidance_outside_the_built_batch_range_is_refused():
    with pytest.raises(RequestError, match="built for batch 1..1: send guidance_scale <= 1"):
        parse_request(body(guidance_scale=7.5), limits(batch=(1, 1)))
    assert parse_request(body(guidance_scale=1.0), limits(batch=(1, 1))).guidance == 1.0
    with pytest.raises(RequestError, match="built for batch 2..2: send guidance_scale > 1"):
        parse_request(body(guidance_scale=0), limits(batch=(2, 2)))


def test_threshold_only_where_the_engine_merges_by_threshold():
    with pytest.raises(RequestError, match="threshold cannot be set for this engine"):
        parse_request(body(threshold=0.5), limits(threshold_allowed=False))
    assert parse_request(body(threshold=-1), limits()).threshold == -1.0


def test_error_body_has_openai_shape():
    assert error_body("bad", "n") == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n",
                                                "code": None}}


# -- regressions: each of these got past validation (or out of parse_request as another exception) before ----------

@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text, at", [("\\ud800", 0), ("a fox \\udfff", 6), ("\\udd8a\\ud83e", 0)])
def test_a_lone_surrogate_is_refused_naming_the_field(field, text, at):
    raw = ('{"prompt": "a fox", "' + field + '": "' + text + '"}').encode()
    with pytest.raises(RequestError) as info:
        parse_request(raw, limits())
    assert info.value.param == field and info.value.status == 400
    assert str(info.value).startswith(f"{field} contains a lone surrogate \\u")
    assert f"at character {at}," in str(info.value)
    render(error_body(str(info.value), info.value.param)).decode("ascii")


def test_a_surrogate_pair_is_one_character_and_accepted():
    req = parse_request(b'{"prompt": "a fox \\ud83e\\udd8a", "negative_prompt": "\\ud83d\\ude00"}', limits())
    assert req.prompt == "a fox \U0001f98a" and req.negative_prompt == "\U0001f600"


def test_steps_are_limited_by_what_the_scheduler_runs():
    with pytest.raises(RequestError) as info:
        parse_request(body(steps=1000), limits(max_steps=999))
    assert str(info.value) == ("steps must be an integer in 1..999 (999 is the most the pipeline's PNDMScheduler "
                               "runs), got 1000")
    assert info.value.param == "steps"
    assert parse_request(body(steps=999), limits(max_steps=999)).steps == 999


@pytest.mark.parametrize("raw", [body(guidance_scale=1e30), body(guidance_scale=1e308), body(guidance_scale=100.5),
                                 body(guidance_scale=10**400), body(guidance_scale=-(10**400)),
                                 b'{"prompt": "a", "guidance_scale": Infinity}', b'{"prompt": "a", "guidance_scale": 1e999}'],
                         ids=["1e30", "1e308", "100.5", "10**400", "-10**400", "Infinity", "1e999"])
def test_guidance_is_bounded_so_that_it_cannot_overflow(raw):
    with pytest.raises(RequestError) as info:
        parse_request(raw, limits())
    assert info.value.param == "guidance_scale"
    assert str(info.value).startswith("guidance_scale must be a number in 0..100 (7.5 is usual")
    assert parse_request(body(guidance_scale=100), limits()).guidance == 100.0


@pytest.mark.parametrize("raw", [body(threshold=10**400), b'{"prompt": "a", "threshold": -1e999}'],
                         ids=["10**400", "-1e999"])
def test_a_threshold_too_large_for_a_float_is_a_request_error(raw):
    with pytest.raises(RequestError, match=r"threshold must be a number in \[-1, 1\]"):
        parse_request(raw, limits())


@pytest.mark.parametrize("raw, problem", [
    (b'{"prompt": "a fox", "seed": ' + b"7" * 5000 + b"}", "an integer has more digits than Python reads"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": ' * 100_000, "nested too deeply"),
    (b'{"prompt": "a fox"', "Expecting ',' delimiter at line 1 column 19"),
    (b"\xff\xfe\x00", "it is not UTF-8 text"),
], ids=["5000-digit integer", "100000-deep array", "100000-deep object", "cut short", "not UTF-8"])
def test_any_json_parse_failure_is_a_request_error(raw, problem):
    with pytest.raises(RequestError) as info:
        parse_request(raw, limits())
    message = str(info.value)
    assert message.startswith(f"the body is not valid JSON ({problem}") and info.value.status == 400
    assert "set_int_max_str_digits" not in message and "\n" not in message


def test_render_writes_ascii_json_whatever_a_request_sent():
    bad = {"error": {"message": "unknown field(s) '\\ud800'", "type": "invalid_request_error", "param": "\ud800",
                     "code": None}}
    raw = render(bad)
    raw.decode("ascii")
    assert json.loads(raw) == bad
