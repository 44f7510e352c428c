import json
import math
import time

import pytest

from aha.backends.torch.tracking import MetricsLogger, StepTimer, peak_memory_gib, plot_run, read_metrics


def test_metrics_jsonl_every_logging_steps_with_window_means(tmp_path):
    logger = MetricsLogger(tmp_path, logging_steps=2, total_steps=5, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": float(step), "loss": 0.5, "kl": math.nan if step < 3 else 0.1})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]  # every 2 steps and the last one
    assert lines[0]["reward/mean"] == 1.5 and lines[1]["reward/mean"] == 3.5 and lines[2]["reward/mean"] == 5.0
    assert lines[0]["kl"] is None and lines[1]["kl"] == pytest.approx(0.1)  # NaN -> null; mean of finite
    assert all(abs(line["time"] - time.time()) < 60 for line in lines)


def test_read_metrics_keeps_latest_per_step_and_skips_torn_tail(tmp_path):
    records = [{"step": 1, "time": 0, "loss": 1.0}, {"step": 2, "time": 0, "loss": None},
               {"step": 2, "time": 1, "loss": 2.0}, {"step": 3, "time": 1, "loss": 3.0}]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    read = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in read] == [(1, 1.0), (2, 2.0), (3, 3.0)]

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "missing") == []


def test_samples_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=1, tensorboard=False)
    logger.log_samples(3, ["p1", "p2"], ["c1 é", "c2"], [1.0, math.nan])
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"step": 3, "prompt": "p1", "completion": "c1 é", "reward": 1.0},
                     {"step": 3, "prompt": "p2", "completion": "c2", "reward": None}]
    with pytest.raises(ValueError, match="2 prompts, 1 completions"):
        logger.log_samples(3, ["p1", "p2"], ["c1"], [1.0])


def test_plot_run_with_full_partial_and_no_metrics(tmp_path):
    full = tmp_path / "full"
    logger = MetricsLogger(full, total_steps=4, tensorboard=False)
    for step in range(1, 5):
        logger.log(step, {"reward/mean": step / 4, "reward/exact_answer": step / 8, "reward/std": 0.1,
                          "kl": 0.01 * step, "completion_length/mean": 20.0 + step, "loss": 1 / step,
                          "eval/accuracy": 0.25 * step})
    logger.close()
    partial = tmp_path / "partial"
    MetricsLogger(partial, total_steps=2, tensorboard=False).log(1, {"loss": 1.0})
    for run in (full, partial, tmp_path / "empty"):
        path = plot_run(run)
        assert path == run / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_on_request(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tensorboard"):
            MetricsLogger(tmp_path, total_steps=1, tensorboard=True)
        MetricsLogger(tmp_path, total_steps=1).log(1, {"loss": 1.0})  # None: quietly without
        return
    logger = MetricsLogger(tmp_path, total_steps=1, tensorboard=True)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_step_timer_and_peak_memory():
    timer = StepTimer()
    with timer("rollout"):
        time.sleep(0.02)
    with timer("update"):
        pass
    with timer("update"):
        pass
    metrics = timer.metrics()
    assert set(metrics) == {"time/rollout", "time/update", "time/step"}
    assert metrics["time/rollout"] >= 0.02 and timer.seconds("score") == 0.0
    assert metrics["time/step"] == pytest.approx(metrics["time/rollout"] + metrics["time/update"])
    assert 0.01 < peak_memory_gib() < 1024
