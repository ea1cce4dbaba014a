"""The Ray Train job that turns a folder of captioned images into a servable LoRA."""
