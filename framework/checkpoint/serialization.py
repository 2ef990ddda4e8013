"""State trees <-> (tensors, JSON skeleton), without pickle.

A state tree (nested dicts/lists/tuples of primitives, tensors and numpy values) is split into a
dict of tensors plus a JSON *skeleton* whose placeholders name those tensors. Tensors viewing the
same memory (tied weights) are stored once and come back as one object; tuples, OrderedDicts
(with their ``_metadata``), int dict keys, non-finite floats and numpy dtypes all round-trip.
Malformed skeletons raise ``ValueError``; ``framework.checkpoint.load`` adds which file it came from.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections import OrderedDict
from typing import Any

import torch

TAG = "__kiln__"
TREE_FORMAT = "kiln-tree"
TREE_VERSION = 1

# ----------------------------------------------------------------------------- tree <-> skeleton


def _path_str(path: tuple) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def tensor_identity(t: torch.Tensor) -> tuple | None:
    """Key equal for two tensors that view exactly the same memory (tied weights)."""
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device)


def _check_tensor(t: torch.Tensor, path: tuple) -> None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"cannot serialize tensor subclass {type(t).__qualname__} at {_path_str(path)}: "
                        "convert it to a plain tensor (sharded DTensors need a full state dict or the "
                        "strategy's DCP layout)")
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        raise TypeError(f"cannot serialize {t.layout} / quantized / meta tensor at {_path_str(path)}: "
                        "only dense tensors with data are supported")


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_identity: dict[tuple, str] = {}
        self._arrays: dict[int, str] = {}

    def _name_for(self, path: tuple) -> str:
        base = ".".join(str(p) for p in path) or "_"
        name, n = base, 0
        while name in self.tensors or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        return name

    def tensor(self, t: torch.Tensor, path: tuple) -> dict:
        _check_tensor(t, path)
        ident = tensor_identity(t)
        if ident is not None and ident in self._by_identity:
            return {TAG: "tensor", "key": self._by_identity[ident]}
        name = self._name_for(path)
        self.tensors[name] = t.detach()
        if ident is not None:
            self._by_identity[ident] = name
        return {TAG: "tensor", "key": name}

    def ndarray(self, a: Any, path: tuple) -> dict:
        if a.dtype.hasobject or a.dtype.fields is not None:
            raise TypeError(f"cannot serialize numpy array of dtype {a.dtype} at {_path_str(path)}: "
                            "only plain numeric/bool dtypes are supported")
        entry = {TAG: "ndarray", "dtype": a.dtype.str, "shape": list(a.shape)}
        if id(a) in self._arrays:
            return {**entry, "key": self._arrays[id(a)]}
        import numpy as np

        name = self._name_for(path)
        self.tensors[name] = torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        self._arrays[id(a)] = name
        return {**entry, "key": name}

    def encode(self, obj: Any, path: tuple) -> Any:
        kind = type(obj)
        if obj is None or kind in (bool, int, str):
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {TAG: "float", "value": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, dict):
            return self._dict(obj, path)
        if kind is list:
            return [self.encode(v, (*path, i)) for i, v in enumerate(obj)]
        if kind is tuple:
            return {TAG: "tuple", "items": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if kind is torch.Size:
            return {TAG: "size", "items": list(obj)}
        if kind is bytes:
            return {TAG: "bytes", "b64": base64.b64encode(obj).decode()}
        if kind is torch.dtype:
            return {TAG: "dtype", "name": str(obj).removeprefix("torch.")}
        if kind is torch.device:
            return {TAG: "device", "name": str(obj)}
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray):
            return self.ndarray(obj, path)
        if np is not None and isinstance(obj, np.generic) and obj.dtype.kind in "biufc":
            return {TAG: "npscalar", "dtype": obj.dtype.str, "hex": obj.tobytes().hex()}
        raise TypeError(f"cannot serialize {kind.__module__}.{kind.__qualname__} at {_path_str(path)}: "
                        "supported are dict, list, tuple, str, int, float, bool, None, bytes, torch.Tensor, "
                        "torch.dtype/device, numpy arrays and scalars; convert it (e.g. to a dict) first")

    def _dict(self, obj: dict, path: tuple) -> Any:
        is_odict = isinstance(obj, OrderedDict)
        if not is_odict and all(type(k) is str for k in obj) and TAG not in obj:
            return {k: self.encode(v, (*path, k)) for k, v in obj.items()}
        items = [[self._key(k, path), self.encode(v, (*path, k))] for k, v in obj.items()]
        if not is_odict:
            return {TAG: "dict", "items": items}
        out = {TAG: "odict", "items": items}
        meta = getattr(obj, "_metadata", None)  # module state_dict versions, used by load_state_dict
        if isinstance(meta, dict):
            out["metadata"] = self.encode(meta, (*path, "_metadata"))
        return out

    def _key(self, key: Any, path: tuple) -> Any:
        if key is None or type(key) in (str, int, float, bool, bytes) or (
                type(key) is tuple and all(k is None or type(k) in (str, int, float, bool) for k in key)):
            return self.encode(key, path)
        raise TypeError(f"cannot serialize dict key {key!r} ({type(key).__qualname__}) at {_path_str(path)}: "
                        "keys must be str, int, float, bool, None, bytes or tuples of those")


def flatten_state(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``tree`` into ``(tensors, skeleton)``: a name->tensor dict and a JSON-able skeleton.

    Tensors viewing the same memory are stored once (under the first path's dotted name), so a
    flat module state dict keeps its keys as tensor names. Raises TypeError naming the key path
    of any unsupported object.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(tree, ())
    return flattener.tensors, skeleton


def _bad(msg: str) -> ValueError:
    return ValueError(f"malformed state skeleton: {msg}")


class _Unflattener:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self._arrays: dict[str, Any] = {}

    def _tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise _bad(f"refers to tensor {key!r} that is not in the tensor file")
        return self.tensors[key]

    def decode(self, node: Any) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self.decode(v) for v in node]
        if type(node) is not dict:
            raise _bad(f"unexpected JSON value {node!r}")
        tag = node.get(TAG)
        if tag is None:
            return {k: self.decode(v) for k, v in node.items()}
        if tag == "tensor":
            return self._tensor(node.get("key"))
        if tag in ("dict", "odict"):
            pairs = node.get("items")
            if type(pairs) is not list or not all(type(p) is list and len(p) == 2 for p in pairs):
                raise _bad(f"{tag} without a list of [key, value] pairs")
            cls = OrderedDict if tag == "odict" else dict
            out = cls((self.decode(k), self.decode(v)) for k, v in pairs)
            if "metadata" in node:
                out._metadata = self.decode(node["metadata"])
            return out
        if tag == "tuple":
            return tuple(self.decode(v) for v in self._items(node))
        if tag == "size":
            return torch.Size(self._items(node))
        if tag == "float":
            return float(node["value"])
        if tag == "bytes":
            return base64.b64decode(node["b64"])
        if tag == "dtype":
            dtype = getattr(torch, str(node.get("name")), None)
            if not isinstance(dtype, torch.dtype):
                raise _bad(f"unknown torch dtype {node.get('name')!r}")
            return dtype
        if tag == "device":
            return torch.device(node["name"])
        if tag == "ndarray":
            return self._ndarray(node)
        if tag == "npscalar":
            import numpy as np

            return np.frombuffer(bytes.fromhex(node["hex"]), dtype=_plain_dtype(node["dtype"]))[0]
        raise _bad(f"unknown tag {tag!r}")

    @staticmethod
    def _items(node: dict) -> list:
        items = node.get("items")
        if type(items) is not list:
            raise _bad(f"{node.get(TAG)} without a list of items")
        return items

    def _ndarray(self, node: dict) -> Any:

        key = node.get("key")
        if key not in self._arrays:
            raw = self._tensor(key).numpy()
            self._arrays[key] = raw.view(_plain_dtype(node["dtype"])).reshape(node["shape"])
        return self._arrays[key]


def _plain_dtype(spec: Any) -> Any:
    """numpy dtype from its ``.str``; object dtypes are refused (bytes must never become pointers)."""
    import numpy as np

    dtype = np.dtype(str(spec))
    if dtype.hasobject or dtype.fields is not None:
        raise _bad(f"numpy dtype {spec!r} is not a plain numeric dtype")
    return dtype


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`; a tensor referenced twice comes back as the same object."""
    try:
        return _Unflattener(tensors).decode(skeleton)
    except (KeyError, TypeError, AttributeError) as exc:
        raise _bad(f"{type(exc).__name__}: {exc}") from exc


def skeleton_to_json(skeleton: Any) -> bytes:
    return json.dumps({"format": TREE_FORMAT, "version": TREE_VERSION, "tree": skeleton},
                      separators=(",", ":"), allow_nan=False).encode()


def skeleton_from_json(data: bytes) -> Any:
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != TREE_FORMAT or "tree" not in doc:
        raise _bad("not a Kiln state skeleton")
    if not isinstance(doc.get("version"), int) or doc["version"] > TREE_VERSION:
        raise _bad(f"skeleton version {doc.get('version')!r} is newer than this Kiln reads ({TREE_VERSION})")
    return doc["tree"]
