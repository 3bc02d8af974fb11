"""TrainState: params, BatchNorm statistics, optimizer state, step and rng in one pytree."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` plus ``batch_stats`` (``{}`` for models without BN), an ``rng`` key and,
    for lookahead training, the slow weights ``slow = {'params', 'batch_stats'}`` (else ``None``)."""

    batch_stats: Any
    rng: jax.Array
    slow: Any = None


# XLA options for the one-off init program on a CPU device (see init_variables).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def model_variables(params: Any, batch_stats: Any) -> dict:
    """Flax variables ``{'params', 'batch_stats'?}`` (no empty collection for models without BN)."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def init_variables(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array, **kwargs: Any) -> dict:
    """``model``'s variables, initialised on a ``[1, *input_shape]`` zero input in one compiled call.

    ``key`` seeds both the ``params`` and ``dropout`` streams; ``kwargs`` go to ``model.init``
    (e.g. ``train=False``). On the CPU the call compiles without LLVM's optimisations: it runs once, and
    optimising the initialisers' threefry code costs more start-up time than it saves (initialising op by op,
    ``model.init`` outside ``jit``, is slower still). Values may differ from an optimised compile in the last bit.
    """
    return _compiled_once(lambda k: _init(model, input_shape, k, **kwargs), key)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, int, int],
                       key: jax.Array) -> TrainState:
    """Initialise ``model`` on a ``[1, *input_shape]`` input; ``key`` seeds init and the state's rng.

    The variables and ``tx``'s state come from one compiled call (see :func:`init_variables`), not one compiled
    kernel per parameter shape as optax's init run op by op would take."""
    init_key, state_key = jax.random.split(key)

    def build(k: jax.Array) -> tuple[dict, Any]:
        variables = _init(model, input_shape, k, train=False)
        return variables, tx.init(variables["params"])

    variables, opt_state = _compiled_once(build, init_key)
    return TrainState(step=0, apply_fn=model.apply, params=variables["params"], tx=tx, opt_state=opt_state,
                      batch_stats=variables.get("batch_stats", {}), rng=state_key)


def _init(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array, **kwargs: Any) -> dict:
    return model.init({"params": key, "dropout": key}, jnp.zeros((1, *input_shape)), **kwargs)


def _compiled_once(fn, key: jax.Array) -> Any:
    """``fn(key)`` compiled and run once, on ``key``'s device; for a CPU device without LLVM's optimisations (see
    :func:`init_variables`). Under a trace (``jax.eval_shape``, ``jit``) it is traced like any function, so
    ``jax.eval_shape(lambda k: create_train_state(...), key)`` gives the state's shapes without allocating."""
    if isinstance(key, jax.core.Tracer):
        return fn(key)
    device = next(iter(key.devices())) if isinstance(key, jax.Array) else jax.devices()[0]
    options = INIT_COMPILER_OPTIONS if device.platform == "cpu" else None
    return jax.jit(fn).lower(key).compile(compiler_options=options)(key)
