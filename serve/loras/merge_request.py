"""`POST /loras/merge`'s request. Apart from the merge (deployments/loras/merge.py), which the
replicas run: that needs torch and peft, and importing peft would add seconds to every ingress
replica's start for a schema."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.loras.uploads import checked_target

MAX_MERGE_INPUTS = 8


class MergeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=512, description="A file under the LoRA root.")
    ratio: float = Field(
        default=1.0, ge=-2.0, le=2.0, description="Its weight: the strength it had in a stack."
    )


class MergeRequest(BaseModel):
    """`POST /loras/merge`."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[MergeInput] = Field(min_length=1, max_length=MAX_MERGE_INPUTS)
    output: str = Field(
        min_length=1, max_length=512, description="Name of the merged file under the LoRA root."
    )
    family: str | None = Field(
        default=None, description="Merge with this family's model instead of detecting it."
    )
    overwrite: bool = Field(default=False, description="Replace a file of the same name.")

    @field_validator("output")
    @classmethod
    def _servable_name(cls, output: str) -> str:
        # InvalidRequest, not ValueError: it passes through pydantic with its own message.
        return checked_target(output, "output")

    @field_validator("inputs")
    @classmethod
    def _distinct(cls, inputs: list[MergeInput]) -> list[MergeInput]:
        names = [item.name for item in inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"each file at most once, got {names}")
        return inputs
