"""The tutorials' worked examples (../shared/seeds) as test cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers, models
from cnnjax.analysis import conv_output_size, conv_params, summary


def loop_conv2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The seeds' numpy loop: valid cross-correlation of a 2-D image with a 2-D kernel."""
    kh, kw = kernel.shape
    out = np.zeros((img.shape[0] - kh + 1, img.shape[1] - kw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = (img[i:i + kh, j:j + kw] * kernel).sum()
    return out


def cnnjax_conv2d(img: np.ndarray, kernel: np.ndarray, padding=0, stride=1) -> np.ndarray:
    conv = layers.Conv(1, kernel.shape, stride, padding, use_bias=False)
    variables = {"params": {"kernel": jnp.asarray(kernel, jnp.float32)[:, :, None, None]}}
    return np.asarray(conv.apply(variables, jnp.asarray(img, jnp.float32)[None, :, :, None]))[0, :, :, 0]


def test_loop_convolution_equals_cnnjax_conv():
    rng = np.random.RandomState(0)
    for shape, kshape in [((5, 5), (3, 3)), ((9, 7), (3, 2)), ((8, 8), (5, 5))]:
        img, ker = rng.randn(*shape), rng.randn(*kshape)
        np.testing.assert_allclose(cnnjax_conv2d(img, ker), loop_conv2d(img, ker), atol=1e-5)


def test_seed_001_worked_example():
    img = np.array([[1, 0, 1, 2, 1], [0, 1, 1, 0, 2], [1, 0, 0, 1, 1], [2, 1, 0, 1, 0], [1, 1, 2, 0, 1]])
    ker = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    out = cnnjax_conv2d(img, ker)
    assert out.shape == (3, 3)
    assert out[0, 0] == 4
    np.testing.assert_array_equal(out, loop_conv2d(img, ker))


def test_seed_004_vertical_edge_detector():
    image = np.array([[0, 0, 0, 1, 1, 1]] * 6, np.float32)
    kernel = np.array([[-1, 0, 1]] * 3, np.float32)
    fmap = cnnjax_conv2d(image, kernel)
    assert fmap.shape == (4, 4)
    assert fmap.max() == 3
    np.testing.assert_array_equal(fmap[:, 0], 0)  # flat region: no response
    np.testing.assert_array_equal(fmap[:, 1], 3)  # the edge column


def test_seed_001_pooling():
    x = jnp.array([[1, 3, 2, 1], [4, 2, 0, 1], [0, 1, 5, 2], [1, 2, 3, 0]], jnp.float32)[None, :, :, None]
    np.testing.assert_array_equal(layers.max_pool(x, 2)[0, :, :, 0], [[4, 2], [2, 5]])
    np.testing.assert_allclose(layers.avg_pool(x, 2)[0, :, :, 0], [[2.5, 1.0], [1.0, 2.5]])
    np.testing.assert_allclose(layers.global_avg_pool(x), [[28 / 16]])


def test_seed_004_pooling_demo():
    f = jnp.array([[1, 3, 2, 4], [5, 6, 1, 2], [7, 2, 3, 1], [0, 8, 4, 5]], jnp.float32)[None, :, :, None]
    np.testing.assert_array_equal(layers.max_pool(f, 2)[0, :, :, 0], [[6, 4], [8, 5]])
    np.testing.assert_allclose(layers.avg_pool(f, 2)[0, :, :, 0], [[3.75, 2.25], [4.25, 3.25]])


def test_conv_is_translation_equivariant_away_from_borders():
    conv = layers.Conv(5, 3, padding=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
    variables = conv.init(jax.random.PRNGKey(1), x)
    shifted = jnp.roll(x, (2, 3), axis=(1, 2))
    y, y_shifted = conv.apply(variables, x), conv.apply(variables, shifted)
    # interior rows/cols unaffected by the wrap-around or the zero padding
    np.testing.assert_allclose(y_shifted[:, 4:15, 5:15], y[:, 2:13, 2:12], atol=1e-5)
    assert not np.allclose(y_shifted, y, atol=1e-3)


def test_seed_000_shape_nchw_to_nhwc():
    x_nchw = np.random.RandomState(0).randn(1, 3, 32, 32).astype(np.float32)
    x = jnp.transpose(x_nchw, (0, 2, 3, 1))
    assert x.shape == (1, 32, 32, 3)
    conv = layers.Conv(8, 3, padding=1)
    y = conv.apply(conv.init(jax.random.PRNGKey(0), x), x)
    assert y.shape == (1, 32, 32, 8)


def test_seed_001_worked_size_trace():
    w = 32
    w = conv_output_size(w, 3, 1, 1)
    assert w == 32
    w = conv_output_size(w, 2, 0, 2)
    assert w == 16
    w = conv_output_size(w, 3, 1, 1)
    assert w == 16
    w = conv_output_size(w, 2, 0, 2)
    assert w == 8
    assert w * w * 32 == 2048
    assert conv_params(3, 3, 3, 16) == 448
    # The same trace read off simple_cnn's summary (same layers, then a 128-unit hidden layer).
    rows = summary(models.create("simple_cnn"), (32, 32, 3)).rows
    assert [r.output_shape[1] for r in rows[:4]] == [32, 16, 16, 8]
    assert rows[0].params == 448
    assert rows[4].params == 2048 * 128 + 128


@pytest.mark.parametrize("args,want", [((5, 3, 0, 1), 3), ((5, 3, 1, 1), 5), ((7, 3, 0, 2), 3), ((32, 3, 1, 2), 16)])
def test_conv_output_size_seed_cases(args, want):
    assert conv_output_size(*args) == want


def test_conv_params_seed_case():
    assert conv_params(3, 3, 64, 128) == 73_856


def test_stripes_model_seed_004_shapes():
    model = models.create("tiny_cnn")
    rows = summary(model, (8, 8, 1)).rows
    assert [r.output_shape for r in rows] == [(1, 8, 8, 4), (1, 4, 4, 4), (1, 2)]
