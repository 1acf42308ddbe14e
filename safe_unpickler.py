"""An unpickler that admits only data: the safe half of net_pickles.py.

It reads a pickle of EDM's or EDM2's training loop (Karras et al. 2022, 2024) without their code:
every global the file names goes through find_class, which hands out stand-ins that only hold
data (_Persistent for a persistent object, _Container for torch.nn containers, _EasyDict,
numeric numpy scalars and plain arrays, the tensor rebuilders); every opcode that calls,
builds, hashes or fills something is checked (_GuardedUnpickler), and declared lengths are
compared with the bytes the file holds before anything is allocated (_Reader, _storage). What
the stand-ins become (networks, plain dicts) is net_pickles.py's.
"""
import io
import math
import pickle
import struct
import types
from collections import OrderedDict

import numpy as np
import torch


# _reconstruct_persistent_obj(meta), meta = {type: 'class', version, module_src, class_name,
# state}, state being the module's __dict__ (its _parameters, _buffers, _modules, and the
# _init_args / _init_kwargs it was built with); containers (ModuleDict) and tensors are pickled
# the ordinary way, each storage as bytes in torch.save's legacy format. Every global the file
# names goes through find_class, which hands out stand-ins that only hold data.

class _Refused(pickle.UnpicklingError):
    """A global outside _ALLOWED; args[0] names it."""


class _Sealed(type):
    """Metaclass of the stand-ins: nothing may set attributes on their classes (BUILD is refused
    on them anyway; this is the second lock)."""

    def __setattr__(cls, name, value):
        raise pickle.UnpicklingError(f"a pickle may not change {cls.__name__}")


class _Persistent(metaclass=_Sealed):
    """Stand-in for a persistent object: its class name and state. module_src is dropped unread."""

    def __init__(self, meta):
        if not (type(meta) is dict and type(meta.get("type")) is str and meta["type"] == "class"
                and type(meta.get("class_name")) is str and isinstance(meta.get("state"), dict)):
            raise pickle.UnpicklingError("malformed persistent object")
        self.class_name, self.state = meta["class_name"], meta["state"]


class _Container(metaclass=_Sealed):
    """Stand-in for a torch.nn container: the pickle's NEWOBJ makes it, one BUILD hands it its
    state (a dict)."""


_CONTAINERS = {name: type(name, (_Container,), {})
               for name in ("ModuleDict", "ModuleList", "Sequential")}


class _EasyDict(dict, metaclass=_Sealed):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access); returned as a dict."""


# ---------------------------------------------------------------------------------------------
# Plain values. Dict keys and set members must be atoms: hashing anything else (a tuple of
# tuples that share memo entries) can take 2^depth steps.

_ATOMS = (str, bytes, int, float, bool, type(None))


def _atoms(items, what="a set member"):
    for item in items:
        if type(item) not in _ATOMS:
            raise pickle.UnpicklingError(f"{what} is a {type(item).__name__}, not a string or "
                                         f"number")
    return items


def _ordered_dict(items=()):
    """collections.OrderedDict(): Python 3 pickles it with no arguments, then SETITEMS; Python
    2's [[key, value], ...] is accepted too."""
    if type(items) not in (list, tuple) or not all(
            type(pair) in (list, tuple) and len(pair) == 2 for pair in items):
        raise pickle.UnpicklingError("OrderedDict takes a list of pairs")
    _atoms([pair[0] for pair in items], "a dict key")
    return OrderedDict(items)


def _set(items=()):
    """builtins.set / frozenset as protocols 2 and 3 pickle them: set([members])."""
    if type(items) not in (list, tuple):
        raise pickle.UnpicklingError("set takes a list")
    return set(_atoms(items))


def _frozenset(items=()):
    return frozenset(_set(items))


# ---------------------------------------------------------------------------------------------
# numpy: plain numeric dtypes, their scalars (EDM's block arguments such as np.sqrt(0.5)) and
# arrays (EDM2's StabilityVAEEncoder keeps its latent scale and bias as float32 arrays). A
# structured or object dtype would let scalar() or an array's BUILD turn the file's bytes into
# object pointers (a crash, or worse): only the dtypes below are made, and never changed.

_DTYPE_NAMES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8",
                "c8", "c16")
_PLAIN_DTYPES = tuple(np.dtype(name) for name in _DTYPE_NAMES)  # numpy's own singletons


def _is_plain(dtype):
    return any(dtype is plain for plain in _PLAIN_DTYPES)


