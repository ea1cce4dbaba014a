"""The HTTP side of LoRA files: the catalog behind `GET /loras`, resumable uploads, and the
merge request. The files themselves are handled in `deployments/loras/`."""
