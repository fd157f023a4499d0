"""Long commands show progress with an ETA: eval per image, bench per row / round, analyze per step."""

from __future__ import annotations

import pytest

import io
import re

from catome_export.cli.main import main

LINE = re.compile(r"^(?P<label>[\w -]+(?: at \d+px)?): (?P<done>\d+)/(?P<total>\d+) \(\d+%\), [\d.]+ s elapsed, "
                  r"ETA (?:[\d.]+ (?:s|min)|\?)")


def _ticks(err: str, label: str) -> list[tuple[int, int]]:
    found = []
    for line in err.splitlines():
        m = LINE.match(line)
        if m and m["label"].startswith(label):
            found.append((int(m["done"]), int(m["total"])))
    return found


def _complete(ticks: list[tuple[int, int]]) -> bool:
    return bool(ticks) and [d for d, _ in ticks] == list(range(1, ticks[-1][1] + 1)) \
        and len({t for _, t in ticks}) == 1


def test_progress_lines_count_up_with_an_eta():
    from catome_export.progress import Progress

    stream = io.StringIO()
    with Progress(3, "work", stream=stream, use_tqdm=False) as bar:
        for i in range(3):
            bar.update(note=f"item {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and _complete(_ticks(stream.getvalue(), "work"))
    assert lines[-1].endswith("ETA 0 s; item 2")
    emitted: list[str] = []
    Progress(2, "x", emit=emitted.append).update()
    assert emitted and emitted[0].startswith("x: 1/2 (50%)")


def test_analyze_shows_progress_per_step(capsys):
    assert main(["analyze", "--model", "tiny", "--steps", "4", "--resolution", "64"]) == 0
    ticks = _ticks(capsys.readouterr().err, "analyze")
    assert _complete(ticks) and ticks[-1][1] == 5  # PLMS: 4 steps are 5 U-Net calls (it repeats one)


def test_eval_shows_progress_per_image(capsys, tmp_path):
    assert main(["eval", "--model", "tiny", "--imagenet", "2", "--steps", "2", "--resolution", "64", "--warmup", "1",
                 "--out", str(tmp_path / "eval")]) == 0
    ticks = _ticks(capsys.readouterr().err, "eval")
    assert _complete(ticks) and ticks[-1] == (6, 6)  # 2 methods x (1 warm-up + 2 images)


@pytest.mark.slow
def test_bench_shows_progress_per_row_and_round(capsys):
    argv = ["bench", "--model", "tiny", "--backends", "eager,eager-catome", "--merge-fractions", "0,0.5",
            "--resolution", "64", "--repeats", "2", "--warmup", "1", "--no-stage-timings"]
    assert main(argv) == 0
    ticks = _ticks(capsys.readouterr().err, "bench calls at 64px")
    # progress counts U-Net calls, so the ETA weighs a round as the calls it makes: 3 rows warmed up with one call
    # each (eager, eager-catome at 0 and 0.5), then 2 rounds of 5 calls (eager's cached call, and a checkpoint and
    # a cached call of each eager-catome row)
    assert ticks == [(1, 13), (2, 13), (3, 13), (8, 13), (13, 13)]
    assert main(["bench", "--model", "tiny", "--backends", "eager-catome", "--merge-fractions", "0,0.5",
                 "--resolution", "64", "--repeats", "1", "--warmup", "1", "--sequential"]) == 0
    ticks = _ticks(capsys.readouterr().err, "bench eager-catome at 64px")
    assert _complete(ticks) and ticks[-1][1] == 2  # one tick per row
