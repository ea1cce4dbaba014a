"""The Ray Train job that turns a folder of captioned images into a servable LoRA.

Kept import-light on purpose: the HTTP API imports `cluster.train.config` and
`cluster.train.data` without pulling in Ray Train or a model. The job itself is
`cluster.train.run.run(job)`; `python -m cluster.train --config job.yaml` is its command.
"""
