"""tlflax: transfer learning in JAX."""
