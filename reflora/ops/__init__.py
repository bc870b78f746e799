"""The math as pure op pairs (forward, backward), one module per op."""
