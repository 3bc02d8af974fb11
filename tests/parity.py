"""Helpers to compare cnnjax modules with torch references on identical weights."""

from __future__ import annotations

import functools

import numpy as np
import torch

from cnnjax.port import state_dict_to_variables, torchvision_key

# name -> max |Δ|, filled by parity tests and printed in pytest's terminal summary.
REPORT: dict[str, float] = {}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.numpy()


def variables_of(module: torch.nn.Module, rename=torchvision_key) -> dict:
    return state_dict_to_variables({k: v.detach().numpy() for k, v in module.state_dict().items()}, rename)


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_parity(label: str, jax_value, torch_value, tol: float) -> float:
    """Assert max |Δ| <= tol over all leaves of two matching trees / arrays; record it."""
    import jax

    leaves_j, tree_j = jax.tree_util.tree_flatten(jax_value)
    leaves_t, tree_t = jax.tree_util.tree_flatten(torch_value)
    assert tree_j == tree_t, f"{label}: structures differ\n{tree_j}\n{tree_t}"
    diff = max((max_abs_diff(a, b) for a, b in zip(leaves_j, leaves_t, strict=True)), default=0.0)
    REPORT[label] = max(REPORT.get(label, 0.0), diff)
    assert diff <= tol, f"{label}: max |Δ| = {diff:.3g} > {tol}"
    return diff


def port_twin(model, torch_module: torch.nn.Module, shape: tuple[int, int, int], dtype=np.float32) -> dict:
    """The twin's weights as ``model``'s variables through the generic port (:func:`cnnjax.port.torch_layout`),
    strictly: every key the model needs, no other, each with the shape the model builds at input ``shape``."""
    import jax
    import jax.numpy as jnp

    from cnnjax.port import check_state_dict
    from cnnjax.port.torch_state import layout_to_variables, torch_layout

    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    layout = torch_layout(abstract)
    state_dict = {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}
    check_state_dict(state_dict, {k: e.torch_shape for k, e in layout.items()}, type(model).__name__)
    return layout_to_variables(state_dict, layout, dtype)


def check_model_parity(name: str, shape: tuple[int, int, int], batch: int, path: str, jax_kwargs=None,
                       torch_kwargs=None, tol: float = 1e-4, stats_tol: float = 1e-5, fp64: bool = False,
                       seed: int = 0) -> None:
    """Zoo model ``name`` against its torch twin (:mod:`experiments.bench.torch_zoo`) on identical weights at
    input ``shape`` ``(H, W, C)``: eval logits, then train-mode logits and updated running statistics.

    ``jax_kwargs`` / ``torch_kwargs`` go to ``models.create`` / the twin's builder (pass rates of 0 to switch
    dropout and stochastic depth off: train mode is compared without them). ``fp64=True`` compares train mode
    in float64 (both sides), to ``1e-9``, for nets that amplify float32 rounding. ``path`` labels the figures;
    the ``path`` fixture (or :func:`tests.onednn_marks.use_path`) selects it.
    """
    import jax

    from cnnjax import models
    from experiments.bench import torch_zoo

    torch.manual_seed(seed)
    tm = torch_zoo.build(name, **(torch_kwargs or {}))
    torch_zoo.randomize_bn_stats(tm, torch.Generator().manual_seed(seed + 1))
    model = models.create(name, **(jax_kwargs or {}))
    variables = port_twin(model, tm, shape)
    x = np.random.RandomState(seed).randn(batch, *shape).astype(np.float32)
    label = f"{name} {shape[0]}x{shape[1]} {path}"

    tm.eval()
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    got = jax.jit(functools.partial(model.apply, train=False))(variables, x)  # jitted: a third of eager's time
    assert got.shape == want.shape
    assert_parity(f"{label} eval logits", got, want, tol)

    if fp64:
        tm, x = tm.double(), x.astype(np.float64)
        variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        tol, stats_tol, label = 1e-9, 1e-9, label + " (fp64)"
    tm.train()
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    with jax.enable_x64(fp64):
        got, updated = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
            variables, x, rngs={"dropout": jax.random.PRNGKey(0)})
        assert_parity(f"{label} train logits", got, want, tol)
        if "batch_stats" in variables:
            stats = port_twin(model, tm, shape, np.float64 if fp64 else np.float32)["batch_stats"]
            assert_parity(f"{label} train running stats", updated["batch_stats"], stats, stats_tol)


def param_count(tree) -> int:
    """Number of scalars in a tree of arrays or ``ShapeDtypeStruct``s (e.g. a model's abstract ``params``)."""
    import jax

    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
