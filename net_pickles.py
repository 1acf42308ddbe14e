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
StabilityVAEEncoder, whose latent scale and bias are kept under "state": latents.py) and
`loss_fn` (EDM2Loss) as the plain dicts above; `dataset_kwargs` a dict.

A hostile file gets a one-line RealUIDError, never a crash, a hang or an allocation its bytes do
not pay for: every opcode that calls, builds, hashes or fills something is checked
(_GuardedUnpickler), declared lengths are compared with the bytes the file holds before
anything is allocated (_Reader, _storage), plain data is copied within a budget (_Converter),
and a network is first laid out without memory (_LayoutPass: its shapes, its layers and what
building it would allocate, each compared with the file's tensors) before it is built for
real; weights holding NaN or inf are refused.
"""
import contextlib
import inspect
import itertools
import operator

import torch
from torch.overrides import TorchFunctionMode

import edm
import edm2
from common import RealUIDError
from safe_unpickler import _Container, _NetworkUnpickler, _one_line, _Persistent, _Refused

# The networks a pickle may hold, keyed by the class name its persistent objects carry. EDM's
# and EDM2's class names are disjoint (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond,
# SongUNet, DhariwalUNet; Precond, UNet), so the name alone says which module to build.
_SHARED = set(edm.NETWORKS) & set(edm2.NETWORKS)
if _SHARED:  # a name in both would make a pickle ambiguous: key it some other way first
    raise ImportError(f"edm.py and edm2.py both define networks named {sorted(_SHARED)}")
NETWORKS = {**edm.NETWORKS, **edm2.NETWORKS}


# ---------------------------------------------------------------------------------------------
# Plain data and networks.

# Of other persistent objects only the arguments are kept, and the state that says what a
# network's inputs are: EDM2's latent encoder's scale and bias (latents.py).
_KEPT_STATE = {"StabilityVAEEncoder": ("vae_name", "scale", "bias")}
_MAX_ITEMS, _MAX_DEPTH = 100_000, 64  # EDM's and EDM2's pickles: a few hundred, depth < 10
_BOUNDS = {"iDDPMPrecond": {"M": (10_000, "its constructor loops over M noise levels; EDM's "
                                           "iDDPM networks have 1000")}}


class _Converter:
    """Stand-ins -> results: networks built (once per persistent object), other persistent
    objects and containers as dicts, dicts / lists / tuples copied. The copy counts what it
    visits: a few bytes of memo references can name a list of 2^60 elements."""

    def __init__(self, name):
        self.name, self.items, self.networks = name, 0, {}

    def plain(self, value, where, depth=0):
        self.items += 1
        if self.items > _MAX_ITEMS:
            raise RealUIDError(f"{self.name}: not an EDM network pickle (its data outside the "
                               f"tensors holds more than {_MAX_ITEMS} values)")
        if depth > _MAX_DEPTH:
            raise RealUIDError(f"{self.name}: not an EDM network pickle (its data is nested "
                               f"more than {_MAX_DEPTH} levels deep)")
        if isinstance(value, _Persistent):
            if value.class_name in NETWORKS:
                if id(value) not in self.networks:  # the node is kept alive by the result
                    self.networks[id(value)] = (value, _build(value, where, self, depth))
                return self.networks[id(value)][1]
            out = {"class_name": value.class_name,
                   "init_args": self.plain(_get(value.state, "_init_args", ()), where, depth + 1),
                   "init_kwargs": self.plain(_get(value.state, "_init_kwargs", {}), where,
                                             depth + 1)}
            kept = {k: self.plain(value.state[k], where, depth + 1)
                    for k in _KEPT_STATE.get(value.class_name, ())
                    if isinstance(value.state, dict) and k in value.state}
            return dict(out, state=kept) if kept else out
        if isinstance(value, _Container):
            return {"class_name": type(value).__name__}
        if isinstance(value, dict):
            return {k: self.plain(v, f"{where}[{k!r:.60}]", depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.plain(v, where, depth + 1) for v in value)
        return value


def _get(state, key, default):
    value = state.get(key)
    return default if value is None else value


def _file_network(node):
    """The layers (distinct module nodes below `node`) and stored tensor bytes (distinct
    storages) of a network in the file: what its arguments may declare."""
    seen, stack, layers, storages = {id(node)}, [node], 0, {}
    while stack:
        state = getattr(stack.pop(), "state", None)
        if not isinstance(state, dict):
            continue
        for kind in ("_parameters", "_buffers"):
            group = state.get(kind)
            for value in (group.values() if isinstance(group, dict) else ()):
                if isinstance(value, torch.Tensor):
                    s = value.untyped_storage()
                    storages[s.data_ptr(), s.nbytes()] = s.nbytes()
        children = state.get("_modules")
        for child in (children.values() if isinstance(children, dict) else ()):
            if isinstance(child, (_Persistent, _Container)) and id(child) not in seen:
                seen.add(id(child))
                layers += 1
                stack.append(child)
    return layers, sum(storages.values())


def _collect(node, module, prefix, tensors, where, network):
    """Flatten the file's tree into {dotted name: tensor}, walking the network `module` (so
    each of its layers is visited once): class names must match, and every layer in the file
    must be one of the network's."""
    found = node.class_name if isinstance(node, _Persistent) else type(node).__name__
    if not isinstance(node, (_Persistent, _Container)) or type(module).__name__ != found:
        raise RealUIDError(f"{where}: {prefix.rstrip('.') or 'network'} is a {found} in the "
                           f"pickle, not a {type(module).__name__}")
    state = getattr(node, "state", {})  # {} for a container that had no BUILD
    groups = {kind: _get(state, kind, {}) for kind in ("_parameters", "_buffers", "_modules")}
    for kind, group in groups.items():
        if not isinstance(group, dict):
            raise RealUIDError(f"{where}: {prefix}{kind} is a {type(group).__name__} in the "
                               f"pickle, not a dict")
    for kind in ("_parameters", "_buffers"):
        for name, value in groups[kind].items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise RealUIDError(f"{where}: {prefix}{name} is a {type(value).__name__} in the "
                                   f"pickle, not a tensor")
            tensors[f"{prefix}{name}"] = value
    for name, child in groups["_modules"].items():
        if child is None:
            continue
        sub = module._modules.get(name)
        if sub is None:
            raise RealUIDError(f"{where}: the tensors do not fit a {network} with the pickle's "
                               f"arguments (the pickle's layer {prefix}{name} is not in it)")
        _collect(child, sub, f"{prefix}{name}.", tensors, where, network)


