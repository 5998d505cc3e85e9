"""Optimizer components, schedules, loss-weight schedules, and sharding rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deepcoro_jax.training import optim, sharding

PARAMS = {
    "video_encoder": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}},
    "text": {"LayerNorm_0": {"scale": jnp.ones(2)}, "Dense_0": {"kernel": jnp.ones((2, 2))}},
    "log_temperature": jnp.asarray(2.3),
}
COMPONENTS = {
    "video_encoder": dict(pattern="video_encoder/.*", lr_mult=2.0),
    "text": dict(pattern="text/.*", frozen=True),
    "temperature": dict(pattern="log_temperature", wd_mult=0.0),
}


def test_components_decay_and_freezing_against_hand_computed_sgd_step():
    tx, schedules = optim.make_optimizer(
        PARAMS,
        total_steps=10,
        lr=0.1,
        wd=0.5,
        components=COMPONENTS,
        schedule=dict(decay_type="constant"),
        optimizer="sgd",
        momentum=0.0,
        grad_clip_norm=None,
    )
    assert sorted(schedules) == ["temperature", "video_encoder"]
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    enc = updates["video_encoder"]["Dense_0"]
    # lr 0.2 (mult 2); decoupled decay 0.5 on the kernel only (biases never decay).
    np.testing.assert_allclose(enc["kernel"], -0.2 * (1 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(enc["bias"], -0.2, rtol=1e-6)
    np.testing.assert_allclose(updates["log_temperature"], -0.1, rtol=1e-6)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["text"]))


def test_clipping_and_unmatched_parameter_is_named():
    tx, _ = optim.make_optimizer(
        PARAMS,
        total_steps=10,
        lr=1.0,
        wd=0.0,
        components=COMPONENTS,
        schedule=dict(decay_type="constant"),
        optimizer="sgd",
        momentum=0.0,
        grad_clip_norm=1.0,
    )
    grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    # The clip sees every gradient (the frozen ones too): global norm of 10s over 23 entries;
    # the encoder's lr_mult is 2.
    clipped = 10 / (10 * math.sqrt(23))
    np.testing.assert_allclose(updates["video_encoder"]["Dense_0"]["bias"], -2 * clipped, rtol=1e-5)
    with pytest.raises(ValueError, match="'text/Dense_0/kernel' matches no optimizer component"):
        optim.make_optimizer(
            PARAMS,
            total_steps=10,
            lr=1.0,
            wd=0.0,
            components={k: v for k, v in COMPONENTS.items() if k != "text"},
        )


@pytest.mark.parametrize("decay_type", ["cosine", "linear", "rsqrt", "constant"])
def test_lr_schedules_against_formulas(decay_type):
    base, total, warmup = 0.5, 100, 10
    fn = optim.lr_schedule(base, total, decay_type=decay_type, warmup_steps=warmup, end_lr_frac=0.1)
    for step in (0, 4, 9, 10, 55, 99, 150):
        w = min(1.0, (step + 1) / warmup)
        progress = min(max(step - warmup, 0) / (total - warmup), 1.0)
        expected = {
            "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)),
            "linear": 0.1 + 0.9 * (1 - progress),
            "rsqrt": math.sqrt(10_000 / (10_000 + max(step - warmup, 0))),
            "constant": 1.0,
        }[decay_type]
        np.testing.assert_allclose(float(fn(step)), base * w * expected, rtol=1e-5)


@pytest.mark.parametrize("decay_type", ["cosine", "linear", "rsqrt", "constant"])
def test_only_decays_to_an_end_depend_on_the_length(decay_type):
    """rsqrt and constant compile to the same program for any total_steps, so a relaunch
    that extends the run loads its step from the compilation cache."""

    def program(total):
        fn = optim.lr_schedule(0.5, total, decay_type=decay_type, warmup_steps=10)
        return jax.jit(fn).lower(jnp.int32(0)).as_text()

    assert (program(100) == program(250)) == (decay_type in ("rsqrt", "constant"))


def test_loss_weight_schedules():
    assert float(optim.loss_weight(0.3, 100)) == pytest.approx(0.3)
    ramp = {"type": "linear_warmup", "value": 2.0, "start": 10, "steps": 20}
    assert [float(optim.loss_weight(ramp, s)) for s in (0, 10, 20, 30, 99)] == [0, 0, 1, 2, 2]
    steps = {"type": "step", "values": [0.0, 1.0, 0.5], "boundaries": [5, 8]}
    assert [float(optim.loss_weight(steps, s)) for s in (0, 4, 5, 7, 8, 100)] == [
        0,
        0,
        1,
        1,
        0.5,
        0.5,
    ]
    jitted = jax.jit(lambda s: optim.loss_weight(steps, s))
    assert float(jitted(6)) == 1.0
    with pytest.raises(ValueError, match="type"):
        optim.loss_weight({"type": "cubic"}, 0)


def test_mesh_and_fsdp_rules():
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    shapes = {
        "video_encoder": {
            "kernel": jax.ShapeDtypeStruct((64, 512), jnp.float32),
            "odd": jax.ShapeDtypeStruct((333, 333), jnp.float32),
            "bias": jax.ShapeDtypeStruct((512,), jnp.float32),
        },
        "text": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32)},
    }
    rules = [("video_encoder/.*", "fsdp"), (".*", "replicate")]
    specs = sharding.param_specs(shapes, rules, mesh, min_fsdp_size=1024)
    assert specs["video_encoder"]["kernel"] == P(None, "fsdp")  # largest divisible dim
    assert specs["video_encoder"]["odd"] == P()  # no dimension divisible by 2
    assert specs["video_encoder"]["bias"] == P()  # below min_fsdp_size
    assert specs["text"]["kernel"] == P()
    with pytest.raises(ValueError, match="no sharding rule matches parameter 'text/kernel'"):
        sharding.param_specs(shapes, rules[:1], mesh)
    with pytest.raises(ValueError, match="need 16 devices"):
        sharding.make_mesh((("data", 8), ("fsdp", 2)))


def test_sharded_params_hold_the_same_values():
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
    params = {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)}
    shardings = sharding.param_shardings(params, [(".*", "fsdp")], mesh, min_fsdp_size=1)
    placed = jax.device_put(params, shardings)
    assert placed["w"].sharding.spec == P("fsdp", None)
    assert len({s.device for s in placed["w"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(placed["w"]), np.asarray(params["w"]))
    batch = jax.device_put(jnp.ones((16, 3)), sharding.batch_sharding(mesh))
    assert batch.addressable_shards[0].data.shape == (2, 3)
