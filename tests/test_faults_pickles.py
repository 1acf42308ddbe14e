"""net_pickles.py against hostile EDM / EDM2 pickles: one line of RealUIDError, or a clean load;
never a crash, a hang, an allocation the file's bytes do not pay for, or NaN weights.

Whatever could crash or exhaust the process (a numpy dtype's BUILD that turns file bytes into
object pointers; memo references naming 2^60 list elements; a declared width, depth, M or
storage size far beyond the file's tensors; a few hundred fuzzed pickles) is loaded in ONE
subprocess, under RLIMIT_AS (3 GiB above what importing torch takes) and a per-case alarm, so
that a signal, a traceback, a MemoryError or a hang shows up as that case's outcome.
"""
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

import edm
import edm2
import net_pickles
import safe_unpickler
from common import RealUIDError
from test_edm import write_edm_pickle
from test_edm2 import write_edm2_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small EDMPrecond (DDPM++ layout, attention, one down / up level) and a small EDM2 Precond.
EDM_SMALL = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet",
                 model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                 embedding_type="positional", encoder_type="standard", decoder_type="standard",
                 channel_mult_noise=1, resample_filter=[1, 1])
EDM_TINY = dict(EDM_SMALL, model_channels=4, channel_mult=[1])  # the fuzzing base: fast to load
EDM2_SMALL = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)


def edm_pickle(path, declared=None, net_kwargs=EDM_SMALL, precond=edm.EDMPrecond, tamper=None):
    """A pickle in EDM's format of precond(**net_kwargs), its arguments recorded as `declared`
    (default: the true ones); tamper(net) edits the network before it is written."""
    torch.manual_seed(0)
    net = precond(**net_kwargs).eval()
    if tamper is not None:
        tamper(net)
    write_edm_pickle(path, net, net_kwargs if declared is None else declared, snapshot=False)
    return path


def one_line_error(source):
    with pytest.raises(RealUIDError) as caught:
        net_pickles.load_edm_pickle(source)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


class Reduce:
    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else \
            (self.function, self.args, self.state)


# ---------------------------------------------------------------------------------------------
# Pickles written opcode by opcode.

def _unicode(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def memo_dag(levels, kind):
    """{'ema': {x_K: None}} for kind 'key' (x_k = (x_{k-1}, x_{k-1}): hashing x_K takes 2^K
    steps), {'ema': x_K} for kind 'list' (x_k = [x_{k-1}, x_{k-1}]: 2^K elements copied).
    18 bytes a level."""
    out = b"\x80\x04}" + _unicode("ema")
    out += b"}" if kind == "key" else b""
    out += (b")" if kind == "key" else b"]") + b"r\x00\x00\x00\x000"  # x_0, LONG_BINPUT 0, POP
    for k in range(1, levels + 1):
        get = b"j" + struct.pack("<I", k - 1)  # LONG_BINGET
        out += (get + get + b"\x86" if kind == "key" else b"(" + get + get + b"l")
        out += b"r" + struct.pack("<I", k) + b"0"
    out += b"j" + struct.pack("<I", levels)
    out += b"Nss." if kind == "key" else b"s."
    return out


def rebinding_pickle(state):
    """BUILD with `state` on the global torch._utils._rebuild_tensor_v2, then {'ema': 1}."""
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + pickle.dumps(state, protocol=2)[2:-1]
            + b"b0}" + _unicode("ema") + b"K\x01s.")


_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar(dtype, bytes)


def dtype_build_attack(flags=0):
    """numpy.dtype('V8') and a BUILD that makes it a structured dtype whose one field is an
    object pointer (flags 0: numpy is not told it holds one); scalar() then copies 8 bytes of
    the file into that pointer; the first use (repr) dereferences 0x4141414141414141."""
    state = (3, "|", None, ("f0",), {"f0": (np.dtype("O"), 0)}, 8, 1, flags)
    evil = Reduce(np.dtype, "V8", False, True, state=state)
    return pickle.dumps({"ema": Reduce(_SCALAR, evil, b"\x41" * 8)}, protocol=4)


