"""spyglass.kernels: Triton kernels, each beside its pure-torch reference."""
