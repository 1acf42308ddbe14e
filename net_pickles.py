"""A safe reader of network pickles (EDM's; EDM2's share the format): nothing in the file runs.

    import net_pickles
    net = net_pickles.load_edm_network("edm-cifar10-32x32-cond-vp.pkl")  # EDMPrecond, eval, fp32
    net = net_pickles.load_edm_network("edm2-img64-s-1073741-0.075.pkl")  # edm2.Precond, likewise
    D = net(x, sigma, class_labels=one_hot)        # estimate of E[x1 | x1 + sigma n = x]

`load_edm_pickle` reads `edm-*.pkl`, `baseline-*.pkl` and `network-snapshot-*.pkl` without EDM's
code and without running anything from the file. EDM pickles each network as a "persistent
object" carrying the source of its Python module, which EDM's loader executes; here it is never
run: the unpickler admits only the globals a network's data needs, rebuilds each network from
its class name and arguments as this repository's own module (edm.py's or edm2.py's NETWORKS),
and loads its tensors strictly. Other persistent objects (a snapshot's `loss_fn`,
`augment_pipe`) come back as {"class_name", "init_args", "init_kwargs"}.

EDM2's pickles (its training loop's `network-snapshot-*.pkl` and the published post-hoc EMA
reconstructions) are a dnnlib.EasyDict: `ema` an edm2.Precond, stored in float16, rebuilt here
as edm2.py's module in float32 (the float16 values, exactly); `encoder` (StandardRGBEncoder or
StabilityVAEEncoder) and `loss_fn` (EDM2Loss) as the plain dicts above; `dataset_kwargs` a dict.
"""
import contextlib
import inspect
import io
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import torch

import edm
import edm2
from common import RealUIDError

# The networks a pickle may hold, keyed by the class name its persistent objects carry. EDM's
# and EDM2's class names are disjoint (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond,
# SongUNet, DhariwalUNet; Precond, UNet), so the name alone says which module to build.
_SHARED = set(edm.NETWORKS) & set(edm2.NETWORKS)
if _SHARED:  # a name in both would make a pickle ambiguous: key it some other way first
    raise ImportError(f"edm.py and edm2.py both define networks named {sorted(_SHARED)}")
NETWORKS = {**edm.NETWORKS, **edm2.NETWORKS}

# _reconstruct_persistent_obj(meta), meta = {type: 'class', version, module_src, class_name,
# state}, state being the module's __dict__ (its _parameters, _buffers, _modules, and the
# _init_args / _init_kwargs it was built with); containers (ModuleDict) and tensors are pickled
# the ordinary way, each storage as bytes in torch.save's legacy format. Every global the file
# names goes through _SafeUnpickler.find_class, which hands out stand-ins that only hold data.

class _Refused(pickle.UnpicklingError):
    """A global outside _ALLOWED; args[0] names it."""


class _Sealed(type):
    """Metaclass of the stand-ins: a pickle's BUILD (setattr on a class it names) cannot rebind
    their methods, a change that would outlive the load."""

    def __setattr__(cls, name, value):
        raise pickle.UnpicklingError(f"a pickle may not change {cls.__name__}")


class _Persistent(metaclass=_Sealed):
    """Stand-in for a persistent object: its class name and state. module_src is dropped unread."""

    def __init__(self, meta):
        if not (isinstance(meta, dict) and meta.get("type") == "class" and
                isinstance(meta.get("class_name"), str) and isinstance(meta.get("state"), dict)):
            raise pickle.UnpicklingError("malformed persistent object")
        self.class_name, self.state = meta["class_name"], meta["state"]


class _Container(metaclass=_Sealed):
    """Stand-in for a torch.nn container: the pickle's NEWOBJ makes it, BUILD hands it the state."""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


_CONTAINERS = {name: type(name, (_Container,), {})
               for name in ("ModuleDict", "ModuleList", "Sequential")}


class _EasyDict(dict, metaclass=_Sealed):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access); returned as a dict."""


def _storage(data):
    """torch.storage._load_from_bytes, but through torch.load's weights_only unpickler, on CPU."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notices
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise pickle.UnpicklingError(f"a tensor's storage did not load as weights only "
                                     f"({_one_line(e)})")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor's storage is not a storage")
    return storage


def _tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
            metadata=None):
    """torch._utils._rebuild_tensor_v2 without the pickle's hooks and grad flag."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                           False, OrderedDict())


def _parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): the data is all a state dict needs."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


class _NDArray(metaclass=_Sealed):
    """What the global numpy.ndarray resolves to: a name that only _array accepts. Called (a
    pickle's REDUCE or NEWOBJ on it), it refuses: ndarray(shape, dtype, buffer) would view
    memory the file chose."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may be named by a pickle, not called")


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, wherever numpy keeps it


