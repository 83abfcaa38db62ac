"""unrolled_key draws the bits jax.random draws for the plain key, without a loop on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hairseg_jax.threefry import unrolled_key


@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 4, 5), (2, 7, 7, 3)])
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32])
def test_bits_match_jax_random_for_the_plain_key(shape, dtype):
    raw = jax.random.fold_in(jax.random.PRNGKey(7), 3)
    expected = jax.random.bits(raw, shape, dtype)
    drawn = jax.random.bits(unrolled_key(raw), shape, dtype)
    assert drawn.dtype == expected.dtype and drawn.shape == expected.shape
    np.testing.assert_array_equal(drawn, expected)


def test_split_fold_in_and_typed_keys_follow_threefry():
    typed = jax.random.key(11)
    ours = jax.random.split(jax.random.fold_in(unrolled_key(typed), 5), 3)
    plain = jax.random.split(jax.random.fold_in(typed, 5), 3)
    np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(plain))
    np.testing.assert_array_equal(
        jax.random.uniform(ours[1], (4, 6)), jax.random.uniform(plain[1], (4, 6))
    )


def test_flax_dropout_masks_are_unchanged():
    x = jnp.ones((2, 9, 9, 16))
    dropout = nn.Dropout(0.5, deterministic=False)
    key = jax.random.PRNGKey(3)
    plain = dropout.apply({}, x, rngs={"dropout": key})
    ours = jax.jit(lambda k: dropout.apply({}, x, rngs={"dropout": unrolled_key(k)}))(key)
    np.testing.assert_array_equal(ours, plain)
    assert 0.3 < float(jnp.mean(ours == 0)) < 0.7


def test_bits_compile_to_one_pass_without_a_loop():
    """JAX's own CPU lowering loops over the hash's rounds, one pass over the array each."""
    draw = jax.jit(lambda k: jax.random.bits(unrolled_key(k), (64, 64)))
    assert jax.default_backend() == "cpu"
    assert " while(" not in draw.lower(jax.random.PRNGKey(0)).compile().as_text()


def test_keys_of_other_implementations_pass_through():
    rbg = jax.random.key(0, impl="rbg")
    assert unrolled_key(rbg) is rbg
