"""Which tensors of an ONNX model keep their data in another file, read from the model's bytes.

ONNX Runtime resolves such "external data" by path when it builds a session, beside the model
file, or in the working directory when the model comes from bytes: a file no manifest hashed.
Bundles are single-file ONNX (hexfast export never writes external data; protobuf's 2 GiB limit
is above full HEX's 1.2 GB), so the runtime refuses any model that refers to external data.

The onnx package is not a runtime dependency, so this walks protobuf's wire format itself,
following ONNX's schema (onnx/onnx.proto) to every TensorProto a model can hold: graph
initializers, node attributes (tensors and subgraphs, recursively), sparse tensors, functions and
training graphs. tests/test_engines.py checks it against the onnx package on converted models.
"""

from __future__ import annotations

from ..bundle import ListedFile
from .errors import ModelFileError

# (message, field number) -> message of that field, for the fields that can lead to a TensorProto.
_CHILDREN = {
    ("model", 7): "graph", ("model", 25): "function", ("model", 20): "training",
    ("training", 1): "graph", ("training", 2): "graph",
    ("function", 7): "node", ("function", 11): "attribute",
    ("graph", 1): "node", ("graph", 5): "tensor", ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor", ("attribute", 6): "graph", ("attribute", 10): "tensor",
    ("attribute", 11): "graph", ("attribute", 22): "sparse", ("attribute", 23): "sparse",
    ("sparse", 1): "tensor", ("sparse", 2): "tensor",
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def single_file_onnx(listed: ListedFile) -> bytes:
    """The checked bytes of a bundle's ONNX file; a ModelFileError if it is not protobuf or keeps
    any tensor in an external data file."""
    data = listed.read()
    try:
        external = external_tensors(data)
    except NotOnnx as e:
        raise ModelFileError(listed.path, f"not a usable ONNX model ({e})") from None
    if external:
        raise ModelFileError(listed.path, f"keeps {len(external)} tensor(s) ({external[0]}, ...) in external data "
                                          f"files, which the manifest does not hash; a bundle's ONNX files must be "
                                          f"self-contained (hexfast export writes them so)")
    return data


class NotOnnx(ValueError):
    """The bytes are not a well-formed protobuf message."""


def external_tensors(model: bytes) -> list[str]:
    """Names of the tensors in a serialized ModelProto whose data lives in another file."""
    found: list[str] = []
    _walk(memoryview(model), "model", found)
    return found


def _walk(buf: memoryview, kind: str, found: list[str]) -> None:
    name, external = "", False
    for field, wire, value in _fields(buf):
        child = _CHILDREN.get((kind, field))
        if child is not None and wire == 2:
            _walk(value, child, found)
        elif kind == "tensor":
            if field == _TENSOR_NAME and wire == 2:
                name = bytes(value).decode("utf-8", "replace")
            elif field == _TENSOR_EXTERNAL_DATA and wire == 2:
                external = True
            elif field == _TENSOR_DATA_LOCATION and wire == 0 and value == _EXTERNAL:
                external = True
    if external:
        found.append(name or "<unnamed>")


def _fields(buf: memoryview):
    """(field number, wire type, value) of each field: an int for varints, a memoryview for
    length-delimited fields, None for fixed-width ones."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise NotOnnx("a field runs past the end of its message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise NotOnnx(f"wire type {wire} is not protobuf 3")
        if field == 0 or pos > end:
            raise NotOnnx("malformed field")
        yield field, wire, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise NotOnnx("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
