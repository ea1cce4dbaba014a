"""loraplex: serve diffusion models with per-request LoRA adapters on Ray Serve."""