def _array(subtype, shape, dtype):
    """numpy's _reconstruct(ndarray, shape, dtype) for plain arrays: the empty array that the
    pickle's BUILD then fills (ndarray.__setstate__ checks the data against shape and dtype).
    EDM2's StabilityVAEEncoder keeps its latent scale and bias as float32 arrays."""
    if subtype is not _NDArray:
        raise pickle.UnpicklingError("an array of a class other than numpy.ndarray")
    return _RECONSTRUCT(np.ndarray, shape, dtype)


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,  # protocols 2 and 3
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    # numpy scalars (EDM's block arguments such as np.sqrt(0.5)): numpy's own scalar(dtype, bytes)
    ("numpy", "dtype"): np.dtype,
    **{(m, "scalar"): np.float64(0).__reduce__()[0]
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    # numpy arrays (EDM2's StabilityVAEEncoder state); numpy < 2 writes numpy.core
    ("numpy", "ndarray"): _NDArray,
    **{(m, "_reconstruct"): _array for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINERS.items()},
}
_PY2_MODULES = {"copy_reg": "copyreg", "__builtin__": "builtins"}  # fix_imports spellings


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ALLOWED.get((_PY2_MODULES.get(module, module), name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of EDM's format")


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _collect(node, module, prefix, tensors, where):
    """Flatten a stand-in tree into {dotted name: tensor}, checking class names on the way."""
    found = node.class_name if isinstance(node, _Persistent) else type(node).__name__
    if not isinstance(node, (_Persistent, _Container)) or (
            module is not None and type(module).__name__ != found):
        expected = "module" if module is None else type(module).__name__
        raise RealUIDError(f"{where}: {prefix.rstrip('.') or 'network'} is a {found} in the "
                           f"pickle, not a {expected}")
    node.state = getattr(node, "state", {})  # a container that had no BUILD
    for kind in ("_parameters", "_buffers"):
        for name, value in (node.state.get(kind) or {}).items():
            if value is not None:
                tensors[prefix + name] = value
    for name, child in (node.state.get("_modules") or {}).items():
        if child is not None:
            sub = None if module is None else module._modules.get(name)
            _collect(child, sub, f"{prefix}{name}.", tensors, where)


def _build(node, where):
    """One of this file's networks, from a persistent object's arguments and tensors."""
    cls = NETWORKS[node.class_name]
    args = tuple(_plain(node.state.get("_init_args") or ()))
    kwargs = _plain(node.state.get("_init_kwargs") or {})
    try:
        inspect.signature(cls).bind(*args, **kwargs)
        net = cls(*args, **kwargs)
    except RealUIDError as e:
        raise RealUIDError(f"{where}: {node.class_name}: {e}") from None
    except Exception as e:
        raise RealUIDError(f"{where}: {node.class_name} cannot be built from the pickle's "
                           f"arguments ({_one_line(e)})") from None
    tensors = {}
    _collect(node, net, "", tensors, where)
    try:
        net.load_state_dict(tensors, strict=True)
    except Exception as e:  # torch lists missing / unexpected keys and shapes over several lines
        raise RealUIDError(f"{where}: the tensors do not fit a {node.class_name} with the pickle's "
                           f"arguments ({' '.join(str(e).split())[:400]})") from None
    net.init_args, net.init_kwargs = list(args), kwargs  # what rebuilds it (teachers.py)
    return net.eval().requires_grad_(False)


def _plain(value, where="pickle"):
    """Stand-ins -> results: networks built, other persistent objects and containers as dicts."""
    if isinstance(value, _Persistent):
        if value.class_name in NETWORKS:
            return _build(value, where)
        return {"class_name": value.class_name,
                "init_args": _plain(value.state.get("_init_args") or (), where),
                "init_kwargs": _plain(value.state.get("_init_kwargs") or {}, where)}
    if isinstance(value, _Container):
        return {"class_name": type(value).__name__}
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    return value


def load_edm_pickle(path_or_fileobj):
    """The top-level dict of an EDM pickle, with each network rebuilt as this file's module
    (eval mode, float32, requires_grad False) and other persistent objects as plain dicts.
    Nothing in the file is executed: any global outside a network's data is refused."""
    is_file = hasattr(path_or_fileobj, "read")
    name = str(getattr(path_or_fileobj, "name", "pickle") if is_file else path_or_fileobj)
    try:
        with (contextlib.nullcontext(path_or_fileobj) if is_file
              else open(path_or_fileobj, "rb")) as f:  # a caller's file object stays open
            raw = _SafeUnpickler(f).load()
    except OSError as e:
        raise RealUIDError(f"{name}: cannot read ({e.strerror or e})") from None
    except _Refused as e:
        raise RealUIDError(f"{name}: refused global {e.args[0]}: not an EDM network pickle (only "
                           f"tensors, EDM's and EDM2's networks and plain data are read)") from None
    except Exception as e:
        raise RealUIDError(f"{name}: not an EDM network pickle ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise RealUIDError(f"{name}: not an EDM network pickle (its top level is a "
                           f"{type(raw).__name__}; EDM writes a dict such as {{'ema': network}})")
    try:
        return _plain(raw, name)
    except RealUIDError:
        raise
    except Exception as e:  # stand-ins a hostile file assembled oddly (e.g. without their state)
        raise RealUIDError(f"{name}: not an EDM network pickle ({_one_line(e)})") from None


def load_edm_network(path, key="ema"):
    """The network stored under `key` (EDM's and EDM2's snapshots and public files: 'ema'), in
    eval mode, float32, with requires_grad False: an edm.py network, or an edm2.Precond for an
    EDM2 pickle (whose float16 weights come back as float32 of the same values)."""
    data = load_edm_pickle(path)
    if key not in data:
        held = ", ".join(map(repr, data)) or "nothing"
        raise RealUIDError(f"{path}: no {key!r} in this pickle; it holds {held}")
    net = data[key]
    if not isinstance(net, torch.nn.Module):
        kind = net.get("class_name", "dict") if isinstance(net, dict) else type(net).__name__
        raise RealUIDError(f"{path}: {key!r} holds a {kind}, not one of EDM's networks "
                           f"({', '.join(NETWORKS)})")
    return net.float().eval().requires_grad_(False)
