"""One Runtime shared by several threads: every generation is whole (equal to running it alone) or refused.

Stress tests over the tiny stages on the torch backend, directly (reset, then set_step / U-Net calls) and
through pipelines attached to one runtime; each compares every completed generation with the same
generation run alone, one after the other.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.runtime.embed import attach

LATENT = (8, 8)
STEPS = 6
ATOL = 1e-5
"""Repeated CPU runs agree to float rounding, not always bit for bit (kernel selection)."""


def _catome() -> MergeSettings:
    return MergeSettings(threshold=0.7, schedule=parse_schedule("config3"))


def _inputs(job: int, smooth_latents, text_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    return smooth_latents(2, LATENT, seed=100 + job), text_embeddings(2, seed=200 + job)


def _generation(runtime, latents: torch.Tensor, ehs: torch.Tensor, *, reset: bool = True) -> tuple:
    """Six steps of a manual loop; the outputs and each step's (loop index, merged r per site)."""
    if reset:
        runtime.reset()
    outs = []
    for i in range(STEPS):
        runtime.set_step(i)
        outs.append(runtime.unet(latents, 900 - 100 * i, ehs).sample.clone())
    return torch.stack(outs), [(s.step, dict(s.merged)) for s in runtime.history]


def _same(result: tuple, reference: tuple) -> None:
    torch.testing.assert_close(result[0], reference[0], rtol=0, atol=ATOL)
    assert result[1] == reference[1]


def _run_threads(work, count: int) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"worker-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    return errors


def _in_thread(fn) -> None:
    worker = threading.Thread(target=fn)
    worker.start()
    worker.join()


def test_manual_generations_from_many_threads_are_whole_or_refused(make_runtime, smooth_latents, text_embeddings):
    """The reported case: each thread resets, then runs six set_step / U-Net calls (and ends: that releases)."""
    runtime = make_runtime(_catome())
    jobs = [_inputs(j, smooth_latents, text_embeddings) for j in range(4)]
    alone: list[tuple] = []
    _in_thread(lambda: alone.extend(_generation(runtime, *job) for job in jobs))  # its end releases the runtime
    assert all(r > 0 for _, merged in alone[0][1] for r in merged.values())  # really merging
    assert (alone[0][0] - alone[1][0]).abs().max() > 0.1  # the jobs really differ

    completed, refused = 0, 0
    for _ in range(4):  # rounds of four threads started together
        results: dict[int, tuple] = {}
        errors = _run_threads(lambda i: results.__setitem__(i, _generation(runtime, *jobs[i])), len(jobs))
        assert all(isinstance(e, CatomeError) and "middle of a generation" in str(e) for e in errors), errors
        for i, result in results.items():
            _same(result, alone[i])
        completed += len(results)
        refused += len(errors)
    assert completed >= 4 and completed + refused == 16


def test_explicit_generations_from_many_threads_wait_their_turn(make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(_catome())
    jobs = [_inputs(j, smooth_latents, text_embeddings) for j in range(3)]
    alone = []
    for job in jobs:
        with runtime.generation():
            alone.append(_generation(runtime, *job, reset=False))
    results: dict[tuple[int, int], tuple] = {}

    def work(i: int) -> None:
        for g in range(3):
            with runtime.generation():
                results[i, g] = _generation(runtime, *jobs[(i + g) % len(jobs)], reset=g % 2 == 1)

    errors = _run_threads(work, 3)
    assert not errors, errors
    assert len(results) == 9
    for (i, g), result in results.items():
        _same(result, alone[(i + g) % len(jobs)])


def test_a_manual_thread_releases_and_the_next_one_starts_afresh(make_runtime, smooth_latents, text_embeddings):
    runtime = make_runtime(_catome())
    latents, ehs = _inputs(0, smooth_latents, text_embeddings)
    reference = _generation(runtime, latents, ehs)
    runtime.unet(latents, 900, ehs)  # this thread holds the runtime, mid-generation
    other: list = []
    worker = threading.Thread(target=lambda: other.append(pytest.raises(CatomeError, runtime.reset)))
    worker.start()
    worker.join()
    assert "middle of a generation" in str(other[0].value)
    assert runtime.release() and not runtime.release()
    done: list = []

    def after_release() -> None:
        done.append(_generation(runtime, latents, ehs, reset=False))  # no reset: the handover starts afresh
        runtime.release()

    worker = threading.Thread(target=after_release)
    worker.start()
    worker.join()
    _same(done[0], reference)


def test_waiting_is_bounded_when_asked(make_runtime):
    runtime = make_runtime(_catome())
    runtime.wait_timeout_s = 0.2
    with pytest.raises(CatomeError, match="wait_timeout_s"):
        runtime.wait_timeout_s = -1
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with runtime.generation():
            inside.set()
            leave.wait(timeout=60)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert inside.wait(timeout=60)
        with pytest.raises(CatomeError, match="waited 0.2 s"):
            runtime.reset()
    finally:
        leave.set()
        worker.join()
    runtime.reset()  # free again


def _run_pipe(pipe, prompt: str, seed: int) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=3, height=64, width=64, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def test_pipelines_sharing_one_runtime_take_turns(tiny_unet, make_runtime, smooth_latents, text_embeddings):
    from catome_export.models.pipeline import tiny_pipeline

    runtime = make_runtime(_catome())
    jobs = [("a red car", 1), ("a lighthouse at dusk", 2), ("a bowl of fruit", 3)]
    pipes = [tiny_pipeline(unet=tiny_unet) for _ in jobs]
    attachments = [attach(p, runtime) for p in pipes]
    latents, ehs = _inputs(0, smooth_latents, text_embeddings)
    try:
        alone = [(_run_pipe(p, *job), [(s.step, dict(s.merged)) for s in runtime.history])
                 for p, job in zip(pipes, jobs)]
        manual_alone = _generation(runtime, latents, ehs)
        runtime.release()
        assert np.abs(alone[0][0] - alone[1][0]).max() > 100 * ATOL

        results: dict[tuple[int, int], tuple] = {}
        manual: list[tuple] = []

        def work(i: int) -> None:
            if i == len(pipes):  # one more thread drives the runtime by hand, inside generation()
                for _ in range(2):
                    with runtime.generation():
                        manual.append(_generation(runtime, latents, ehs, reset=False))
                return
            for g in range(2):
                image = _run_pipe(pipes[i], *jobs[i])
                # the history is read after the call: another pipeline's generation may have started; the
                # image is what must be exact
                results[i, g] = (image,)

        errors = _run_threads(work, len(pipes) + 1)
        assert not errors, errors
        assert len(results) == 2 * len(pipes) and len(manual) == 2
        for (i, _), (image,) in results.items():
            np.testing.assert_allclose(image, alone[i][0], rtol=0, atol=ATOL)
        for result in manual:
            _same(result, manual_alone)
    finally:
        for a in attachments:
            a.detach()
