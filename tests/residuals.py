"""What a backward pass keeps, through public JAX only: the arrays inside the function that jax.vjp returns.

That function is a pytree of the residuals (and of the inputs the backward reuses, parameters among them), so
a test can check by shape that remat recomputes an activation instead of saving it.
"""
import jax


def saved(f, *args):
  """Shapes and dtypes (jax.ShapeDtypeStruct) of what f's VJP at `args` holds for its backward pass; traced
  only, nothing runs."""
  return jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))