def _dtype(name, align=False, copy=False):
    """numpy.dtype(name, align, copy) as numpy pickles a dtype ('f8', False, True), for plain
    numeric names only; the singleton is returned (no copy), and BUILD leaves it as it is."""
    if type(name) is not str or name not in _DTYPE_NAMES or type(align) not in (bool, int) \
            or align or type(copy) not in (bool, int):
        raise pickle.UnpicklingError(f"numpy dtype {str(name)[:40]!r}: only plain numeric dtypes "
                                     f"are read ({', '.join(_DTYPE_NAMES)})")
    return np.dtype(name)


def _check_dtype_state(dtype, state):
    """A dtype's BUILD must carry the state numpy writes for that plain dtype; it is not
    applied (nothing to apply), so numpy's dtype.__setstate__ never sees the file."""
    want = dtype.__reduce__()[2]
    if not (type(state) is tuple and len(state) == len(want) and
            all(type(a) is type(b) and a == b for a, b in zip(state, want))):
        raise pickle.UnpicklingError(f"a pickle may not change numpy's dtype {dtype} (its state "
                                     f"is not a native-endian {dtype}'s)")


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar(dtype, bytes)


def _scalar(dtype, data):
    """numpy's scalar(dtype, bytes), for plain numeric dtypes and exactly itemsize bytes."""
    if not _is_plain(dtype):
        raise pickle.UnpicklingError("a numpy scalar of a dtype other than a plain numeric one")
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"a numpy {dtype} scalar needs {dtype.itemsize} bytes")
    return _NUMPY_SCALAR(dtype, data)


class _NDArray(metaclass=_Sealed):
    """What the global numpy.ndarray resolves to: a name that only _array accepts. Called (a
    pickle's REDUCE on it), it refuses: ndarray(shape, dtype, buffer) would view memory the
    file chose."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may be named by a pickle, not called")


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, wherever numpy keeps it


def _array(subtype, shape, dtype):
    """numpy's _reconstruct(ndarray, (0,), b'b') as numpy pickles every array: the empty array
    that the pickle's one BUILD then fills (_fill_array)."""
    if subtype is not _NDArray:
        raise pickle.UnpicklingError("an array of a class other than numpy.ndarray")
    if not (type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int and
            shape[0] == 0 and type(dtype) in (bytes, str) and dtype in (b"b", "b")):
        raise pickle.UnpicklingError("numpy's _reconstruct with arguments numpy does not write")
    return _RECONSTRUCT(np.ndarray, (0,), b"b")


def _fill_array(array, state):
    """ndarray.__setstate__((1, shape, dtype, is_fortran, bytes)), checked first: a plain dtype,
    and exactly the bytes the shape needs."""
    ok = type(state) is tuple and len(state) == 5
    if ok:
        version, shape, dtype, fortran, raw = state
        ok = (type(version) is int and version == 1 and type(shape) is tuple and
              len(shape) <= 32 and all(type(n) is int and n >= 0 for n in shape) and
              _is_plain(dtype) and type(fortran) is bool and type(raw) is bytes and
              len(raw) == math.prod(shape) * dtype.itemsize)
    if not ok:
        raise pickle.UnpicklingError("an array's state is not a plain numeric array's")
    array.__setstate__(state)


# ---------------------------------------------------------------------------------------------
# Tensors. Each storage is bytes in torch.save's legacy format: three small pickles (magic
# number, version, system info), one whose persistent id declares the storage (type, key,
# location, number of elements), one listing the key, then the element count as 8 bytes and
# the raw elements. It is parsed here, and every size compared with the bytes held before
# anything is allocated (torch's legacy loader allocates the declared size first).

_LEGACY_MAGIC, _LEGACY_VERSION = 0x1950a86a20f9469cfc6c, 1001
_STORAGE_TYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16),
    ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32),
    ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool))}


class _StorageRef(metaclass=_Sealed):
    """A legacy storage's persistent id: what it declares."""
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = dtype, key, numel


