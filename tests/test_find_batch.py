"""The batch search of `python -m benchmarks.train_step --find_batch`, against brute force."""

import math

import pytest

from benchmarks.train_step import largest_fitting


@pytest.mark.parametrize("multiple", [1, 4, 8])
@pytest.mark.parametrize("start", [1, 5, 16, 64])
def test_largest_fitting_equals_brute_force(start, multiple):
    max_batch = 200
    for threshold in range(0, 260, 3):  # batches up to `threshold` fit
        asked = []

        def fits(batch, threshold=threshold, asked=asked):
            asked.append(batch)
            return batch <= threshold

        expected = max(
            (b for b in range(multiple, max_batch + 1, multiple) if b <= threshold), default=0
        )
        assert largest_fitting(fits, start, multiple, max_batch) == expected, threshold
        assert len(asked) == len(set(asked)), asked  # each batch compiled at most once
        assert all(b % multiple == 0 and 0 < b <= max_batch for b in asked)
        assert len(asked) <= 2 * math.ceil(math.log2(max_batch / multiple)) + 2


def test_largest_fitting_names_bad_arguments():
    with pytest.raises(ValueError, match="multiple >= 1"):
        largest_fitting(lambda b: True, 8, 0, 64)
    with pytest.raises(ValueError, match="max_batch >= multiple"):
        largest_fitting(lambda b: True, 8, 16, 8)


@pytest.mark.parametrize("positives", ["same_findings", "same_report"])
def test_the_benchmark_batch_is_what_the_train_step_reads(positives):
    """The benchmark's batch has what the recipe's pipeline gives (findings ids with
    positives by findings, LocCa's task per example) and the recipe's train step traces
    on it (a key the step reads and the benchmark lacks fails here, not on a GPU)."""
    import jax
    import numpy as np

    from benchmarks import train_step as bench
    from deepcoro_jax.domain import locations
    from deepcoro_jax.training import run as run_lib
    from deepcoro_jax.training import sharding

    config = bench.benchmark_config("mu", 8, 4, 64, "float32", "full", mvm=True)
    config.loss.positives = positives
    findings = run_lib.positive_ids_key(config) == "findings_id"
    tasks = bench.task_weights(config)
    assert sorted(tasks) == sorted(locations.TASKS.index(t) for t in ("cap", "aref", "gcap"))
    video_shape = (4, 64, 64, 1)  # 2 x 4 x 4 tubelets: MVM keeps 10% of 32
    host = bench.random_batch(np.random.default_rng(0), 8, video_shape,
                              config.input.text_max_len, config.input.caption_max_len, 100,
                              tasks, findings=findings)
    assert ("findings_id" in host) == (positives == "same_findings")
    assert "locca_task" in host
    abstract = bench.abstract_batch({k: v[:1] for k, v in host.items()}, 8)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in host.items()
    }

    model = run_lib.build_model(config, 100, bench.PAD_ID)
    example = {k: v[:1] for k, v in host.items()}
    params = jax.eval_shape(
        lambda r: model.init({"params": r, "dropout": r, "mask": r, "parallel": r}, example,
                             train=False, mvm=True)["params"], jax.random.key(0))
    tx, schedules = run_lib.make_optimizer(config, params, 10, 0)
    init_fn = run_lib.create_train_state(model, tx, example, with_teacher=False)
    state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
    step = run_lib.make_train_step(model, tx, config, mesh, schedules)
    _, metrics = jax.eval_shape(step, state, abstract)
    assert "loss" in metrics and "caption_task/aref" in metrics
