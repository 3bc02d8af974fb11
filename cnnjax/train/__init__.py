"""Training: state, optimizers, pure steps with jit / pmap / sharded wrappers, and the fit loop."""