def legacy_storage(values, declared=None, header=None, little_endian=True, extra=b""):
    """torch.save(storage, _use_new_zipfile_serialization=False)'s bytes (what EDM's pickles
    hold for each storage), written here: the element count the persistent id declares and
    the 8-byte count before the data can be set apart from the data's."""
    values = torch.as_tensor(values, dtype=torch.float32)
    n, f, marker = values.numel(), io.BytesIO(), object()
    sys_info = dict(protocol_version=1001, little_endian=little_endian,
                    type_sizes=dict(short=2, int=4, long=4))
    for obj in (0x1950a86a20f9469cfc6c, 1001, sys_info):
        pickle.dump(obj, f, protocol=2)

    class Storage(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is marker:
                return ("storage", torch.FloatStorage, "0", "cpu",
                        n if declared is None else declared, None)
            return None
    Storage(f, protocol=2).dump(marker)
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", n if header is None else header))
    f.write(values.numpy().tobytes() + extra)
    return f.getvalue()


def storage_pickle(blob):
    return pickle.dumps({"ema": Reduce(torch.storage._load_from_bytes, blob)}, protocol=4)


# ---------------------------------------------------------------------------------------------
# One subprocess: the fuzzed pickles and every case that could crash or exhaust the process.

CHILD = r'''
import io, json, pickletools, random, resource, signal, sys, time, traceback

import net_pickles
import safe_unpickler
from common import RealUIDError

class Timeout(BaseException):  # not an Exception: the reader's handlers cannot swallow it
    pass

def alarm(signum, frame):
    raise Timeout()

signal.signal(signal.SIGALRM, alarm)
manifest = json.load(open(sys.argv[1]))
try:  # the address space after importing torch, plus the headroom (Linux)
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
              if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + manifest["headroom"],) * 2)
except (OSError, StopIteration, ValueError):
    pass

def attempt(name, blob, seconds):
    start = time.time()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            repr(net_pickles.load_edm_pickle(io.BytesIO(blob)))  # and touch what came back
            outcome, message = "ok", ""
        except RealUIDError as e:
            message = str(e)
            outcome = "other" if "\n" in message or "Traceback" in message else "error"
        except Timeout:
            outcome, message = "timeout", ""
        except BaseException:
            outcome, message = "other", traceback.format_exc()[-1500:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps(dict(name=name, outcome=outcome, message=message[:1500],
                          seconds=round(time.time() - start, 3))), flush=True)

def unframed(data):
    """The same pickle without its FRAME opcodes (optional in protocol 4): mutations of it
    reach further than ones that break a frame's length."""
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    return b"".join(data[pos:end] for (op, _, pos), end in zip(ops, ends) if op.name != "FRAME")

def mutants(base, count, seed):
    """Opcodes swapped, bits flipped, integers and declared lengths inflated, BUILD states
    replaced, storage headers flipped, pickles cut short, spans duplicated: half of them of
    EDM's framed pickle, half of the same unframed."""
    yield from mutate(base, count // 2, seed, "framed")
    yield from mutate(unframed(base), count - count // 2, seed + 1, "unframed")

def mutate(base, count, seed, label):
    rng = random.Random(seed)
    ops = [(pos, op, arg) for op, arg, pos in pickletools.genops(base)]
    codes = sorted({ord(op.code) for op in pickletools.opcodes})
    widths = {"BININT1": 1, "BININT2": 2, "BININT": 4, "BINPUT": 1, "BINGET": 1,
              "LONG_BINPUT": 4, "LONG_BINGET": 4, "SHORT_BINBYTES": 1, "SHORT_BINUNICODE": 1,
              "BINBYTES": 4, "BINUNICODE": 4, "BINBYTES8": 8, "BINUNICODE8": 8, "FRAME": 8}
    sized = [(pos, widths[op.name]) for pos, op, arg in ops if op.name in widths]
    builds = [pos for pos, op, arg in ops if op.name == "BUILD"]
    storages = [(pos, arg) for pos, op, arg in ops if op.name in ("BINBYTES", "BINBYTES8")]
    kinds = ("swap", "flip", "inflate", "state", "storage", "cut", "dup")
    for i in range(count):
        kind, b = kinds[i % len(kinds)], bytearray(base)
        if kind == "swap":
            b[rng.choice(ops)[0]] = rng.choice(codes)
        elif kind == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == "inflate":
            pos, width = rng.choice(sized)
            old = int.from_bytes(b[pos + 1:pos + 1 + width], "little")
            new = rng.choice([256 ** width - 1, 256 ** width // 2 - 1, min(old * 1000 + 7,
                                                                           256 ** width - 1)])
            b[pos + 1:pos + 1 + width] = new.to_bytes(width, "little")
        elif kind == "state":
            pos = rng.choice(builds)
            b[pos:pos] = rng.choice([b"0N", b"0]", b"0}", b"0)", b"0\x88", b"0K\x07", b"0N\x85"])
        elif kind == "storage":
            pos, arg = rng.choice(storages)
            start = pos + (5 if base[pos] == ord("B") else 9)
            for _ in range(rng.randint(1, 3)):
                b[start + rng.randrange(min(len(arg), 300))] ^= 1 << rng.randrange(8)
        elif kind == "cut":
            del b[rng.randrange(1, len(b)):]
        else:
            start = rng.randrange(len(b))
            span = b[start:start + rng.randint(1, 40)]
            at = rng.randrange(len(b))
            b[at:at] = span
        yield f"fuzz {label} {i} {kind}", bytes(b)

for case in manifest["cases"]:
    attempt(case["name"], open(case["path"], "rb").read(), case["seconds"])
fuzz = manifest["fuzz"]
base = open(fuzz["base"], "rb").read()
attempt("fuzz base unframed", unframed(base), fuzz["seconds"])
for name, blob in mutants(base, fuzz["count"], fuzz["seed"]):
    attempt(name, blob, fuzz["seconds"])
for case in manifest["last"]:  # these would kill the process on a reader without the fix
    attempt(case["name"], open(case["path"], "rb").read(), case["seconds"])
'''
FUZZ_COUNT = 400


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{case name: {outcome, message, seconds}} from the subprocess, and its return code."""
    d = tmp_path_factory.mktemp("hostile")
    cases = {
        # 4a: memo references
        "list dag": memo_dag(60, "list"),
        "key dag": memo_dag(60, "key"),
        # 4d: a legacy storage declaring 10^10 floats (40 GB) with 4 floats of bytes
        "storage declared": storage_pickle(legacy_storage([1, 2, 3, 4], declared=10 ** 10)),
    }
    paths = {}
    for name, blob in cases.items():
        paths[name] = d / f"{name.replace(' ', '_')}.pkl"
        paths[name].write_bytes(blob)
    # 4b: widths, depth and temporaries declared far beyond the file's tensors
    paths["width"] = edm_pickle(d / "width.pkl", dict(EDM_SMALL, model_channels=1 << 16))
    paths["width 2048"] = edm_pickle(d / "width2048.pkl", dict(EDM_SMALL, model_channels=2048))
    paths["depth"] = edm_pickle(d / "depth.pkl", dict(EDM_SMALL, num_blocks=100_000))
    flat = dict(EDM_SMALL, channel_mult=[1])  # no resampling layers: the filter is not a buffer
    paths["filter"] = edm_pickle(d / "filter.pkl", dict(flat, resample_filter=[1] * 20_000),
                                 net_kwargs=flat)
    # 4c: iDDPM's loop of M steps (and a u of M + 1 floats) before any tensor is compared
    iddpm = dict(EDM_SMALL, model_type="DhariwalUNet", model_channels=64, attn_resolutions=[])
    for key in ("embedding_type", "encoder_type", "decoder_type", "channel_mult_noise",
                "resample_filter"):
        iddpm.pop(key)
    paths["iddpm M"] = edm_pickle(d / "iddpm.pkl", dict(iddpm, M=10 ** 8), net_kwargs=iddpm,
                                  precond=edm.iDDPMPrecond)
    last = {"dtype build": dtype_build_attack()}
    for name, blob in last.items():
        paths[name] = d / f"{name.replace(' ', '_')}.pkl"
        paths[name].write_bytes(blob)
    base = edm_pickle(d / "base.pkl", net_kwargs=EDM_TINY)
    manifest = dict(headroom=3 << 30,
                    cases=[dict(name=n, path=str(p), seconds=30) for n, p in paths.items()
                           if n not in last],
                    last=[dict(name=n, path=str(paths[n]), seconds=30) for n in last],
                    fuzz=dict(base=str(base), count=FUZZ_COUNT, seed=20240601, seconds=10))
    (d / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(d / "manifest.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["name"]] = row
    return proc.returncode, results, proc.stderr[-3000:]


def refused(hostile, name, *fragments):
    rc, results, stderr = hostile
    assert name in results, f"no result for {name!r}: return code {rc}, stderr {stderr}"
    row = results[name]
    assert row["outcome"] == "error", row
    for fragment in fragments:
        assert fragment in row["message"], row
    return row["message"]


# ---------------------------------------------------------------------------------------------
# 3. BUILD and numpy: no file may corrupt memory or rebind the reader's functions.

def test_fuzzed_edm_pickles_fail_in_one_line_or_load(hostile):
    rc, results, stderr = hostile
    assert rc == 0, f"the subprocess ended with {rc} (a negative value is a signal): {stderr}"
    assert results["fuzz base unframed"]["outcome"] == "ok"  # the unmutated bases load
    fuzz = [row for name, row in results.items() if name.startswith("fuzz ") and
            name != "fuzz base unframed"]
    assert len(fuzz) == FUZZ_COUNT
    bad = [row for row in fuzz if row["outcome"] not in ("ok", "error")]
    assert not bad, bad[:3]
    outcomes = [row["outcome"] for row in fuzz]
    assert outcomes.count("error") > FUZZ_COUNT // 4 and outcomes.count("ok") > 10


def test_numpy_dtype_build_cannot_make_object_pointers(hostile):
    """Without the fix this pickle (only allowed globals) ends the process with SIGSEGV."""
    rc, results, stderr = hostile
    assert rc == 0, f"the subprocess ended with {rc} (a negative value is a signal): {stderr}"
    refused(hostile, "dtype build", "numpy dtype 'V8'")


def test_object_and_structured_numpy_scalars_are_refused():
    obj = Reduce(_SCALAR, Reduce(np.dtype, "O8", False, True), b"\x41" * 8)
    assert "numpy dtype 'O8'" in one_line_error(io.BytesIO(pickle.dumps({"ema": obj})))
    structured = pickle.dumps({"ema": np.zeros(1, dtype=[("a", "f4"), ("b", "i4")])[0]})
    assert "numpy dtype 'V8'" in one_line_error(io.BytesIO(structured))
    # a plain dtype whose BUILD is not numpy's state for it (here: big-endian)
    swapped = pickle.dumps({"ema": np.dtype(">f8")})
    assert "may not change numpy's dtype float64" in one_line_error(io.BytesIO(swapped))
    # a scalar whose bytes are not its dtype's size
    short = Reduce(_SCALAR, np.dtype("f8"), b"\x00" * 4)
    assert "needs 8 bytes" in one_line_error(io.BytesIO(pickle.dumps({"ema": short})))
    # plain numpy scalars and arrays still load, as data
    data = net_pickles.load_edm_pickle(io.BytesIO(pickle.dumps(
        {"s": np.sqrt(np.float64(0.5)), "b": np.bool_(True), "a": np.float32([1, 2])})))
    assert data["s"] == math.sqrt(0.5) and data["b"] and data["a"].tolist() == [1.0, 2.0]


def test_build_cannot_rebind_the_tensor_rebuilder():
    """BUILD on a global is setattr on it: the tensor rebuilder's defaults and names would
    stay changed for the rest of the process."""
    rebuild = safe_unpickler._ALLOWED[("torch._utils", "_rebuild_tensor_v2")]
    before = (rebuild.__defaults__, rebuild.__name__, dict(rebuild.__dict__))
    try:
        for state in ((None, {"__defaults__": (True, None, None), "__name__": "hijacked"}),
                      {"hijacked": True}):
            message = one_line_error(io.BytesIO(rebinding_pickle(state)))
            assert "may not change" in message
            assert (rebuild.__defaults__, rebuild.__name__, dict(rebuild.__dict__)) == before
    finally:
        rebuild.__defaults__, rebuild.__name__ = before[0], before[1]
        rebuild.__dict__.clear()
        rebuild.__dict__.update(before[2])


def test_build_only_on_the_readers_containers_and_arrays():
    tensor = Reduce(torch._utils._rebuild_tensor_v2,
                    Reduce(torch.storage._load_from_bytes, legacy_storage([1.0])), 0, (1,), (1,),
                    False, OrderedDict(), state=(None, {"requires_grad": True}))
    assert "may not change a Tensor" in one_line_error(io.BytesIO(pickle.dumps({"ema": tensor})))
    ordered = Reduce(OrderedDict, state={"attribute": 1})
    assert "may not change a OrderedDict" in one_line_error(
        io.BytesIO(pickle.dumps({"ema": ordered})))


# ---------------------------------------------------------------------------------------------
# 4. Small files, bounded memory and time.

def test_memo_references_are_not_expanded(hostile):
    """60 levels of [x, x] (2^60 elements as a tree) and a dict key of 60 levels of (x, x)
    (2^60 steps to hash): refused, within the subprocess's memory limit."""
    refused(hostile, "list dag", "more than 100000 values")
    refused(hostile, "key dag", "a dict key is a tuple")


def test_declared_width_is_compared_before_it_is_allocated(hostile):
    """model_channels 65536 (weights of 10^11 floats) and 2048 (gigabytes): the shapes are
    compared on the meta device, so the error is the mismatch, not an allocation failure."""
    for name in ("width", "width 2048"):
        refused(hostile, name, "do not fit a EDMPrecond", "has shape")


def test_declared_depth_and_temporaries_are_bounded(hostile):
    """num_blocks 10^5 (the file holds 1): stopped once the layout has more layers than the
    file; a resampling filter of 20000 taps that is no buffer (each Conv2d would compute a 1.6 GB
    outer product and drop it): stopped by what building would allocate."""
    refused(hostile, "depth", "do not fit a EDMPrecond", "layers the pickle holds")
    refused(hostile, "filter", "would allocate more than")


def test_network_is_laid_out_on_meta_before_it_is_built(tmp_path, monkeypatch):
    wide = edm_pickle(tmp_path / "wide.pkl", dict(EDM_SMALL, model_channels=64))
    good = edm_pickle(tmp_path / "ok.pkl")
    made = []

    class Spy(edm.EDMPrecond):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append({p.device.type for p in self.parameters()})
    Spy.__name__ = Spy.__qualname__ = "EDMPrecond"
    monkeypatch.setitem(net_pickles.NETWORKS, "EDMPrecond", Spy)
    assert "do not fit" in one_line_error(wide)
    assert made == [{"cpu", "meta"}]  # the 64-wide weights on meta only; no real build
    made.clear()
    net = net_pickles.load_edm_pickle(good)["ema"]
    assert len(made) == 2 and {p.device.type for p in net.parameters()} == {"cpu"}


def test_repeated_storage_bytes_do_not_declare_a_network(tmp_path):
    """A weight stored as one float with stride 0 has the weight's shape: the file would pay
    for one float of a tensor of any size."""
    def expand(net):
        w = net.model.map_layer1.weight
        w.data = torch.ones(1).expand_as(w)
    path = edm_pickle(tmp_path / "expanded.pkl", tamper=expand)
    assert "but their storages only" in one_line_error(path)


def test_iddpm_m_is_bounded(tmp_path, hostile):
    """iDDPM's u is a Python loop of M steps in its constructor: M is read up to 10^4."""
    refused(hostile, "iddpm M", "iDDPMPrecond's M is 100000000")
    iddpm = dict(EDM_SMALL, model_type="SongUNet")
    path = tmp_path / "iddpm.pkl"
    for m, said in ((10_001, "M is 10001, not between 1 and 10000"), (0, "M is 0,"),
                    ("1000", "M is '1000', not an integer")):
        edm_pickle(path, dict(iddpm, M=m), net_kwargs=iddpm, precond=edm.iDDPMPrecond)
        assert f"iDDPMPrecond's {said}" in one_line_error(path)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_legacy_storage_sizes_are_checked_before_allocation(hostile):
    refused(hostile, "storage declared", "declares 10000000000 elements of torch.float32")
    for blob in (legacy_storage([1, 2, 3], declared=4), legacy_storage([1, 2, 3], header=4),
                 legacy_storage([1, 2, 3], extra=b"\0" * 4)):
        assert ") but holds" in one_line_error(io.BytesIO(storage_pickle(blob)))
    assert "not little-endian" in one_line_error(io.BytesIO(storage_pickle(
        legacy_storage([1, 2], little_endian=False))))
    # the format written here is torch's: torch reads it, and so does the reader
    blob = legacy_storage([1.5, -2.0, 3.25])
    theirs = torch.storage._load_from_bytes(blob)
    ours = net_pickles.load_edm_pickle(io.BytesIO(storage_pickle(blob)))["ema"]
    assert ours.dtype == theirs.dtype == torch.float32 and list(ours) == list(theirs)


def test_a_stream_is_read_in_bounded_pieces(tmp_path):
    """A declared length beyond what a non-seekable stream holds is read as far as the stream
    goes, not allocated first; a good pickle loads the same from a stream."""
    class Stream(io.RawIOBase):
        def __init__(self, data):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self.inner.readinto(buffer)
    huge = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"x" * 16  # BINBYTES8 of 2^60 bytes
    assert "truncated" in one_line_error(io.BufferedReader(Stream(huge)))
    data = edm_pickle(tmp_path / "ok.pkl").read_bytes()
    net = net_pickles.load_edm_pickle(io.BufferedReader(Stream(data)))["ema"]
    assert isinstance(net, edm.EDMPrecond)


# ---------------------------------------------------------------------------------------------
# 17. NaN / inf weights.

def test_nan_or_inf_weights_are_refused(tmp_path):
    def poison(net):
        with torch.no_grad():
            net.model.enc["8x8_block0"].conv0.weight[0, 0, 1, 1] = float("nan")
    path = edm_pickle(tmp_path / "nan.pkl", tamper=poison)
    message = one_line_error(path)
    assert "model.enc.8x8_block0.conv0.weight holds NaN/inf" in message

    def overflow(ema):  # float16, as EDM2 stores it
        with torch.no_grad():
            ema.unet.out_conv.weight[0, 0, 0, 0] = float("inf")
    torch.manual_seed(0)
    path = tmp_path / "inf.pkl"
    write_edm2_pickle(path, edm2.Precond(**EDM2_SMALL).eval(), EDM2_SMALL, tamper=overflow)
    assert "unet.out_conv.weight holds NaN/inf" in one_line_error(path)
