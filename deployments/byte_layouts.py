"""Cold loads straight from a file's bytes into a free slot, for files whose conversion only
renames keys.

A LoRA file is a safetensors header (names, dtypes, shapes, byte offsets) over one block of
data. Files made by the same trainer for the same model share their header entries, and so the
work a cold load does before its copy: parsing, diffusers' format conversion, the check against
the model. That work is done once per layout (`derive`), and kept as a `ByteLayout`: where each
matrix of the converted adapter lies in the file's data. A file of a known layout then loads
with no parse and no conversion: a slot whose matrices are views into one flat buffer laid out
as the file's data (`pack`) takes the next file of that layout in a single copy, one
host-to-device transfer on a GPU.

Past the libraries here: safetensors parses into new tensors, one per matrix, and diffusers
converts each file's keys anew; neither copies into tensors that already exist.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

# safetensors' dtype names -> torch dtypes (the ones LoRA files use; others are never packed).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
LayoutKey = tuple


@dataclass(frozen=True)
class Matrix:
    key: str
    """`<component>.<module>.lora_{A,B}.weight`, as the loaded layers name it."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Byte offsets in the file's data section."""
    end: int


@dataclass(frozen=True)
class ByteLayout:
    data_start: int
    """Offset of the data section in the file: 8 bytes of length, then the header."""
    data_size: int
    matrices: tuple[Matrix, ...]
    signature: frozenset
    """The slot layout these files fill (`adapters.Signature`)."""


def layout_key(header: dict, header_len: int, adapter_metadata: object) -> LayoutKey:
    """What two files must share to share a layout: every tensor entry, the header's length
    (so the data starts at the same offset), and the adapter metadata that scales them."""
    entries = tuple(
        sorted(
            (name, entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"]))
            for name, entry in header.items()
            if name != "__metadata__"
        )
    )
    return (header_len, json.dumps(adapter_metadata, sort_keys=True), entries)


def header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def derive(
    header: dict,
    data: bytes,
    parsed: dict[str, torch.Tensor],
    clones: dict[str, torch.Tensor],
    converted: dict[str, torch.Tensor],
    signature: frozenset,
) -> ByteLayout | None:
    """The layout of a file whose conversion only renamed keys: `converted` was made from
    `clones` (of the tensors as loaded, by file name), and each converted matrix is one of
    them, same storage, shape and values as the file's own (`parsed`), and every tensor of the
    file is one of them. None otherwise (a split, a scale, an alpha tensor, a dropped key, a
    dtype other than a float): that file loads by the general path."""
    file_name_of = {tensor.data_ptr(): name for name, tensor in clones.items()}
    matrices = []
    for converted_key, tensor in converted.items():
        file_name = file_name_of.pop(tensor.data_ptr(), None)
        entry = header.get(file_name) if file_name is not None else None
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry, dict) else None
        if dtype is None:
            return None
        source = parsed[file_name]
        begin, end = (int(offset) for offset in entry["data_offsets"])
        if (
            not tensor.is_contiguous()
            or tensor.shape != source.shape
            or tensor.dtype != dtype
            or begin % dtype.itemsize  # a view of that dtype cannot start there
            or not torch.equal(tensor, source)
        ):
            return None
        matrices.append(Matrix(converted_key, dtype, tuple(source.shape), begin, end))
    if not matrices or file_name_of:
        return None  # some tensor of the file is not a matrix of the slot
    data_start = 8 + header_length(data)
    data_size = max(int(entry["data_offsets"][1]) for _, entry in _entries(header))
    if data_start + data_size != len(data):
        return None
    return ByteLayout(data_start, data_size, tuple(matrices), signature)


def fits_data(layout: ByteLayout, data: bytes) -> bool:
    return len(data) == layout.data_start + layout.data_size


def data_of(layout: ByteLayout, data: bytes) -> torch.Tensor:
    """The file's data section as a uint8 tensor over `data` (no copy; read only)."""
    with warnings.catch_warnings():
        # torch warns that `bytes` are not writable: they are only ever copied from.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(
            data, dtype=torch.uint8, count=layout.data_size, offset=layout.data_start
        )


def matrices_in(layout: ByteLayout, data: bytes) -> list[tuple[str, torch.Tensor]]:
    """(key, the matrix as `data` holds it) for each matrix of the layout, as views (no copy)."""
    source = data_of(layout, data)
    return [(m.key, source[m.begin : m.end].view(m.dtype).view(m.shape)) for m in layout.matrices]


def pack(
    layout: ByteLayout, data: bytes, parameters: dict[str, torch.nn.Parameter]
) -> torch.Tensor | None:
    """Lay a slot's matrices (`parameters`, by converted key) out as the file's data: one flat
    buffer on their device, holding `data`'s matrices, each parameter re-pointed to its view.
    Returns the buffer, or None (nothing changed) where a parameter's dtype or shape differs
    from the file's: those slots are filled matrix by matrix (`copy_each`)."""
    first = next(iter(parameters.values()))
    for matrix in layout.matrices:
        parameter = parameters[matrix.key]
        if parameter.dtype != matrix.dtype or tuple(parameter.shape) != matrix.shape:
            return None
        if parameter.device != first.device:
            return None
    flat = torch.empty(layout.data_size, dtype=torch.uint8, device=first.device)
    flat.copy_(data_of(layout, data))
    with torch.no_grad():
        for matrix in layout.matrices:
            view = flat[matrix.begin : matrix.end].view(matrix.dtype).view(matrix.shape)
            parameters[matrix.key].data = view
    return flat


def copy_each(layout: ByteLayout, data: bytes, parameters: dict[str, torch.nn.Parameter]) -> None:
    """Each matrix copied from `data` into its parameter, cast to its dtype and device."""
    source = data_of(layout, data)
    with torch.no_grad():
        for matrix in layout.matrices:
            view = source[matrix.begin : matrix.end].view(matrix.dtype).view(matrix.shape)
            parameters[matrix.key].copy_(view)


class KnownLayouts:
    """File layouts seen, by key (raw header bytes, or `layout_key`), least recent dropped
    past `max_layouts`. Requests prepare their files side by side, so it is thread-safe."""

    def __init__(self, max_layouts: int):
        self._max_layouts = max_layouts
        self._layouts: OrderedDict[object, ByteLayout] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, data: bytes) -> ByteLayout | None:
        """The layout remembered under `key`, if `data` fits it."""
        if key is None:
            return None
        with self._lock:
            layout = self._layouts.get(key)
            if layout is None or not fits_data(layout, data):
                return None
            self._layouts.move_to_end(key)
            return layout

    def remember(self, key, layout: ByteLayout) -> None:
        if key is None:
            return
        with self._lock:
            self._layouts[key] = layout
            while len(self._layouts) > self._max_layouts:
                self._layouts.popitem(last=False)


def _entries(header: dict):
    return ((name, entry) for name, entry in header.items() if name != "__metadata__")