def _storage(data):
    """torch.storage._load_from_bytes(data), parsed and size-checked here: a CPU TypedStorage."""
    if type(data) is not bytes:
        raise pickle.UnpicklingError("a tensor's storage is not bytes")
    f = io.BytesIO(data)
    unpickler, parts = _StorageUnpickler(f), []
    try:
        for _ in range(5):  # each its own pickle, as torch.save writes them
            unpickler.memo.clear()
            parts.append(unpickler.load())
        magic, version, info, ref, keys = parts
    except _Refused as e:
        raise pickle.UnpicklingError(f"a tensor's storage is not torch's legacy format "
                                     f"(refused global {e.args[0][:200]})") from None
    except Exception as e:
        raise pickle.UnpicklingError(f"a tensor's storage is not torch's legacy format "
                                     f"({_one_line(e)})") from None
    if not (type(magic) is int and magic == _LEGACY_MAGIC and type(version) is int and
            version == _LEGACY_VERSION and type(info) is dict and type(ref) is _StorageRef and
            type(keys) is list and len(keys) == 1 and type(keys[0]) is str and
            keys[0] == ref.key):
        raise pickle.UnpicklingError("a tensor's storage is not torch's legacy format (magic "
                                     "number, version, system info, one storage and its key)")
    if info.get("little_endian") is not True:
        raise pickle.UnpicklingError("a tensor's storage is not little-endian")
    size = torch._utils._element_size(ref.dtype)
    header, start = f.read(8), f.tell()
    held = len(data) - start
    count = int.from_bytes(header, "little") if len(header) == 8 else None
    if count != ref.numel or held != ref.numel * size:
        raise pickle.UnpicklingError(
            f"a tensor's storage declares {ref.numel} elements of {ref.dtype} "
            f"({ref.numel * size} bytes) but holds {max(held, 0)} bytes (counted {count})")
    raw = bytearray(memoryview(data)[start:])
    untyped = (torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw
               else torch.UntypedStorage(0))
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=ref.dtype, _internal=True)