class _TooBig(Exception):
    """The layout pass stopped: what the arguments declare exceeds what the file holds."""


def _constructors():
    try:
        from torch.utils._device import _device_constructors
        return frozenset(_device_constructors())
    except Exception:  # an older or newer torch: the factories network constructors use
        return frozenset((torch.empty, torch.zeros, torch.ones, torch.full, torch.rand,
                          torch.randn, torch.randint, torch.arange, torch.linspace,
                          torch.tensor, torch.as_tensor, torch.eye))


_CONSTRUCTORS = _constructors()
_SIZED = frozenset((torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn))
_FROM_DATA = frozenset((torch.tensor, torch.as_tensor, getattr(torch, "asarray", torch.tensor)))
_ELEMENTWISE = frozenset(getattr(torch.Tensor, name) for name in (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__neg__", "__pow__", "add", "sub", "mul", "div", "neg", "pow")) | {
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow}
_DIVISIONS = frozenset((torch.Tensor.__truediv__, torch.Tensor.__rtruediv__, torch.Tensor.div,
                        torch.div))


def _meta_elementwise(func, args, kwargs):
    """The meta result of arithmetic on meta tensors (and numbers or 0-d tensors) from its
    shapes and dtypes alone, or None: torch's meta kernels would do it too, but their first use
    costs seconds of imports, which every process reading a pickle would pay."""
    if func not in _ELEMENTWISE or kwargs or not 1 <= len(args) <= 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not any(t.is_meta for t in tensors) or not all(t.is_meta or t.dim() == 0
                                                       for t in tensors) or \
            not all(isinstance(a, torch.Tensor) or type(a) in (int, float, bool) for a in args):
        return None
    shape = []  # broadcast by hand: torch.broadcast_shapes's first call also costs a second
    for sizes in itertools.zip_longest(*(reversed(t.shape) for t in tensors), fillvalue=1):
        other = {n for n in sizes if n != 1}
        if len(other) > 1:
            return None
        shape.insert(0, other.pop() if other else 1)
    dtype = torch.result_type(*args) if len(args) == 2 else args[0].dtype
    if func in _DIVISIONS and not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    return torch.empty(shape, dtype=dtype, device="meta")


_TO_NUMBER = {torch.Tensor.item: 1.0, torch.Tensor.__float__: 1.0, torch.Tensor.__int__: 1,
              torch.Tensor.__index__: 1, torch.Tensor.__bool__: True}


class _LayoutPass(TorchFunctionMode):
    """A network's constructor run without its memory: a tensor factory asked for more than
    _BIG elements (a weight; 256 for a tensor built from the file's data) makes a meta tensor
    (shape only; no memory, no initialisation), smaller ones are real so that a constructor's
    own arithmetic (iDDPM's u, VP's sigma range) runs as usual. `asked` totals the bytes of
    every tensor the constructor makes (meta ones included): what building it for real would
    allocate, for the caller to compare with its budget; the real ones alone over `budget` stop
    the pass. Meta tensors turned into numbers give a placeholder (the layout does not depend
    on them)."""

    _BIG, _BIG_DATA = 1 << 14, 256

    def __init__(self, budget):
        super().__init__()
        self.budget, self.asked, self.real = budget, 0, 0

    def _count(self, out, asked=True):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                self.asked += size if asked else 0
                self.real += 0 if t.is_meta else size
        if self.real > self.budget:  # what this pass itself allocated (meta tensors are free)
            raise _TooBig(f"building it would allocate more than {self.budget >> 20} MiB")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and not (func in _FROM_DATA and len(args) == 1 and
                                          type(args[0]) in (int, float, bool)):
            if func in _SIZED:  # torch.randn's meta version also costs a second on first use
                probe = torch.empty(*args, device="meta", **{
                    k: v for k, v in kwargs.items()
                    if k in ("size", "dtype", "layout", "requires_grad")})
            else:
                probe = func(*args, **{**kwargs, "device": "meta"})
            self._count(probe)
            if isinstance(probe, torch.Tensor) and probe.numel() > (
                    self._BIG_DATA if func in _FROM_DATA else self._BIG):
                return probe
            out = func(*args, **kwargs)
            self._count(out, asked=False)  # asked for already, as the probe
            return out
        if func in _TO_NUMBER and args and isinstance(args[0], torch.Tensor) and \
                args[0].is_meta:
            return _TO_NUMBER[func]
        out = _meta_elementwise(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        self._count(out)
        return out


def _budget(stored):
    """What building a network may allocate, for `stored` bytes of its tensors in the file: 32
    times as much (a real build asks about 5 times float32 bytes: weights made through
    temporaries; EDM2's float16 files 2 times) plus 256 MiB."""
    return 32 * stored + (256 << 20)


def _layout(cls, args, kwargs, layers, stored):
    """cls(*args, **kwargs) in a _LayoutPass: the module (meta weights) and the bytes it asked
    for. Stops (_TooBig) once it registers more layers than the file holds, or allocates more
    than _budget(stored) for real."""
    registered = 0

    def count(module, name, submodule):
        nonlocal registered
        registered += 1
        if registered > layers + 8:
            raise _TooBig(f"its arguments declare more than the {layers} layers the pickle holds")

    hook = torch.nn.modules.module.register_module_module_registration_hook(count)
    try:
        with torch.random.fork_rng(devices=[]), _LayoutPass(_budget(stored)) as layout:
            net = cls(*args, **kwargs)
    finally:
        hook.remove()
    return net, layout.asked


def _check_bounds(class_name, bound, where):
    """Arguments whose size is a loop in the constructor, not a tensor (iDDPM's M)."""
    bound.apply_defaults()
    for arg, (most, what) in _BOUNDS.get(class_name, {}).items():
        value = bound.arguments.get(arg)
        try:
            n = operator.index(value)
        except TypeError:
            raise RealUIDError(f"{where}: {class_name}'s {arg} is {str(value)[:40]!r}, not an "
                               f"integer") from None
        if not 1 <= n <= most:
            raise RealUIDError(f"{where}: {class_name}'s {arg} is {n}, not between 1 and {most} "
                               f"({what})")


def _finite(t):
    """No NaN or inf in t: its sum is finite (one pass; NaN and inf reach the sum), or, should
    finite values overflow it, every element is."""
    if not t.is_floating_point():
        return True
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _build(node, where, converter, depth):
    """One of this file's networks, from a persistent object's arguments and tensors: laid out
    without memory first, compared with the file's tensors, then built and loaded strictly."""
    name, cls = node.class_name, NETWORKS[node.class_name]
    args = converter.plain(_get(node.state, "_init_args", ()), where, depth + 1)
    kwargs = converter.plain(_get(node.state, "_init_kwargs", {}), where, depth + 1)
    try:
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise TypeError("_init_args is not a list or _init_kwargs not a dict")
        args = tuple(args)
        bound = inspect.signature(cls).bind(*args, **kwargs)
    except Exception as e:
        raise RealUIDError(f"{where}: {name} cannot be built from the pickle's arguments "
                           f"({_one_line(e)})") from None
    _check_bounds(name, bound, where)
    layers, stored = _file_network(node)
    try:
        layout, asked = _layout(cls, args, kwargs, layers, stored)
    except _TooBig as e:
        raise RealUIDError(f"{where}: the tensors do not fit a {name} with the pickle's "
                           f"arguments ({e})") from None
    except RealUIDError as e:
        raise RealUIDError(f"{where}: {name}: {e}") from None
    except Exception as e:
        raise RealUIDError(f"{where}: {name} cannot be built from the pickle's arguments "
                           f"({_one_line(e)})") from None
    tensors = {}
    _collect(node, layout, "", tensors, where, name)
    expected = {k: tuple(v.shape) for k, v in layout.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in tensors if k in expected and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
                  if unexpected else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, "
                  f"expected {expected[wrong[0]]}")
        raise RealUIDError(f"{where}: the tensors do not fit a {name} with the pickle's "
                           f"arguments ({detail[:300]})")
    del layout
    if asked > _budget(stored):  # temporaries the constructor would make and drop
        raise RealUIDError(f"{where}: the tensors do not fit a {name} with the pickle's "
                           f"arguments (building it would allocate more than "
                           f"{_budget(stored) >> 20} MiB, for {stored >> 10} KiB of tensors in "
                           f"the pickle)")
    # tensors that repeat their storage's bytes (stride 0, shared storages) would let a small
    # file declare a network of any size
    used = sum(t.numel() * t.element_size() for t in tensors.values())
    if used > stored:
        raise RealUIDError(f"{where}: the tensors of its {name} hold {used} bytes but their "
                           f"storages only {stored}: not an EDM network pickle")
    bad = [k for k, t in tensors.items() if not _finite(t)]
    if bad:
        raise RealUIDError(f"{where}: the {name}'s tensor {bad[0]} holds NaN/inf values"
                           f"{f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''}: "
                           f"refused, as for this repository's own checkpoints; use another "
                           f"copy of the network")
    try:
        net = cls(*args, **kwargs)  # allocates what the layout pass measured: `asked` bytes
        net.load_state_dict(tensors, strict=True)
    except RealUIDError as e:
        raise RealUIDError(f"{where}: {name}: {e}") from None
    except Exception as e:
        raise RealUIDError(f"{where}: {name} cannot be built from the pickle's arguments "
                           f"({' '.join(str(e).split())[:300]})") from None
    net.init_args, net.init_kwargs = list(args), kwargs  # what rebuilds it (teachers.py)
    return net.eval().requires_grad_(False)


def load_edm_pickle(path_or_fileobj):
    """The top-level dict of an EDM pickle, with each network rebuilt as this file's module
    (eval mode, float32, requires_grad False) and other persistent objects as plain dicts.
    Nothing in the file is executed: any global outside a network's data is refused."""
    is_file = hasattr(path_or_fileobj, "read")
    name = str(getattr(path_or_fileobj, "name", "pickle") if is_file else path_or_fileobj)
    try:
        with (contextlib.nullcontext(path_or_fileobj) if is_file
              else open(path_or_fileobj, "rb")) as f:  # a caller's file object stays open
            raw = _NetworkUnpickler(f).load()
    except OSError as e:
        raise RealUIDError(f"{name}: cannot read ({e.strerror or e})") from None
    except _Refused as e:
        raise RealUIDError(f"{name}: refused global {e.args[0][:200]}: not an EDM network pickle "
                           f"(only tensors, EDM's and EDM2's networks and plain data are "
                           f"read)") from None
    except Exception as e:
        raise RealUIDError(f"{name}: not an EDM network pickle ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise RealUIDError(f"{name}: not an EDM network pickle (its top level is a "
                           f"{type(raw).__name__}; EDM writes a dict such as {{'ema': network}})")
    try:
        return _Converter(name).plain(raw, name)
    except RealUIDError:
        raise
    except Exception as e:  # stand-ins a hostile file assembled oddly (e.g. without their state)
        raise RealUIDError(f"{name}: not an EDM network pickle ({_one_line(e)})") from None


def load_edm_network(path, key="ema"):
    """The network stored under `key` (EDM's and EDM2's snapshots and public files: 'ema'), in
    eval mode, float32, with requires_grad False: an edm.py network, or an edm2.Precond for an
    EDM2 pickle (whose float16 weights come back as float32 of the same values)."""
    return network_in(load_edm_pickle(path), path, key)


def network_in(data, path, key="ema"):
    """load_edm_network for a pickle already read by load_edm_pickle."""
    if key not in data:
        held = ", ".join(map(repr, data)) or "nothing"
        raise RealUIDError(f"{path}: no {key!r} in this pickle; it holds {held[:300]}")
    net = data[key]
    if not isinstance(net, torch.nn.Module):
        kind = net.get("class_name", "dict") if isinstance(net, dict) else type(net).__name__
        raise RealUIDError(f"{path}: {key!r} holds a {str(kind)[:80]}, not one of EDM's networks "
                           f"({', '.join(NETWORKS)})")
    return net.float().eval().requires_grad_(False)
