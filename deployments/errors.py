"""Typed errors, raised where the problem is found.

Only the ingress knows HTTP: it maps each error's `code` to a status once. Every error takes a
single message argument so it pickles unchanged across Ray (a replica's error reaches the
ingress as the same class).
"""


class LoraplexError(Exception):
    """Base class: `code` is the stable machine-readable name in the JSON error body."""

    code = "internal_error"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class LoraRequired(LoraplexError):
    code = "lora_required"

    def __init__(self, message: str = "lora_id or lora_name is required"):
        super().__init__(message)


class LoraNotFound(LoraplexError):
    """The named adapter is not in the LoRA store, or the name is not one the store accepts."""

    code = "lora_not_found"


class LoraIncompatible(LoraplexError):
    """The file exists but cannot be applied: corrupt, another base model, or no key matched.
    The message is cut to `MAX_MESSAGE_CHARS`: it names the file and the first reason, never
    a converter's whole key list."""

    code = "lora_incompatible"
    MAX_MESSAGE_CHARS = 500

    def __init__(self, message: str):
        if len(message) > self.MAX_MESSAGE_CHARS:
            message = message[: self.MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)


class RemoteFetchFailed(LoraplexError):
    """A LoRA URL could not be fetched: it timed out, or its server failed or answered oddly."""

    code = "lora_fetch_failed"


class InvalidRequest(LoraplexError):
    """A field is out of range, unknown or inconsistent; the message names the field."""

    code = "invalid_request"


class NotFound(LoraplexError):
    """An HTTP path or resource other than a LoRA does not exist."""

    code = "not_found"


class MethodNotAllowed(LoraplexError):
    """The path exists, but not for this HTTP method; the message says which it takes."""

    code = "method_not_allowed"


class Conflict(LoraplexError):
    """The request does not fit the resource's current state (an upload chunk at the wrong
    offset, a name already taken); the message says what the state is."""

    code = "conflict"


class TooLarge(LoraplexError):
    code = "too_large"


class Unauthorized(LoraplexError):
    code = "unauthorized"


class Forbidden(LoraplexError):
    """A valid key without the scope a route needs, or a tenant key changing what it may only
    read (a shared LoRA or dataset); the message names the scope or the field."""

    code = "forbidden"


class Overloaded(LoraplexError):
    code = "overloaded"


class ReplicaUnavailable(LoraplexError):
    """The replica serving a request was lost (its node died, or it cannot be reached) or the
    deployment has none to give: the request may succeed once Serve has replaced it."""

    code = "replica_unavailable"


class JobServerUnavailable(LoraplexError):
    """Ray's job submission server (part of the dashboard) cannot be reached."""

    code = "job_server_unavailable"


class ModelLoadError(LoraplexError):
    """A base model could not be built or loaded from its URI (a deployment start-up failure)."""

    code = "model_load_failed"


class UnsupportedServeSetting(LoraplexError):
    """Ray Serve runs with a setting loraplex cannot serve under (a replica start-up failure)."""

    code = "unsupported_serve_setting"


class PipelineBroken(ReplicaUnavailable):
    """The replica's pipeline is not the model it loaded (a change no load could undo, or one
    made outside any load): it renders nothing more, and fails Serve's health check so Serve
    replaces it. A retry reaches a sound replica."""