def _tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
            metadata=None):
    """torch._utils._rebuild_tensor_v2 without the pickle's hooks and grad flag (torch checks
    that size and stride stay inside the storage)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                           False, OrderedDict())


def _parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): the data is all a state dict needs."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set, ("builtins", "frozenset"): _frozenset,  # protocols 2 and 3
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _dtype,
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    # numpy arrays (EDM2's StabilityVAEEncoder state); numpy < 2 writes numpy.core
    ("numpy", "ndarray"): _NDArray,
    **{(m, "_reconstruct"): _array for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINERS.items()},
}
_PY2_MODULES = {"copy_reg": "copyreg", "__builtin__": "builtins"}  # fix_imports spellings


# ---------------------------------------------------------------------------------------------
# The unpickler: pickle's pure-Python one (its opcodes can be overridden; the C one's cannot),
# with every opcode that calls, makes, changes, hashes or fills an object checked.

class _Reader:
    """The file as the unpickler reads it: a length the pickle declares is checked against the
    bytes left before it is read (a seekable file), or read in 16 MiB pieces (a stream), so a
    huge declared length allocates nothing; text lines are at most 1 MiB."""

    _CHUNK, _LINE = 1 << 24, 1 << 20

    def __init__(self, f):
        self._f, self._left = f, None
        try:
            if f.seekable():
                here = f.tell()
                self._left = f.seek(0, io.SEEK_END) - here
                f.seek(here)
        except (AttributeError, OSError, ValueError):
            self._left = None

    def read(self, n):
        if self._left is not None:
            if n > self._left:
                raise pickle.UnpicklingError("pickle data was truncated")
            data = self._f.read(n)
            self._left -= len(data)
        else:
            parts, want = [], n
            while want > 0:
                part = self._f.read(min(want, self._CHUNK))
                if not part:
                    break
                parts.append(part)
                want -= len(part)
            data = b"".join(parts)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:] = data
        return len(data)

    def readline(self):
        line = self._f.readline(self._LINE)
        if self._left is not None:
            self._left -= len(line)
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated (or a text line over 1 MiB)")
        return line


class _Opcodes(dict):
    def __missing__(self, code):
        raise pickle.UnpicklingError(f"invalid load key {bytes([code])!r}")


def _name(obj):
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return obj.__name__
    return f"a {type(obj).__name__}"


class _GuardedUnpickler(pickle._Unpickler):
    """REDUCE calls only _CALLABLE (by identity) with a tuple; NEWOBJ makes only _NEWOBJ
    classes, without arguments; BUILD changes only a container stand-in (once, with a dict),
    an array from numpy's _reconstruct (once, checked) or a plain dtype (with numpy's own state
    for it, not applied); SETITEM(S) fill dicts, APPEND(S) lists, ADDITEMS sets, with atoms as
    keys and members; INST, OBJ and the copyreg extensions (no EDM pickle uses them) are
    refused; BYTEARRAY8 reads its bytes before allocating them."""

    dispatch = _Opcodes(pickle._Unpickler.dispatch)
    _CALLABLE, _NEWOBJ = (), ()

    def __init__(self, file):
        super().__init__(_Reader(file))
        self._unfilled = {}  # id -> array from _reconstruct awaiting its BUILD

    def find_class(self, module, name):
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of EDM's format")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in self._CALLABLE):
            raise pickle.UnpicklingError(f"a pickle may not call {_name(func)}")
        if type(args) is not tuple:
            raise pickle.UnpicklingError("REDUCE without an argument tuple")
        value = func(*args)
        if func is _array:
            self._unfilled[id(value)] = value
        self.stack[-1] = value
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new(self, cls, args, kwargs):
        if not any(cls is allowed for allowed in self._NEWOBJ):
            raise pickle.UnpicklingError(f"a pickle may not make {_name(cls)}")
        if type(args) is not tuple or args or type(kwargs) is not dict or kwargs:
            raise pickle.UnpicklingError(f"{cls.__name__} is made without arguments")
        self.append(cls.__new__(cls))

    def load_newobj(self):
        args = self.stack.pop()
        self._new(self.stack.pop(), args, {})
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self._new(self.stack.pop(), args, kwargs)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _Container) and "state" not in vars(inst):
            if type(state) is not dict:
                raise pickle.UnpicklingError(f"a {type(inst).__name__}'s state is not a dict")
            inst.state = state
        elif self._unfilled.get(id(inst)) is inst:
            del self._unfilled[id(inst)]
            _fill_array(inst, state)
        elif isinstance(inst, np.dtype) and _is_plain(inst):
            _check_dtype_state(inst, state)
        else:
            raise pickle.UnpicklingError(f"a pickle may not change {_name(inst)} (BUILD on "
                                         f"anything but a container, an array or a dtype)")
    dispatch[pickle.BUILD[0]] = load_build

    def _fill(self, target, items):
        if not isinstance(target, dict):
            raise pickle.UnpicklingError(f"SETITEM on {_name(target)}")
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")
        _atoms(items[::2], "a dict key")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._fill(self.stack[-1], [key, value])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._fill(self.stack[-1], items)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items, d = self.pop_mark(), {}
        self._fill(d, items)
        self.append(d)
    dispatch[pickle.DICT[0]] = load_dict

    def load_append(self):
        value = self.stack.pop()
        if type(self.stack[-1]) is not list:
            raise pickle.UnpicklingError(f"APPEND on {_name(self.stack[-1])}")
        self.stack[-1].append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not list:
            raise pickle.UnpicklingError(f"APPENDS on {_name(self.stack[-1])}")
        self.stack[-1].extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_additems(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not set:
            raise pickle.UnpicklingError(f"ADDITEMS on {_name(self.stack[-1])}")
        self.stack[-1].update(_atoms(items))
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        self.append(frozenset(_atoms(self.pop_mark())))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_bytearray8(self):
        n, = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def _refuse(self):
        raise pickle.UnpicklingError("opcodes INST, OBJ and EXT1/2/4 are not part of EDM's "
                                     "format")
    for _code in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_code[0]] = _refuse
    del _code


class _NetworkUnpickler(_GuardedUnpickler):
    _CALLABLE = (_ordered_dict, _set, _frozenset, _tensor, _parameter, _storage, _Persistent,
                 _dtype, _scalar, _array, _NDArray)
    _NEWOBJ = (_EasyDict, *_CONTAINERS.values())

    def find_class(self, module, name):
        found = _ALLOWED.get((_PY2_MODULES.get(module, module), name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


class _StorageUnpickler(_GuardedUnpickler):
    """The small pickles of a legacy storage: data, storage types (as torch dtypes) and one
    persistent id; nothing is called."""

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, number of elements[, view metadata None])
        if not (type(pid) is tuple and len(pid) in (5, 6) and type(pid[0]) is str and
                pid[0] == "storage" and isinstance(pid[1], torch.dtype) and
                type(pid[2]) is str and type(pid[3]) is str and type(pid[4]) is int and
                pid[4] >= 0 and (len(pid) == 5 or pid[5] is None)):
            raise pickle.UnpicklingError("a persistent id other than one legacy storage's")
        return _StorageRef(pid[1], pid[2], pid[4])


def _one_line(error, limit=300):
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."
