"""Fuzz the checkpoint reader and the spec's validation: any file ends in BadInputError or a model.

Thousands of mutated checkpoints (hypothesis, derandomized: the same cases on every run) go
through ``gfgp_cli.load`` (``read_checkpoint``, ``ConversionSpec.from_dict``, the replay, the
strict ``load_state_dict``): truncations and bit flips of the file's bytes, and deletions, type
changes, value changes and extra keys anywhere in the spec. Each must end in ``BadInputError``
(exit 2 on the command line) with a one-line message, or in a loaded model; never another
exception, and never code run: pickles whose ``__reduce__`` would create a marker file are
planted in the file, and the marker must never appear.

The model is the smallest torchvision CNN that converts quickly: mobilenet_v3_small at width
0.1, 16 px (a 177 KB file). The replay (~0.2 s) is memoized by its arguments (the name,
constructor arguments and conversion options a spec gives it): the checks that follow it
(same task, parts and sites; the strict state_dict load) run for every case. Available memory
reads as 256 MiB, so that a mutation naming a huge model is refused by the memory check
instead of being built. The default run (800 byte and 2000 spec mutations) takes about 40 s
on two CPU cores; ``-m slow`` runs 10000 and 25000 (about 7 minutes).
"""

from __future__ import annotations

import copy
import io
import pickle
import struct
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gfgp_cli import checkpoint, choices, conversion
from gfgp_cli.checkpoint import convert_to_file, load, read_checkpoint
from gfgp_cli.errors import BadInputError
from gfgp_cli.spec import attach_spec, spec_of

# A mutated num_classes of 0 builds an empty classifier, which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

MODEL = "mobilenet_v3_small"
KWARGS = {"num_classes": 10, "width_mult": 0.1, "reduced_tail": True}
SIZE = 16

# (max_examples of the byte fuzz, of the spec fuzz) per run
DEFAULT_RUN = (800, 2000)
SLOW_RUN = (10000, 25000)
RUNS = [pytest.param(DEFAULT_RUN, id="default"), pytest.param(SLOW_RUN, id="slow", marks=pytest.mark.slow)]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if any code runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The base checkpoint (path, bytes, raw dict), a scratch folder, and the marker file's path;
    one intra-op thread, 256 MiB of "available" memory and a memoized replay for the module."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "base.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conversion, "available_memory", lambda: 256 * 2**20)
        convert_to_file(MODEL, path, image_size=SIZE, seed=0, **KWARGS)  # the same bytes on every run
        replays: Dict[str, Any] = {}
        real_replay = checkpoint._replay

        def replay(model, options, kwargs):
            key = repr((model, sorted(options.items()), sorted(kwargs.items())))
            if key not in replays:
                try:
                    gm = real_replay(model, options, kwargs)
                    replays[key] = (gm, spec_of(gm))
                except BadInputError as e:
                    replays[key] = e
            if isinstance(replays[key], BadInputError):
                raise replays[key]
            # The same model again (every case loads the same weights into it), with the replay's
            # own spec: rebuild compares it with the checkpoint's, then attaches the checkpoint's.
            gm, replayed = replays[key]
            return attach_spec(gm, replayed)

        mp.setattr(checkpoint, "_replay", replay)
        yield {"path": path, "bytes": path.read_bytes(), "raw": torch.load(path, weights_only=True),
               "dir": folder, "marker": folder / "marker", "replays": replays}
    torch.set_num_threads(threads)


def _outcome(path: Path, marker: Path, state_dict: Any = None) -> str:
    """"loaded" or "refused"; any other exception fails the test (hypothesis shrinks the case).

    ``load(path)``; with ``state_dict``, the file holds only the spec: it is read (as eval
    does, ``read_checkpoint``), then loaded with these weights (``load(data)``)."""
    try:
        if state_dict is None:
            model = load(path)
        else:
            data = read_checkpoint(path)
            model = load({**data, "state_dict": state_dict})
    except BadInputError as e:
        outcome = "refused"
        assert "\n" not in str(e), str(e)
    else:
        assert isinstance(model, nn.Module)
        outcome = "loaded"
    assert not marker.exists(), "code ran while loading a checkpoint"
    return outcome


def test_the_payload_runs_code_when_unpickled_unsafely(work, tmp_path):
    """The marker check is live: plain pickle (what weights_only=True forbids) creates the file."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["extra entry", "spec", "spec kwargs", "site", "state_dict", "whole file"])
@pytest.mark.parametrize("form", ["zip", "legacy", "plain pickle"])
def test_a_pickle_that_would_run_code_is_refused(work, where, form):
    raw, marker = work["raw"], work["marker"]
    data = copy.deepcopy(raw)
    payload = Payload(marker)
    if where == "extra entry":
        data["extra"] = payload
    elif where == "spec":
        data["spec"]["placement"] = payload
    elif where == "spec kwargs":
        data["spec"]["source"]["kwargs"]["num_classes"] = payload
    elif where == "site":
        data["spec"]["sites"][0]["kernel"] = payload
    elif where == "state_dict":
        data["state_dict"]["classifier.3.bias"] = payload
    else:
        data = payload
    path = work["dir"] / "evil.pt"
    if form == "plain pickle":
        path.write_bytes(pickle.dumps(data, protocol=2))  # the protocol torch.save writes (4 is refused sooner)
    else:
        torch.save(data, path, _use_new_zipfile_serialization=form == "zip")
    with pytest.raises(BadInputError, match="refused to load .* loading it would run code"):
        load(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The file's bytes: truncations, bit flips, overwritten and repeated ranges, planted payloads
# ---------------------------------------------------------------------------------------------


def _pickle_range(data: bytes) -> Tuple[int, int]:
    """Where data.pkl (the structure of the checkpoint, stored uncompressed) lies in the file."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    # the local header: 30 bytes, then the name and the extra field (torch pads it for alignment)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.compress_size


@st.composite
def byte_mutations(draw, n: int, pickle_range: Tuple[int, int]) -> Tuple[Any, ...]:
    """A mutation of an n-byte file, as a short description (what hypothesis prints)."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip pickle", "overwrite", "repeat", "payload"]))
    if kind == "truncate":
        return (kind, draw(st.integers(0, n - 1)))
    if kind in ("flip", "flip pickle"):
        lo, hi = (0, n) if kind == "flip" else pickle_range
        return ("flip", tuple(draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(0, 7)), min_size=1, max_size=8))))
    if kind == "overwrite":
        return (kind, draw(st.integers(0, n - 1)), draw(st.binary(min_size=1, max_size=64)))
    if kind == "repeat":
        i = draw(st.integers(0, n - 1))
        return (kind, i, draw(st.integers(i, min(n, i + 4096))))
    return (kind, draw(st.booleans()))  # the whole file, or the start of its data.pkl


def _mutate_bytes(data: bytes, mutation: Tuple[Any, ...], pickle_range: Tuple[int, int], payload: bytes) -> bytes:
    kind, *args = mutation
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: args[0]])
    if kind == "flip":
        for i, bit in args[0]:
            buf[i] ^= 1 << bit
        return bytes(buf)
    if kind == "overwrite":
        i, chunk = args
        buf[i: i + len(chunk)] = chunk
        return bytes(buf[: len(data)])
    if kind == "repeat":
        i, j = args
        return bytes(buf[:j] + buf[i:j] + buf[j:])
    if args[0]:  # a pickle that would run code, in place of the file or of data.pkl's first bytes
        return payload
    lo, _ = pickle_range
    return bytes(buf[:lo] + payload + buf[lo + len(payload):])


@pytest.mark.parametrize("run", RUNS)
def test_mutated_bytes_end_in_bad_input_or_a_model(work, run):
    data, marker, path = work["bytes"], work["marker"], work["dir"] / "bytes.pt"
    payload = pickle.dumps({"format": "gfgp", "spec": Payload(marker)}, protocol=2)
    outcomes: Counter = Counter()

    pickle_range = _pickle_range(data)

    @settings(max_examples=run[0], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(byte_mutations(len(data), pickle_range))
    def check(mutation):
        path.write_bytes(_mutate_bytes(data, mutation, pickle_range, payload))
        outcomes[_outcome(path, marker)] += 1

    start = time.perf_counter()
    check()
    print(f"\nbyte fuzz: {sum(outcomes.values())} cases in {time.perf_counter() - start:.1f} s: {dict(outcomes)}")
    assert outcomes["refused"] and outcomes["loaded"]


# ---------------------------------------------------------------------------------------------
# The spec: deleted keys, type changes, value changes, extra keys, at every path
# ---------------------------------------------------------------------------------------------


def _paths(value: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    """Every path (keys and indices) into the plain spec, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, prefix + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += _paths(v, prefix + (i,))
    return found


def _edit(value: Any, path: Tuple[Any, ...], change) -> Any:
    """``value`` with the entry at ``path`` changed by ``change(old) -> new`` (``_DELETE`` removes it)."""
    if not path:
        return change(value)
    key, rest = path[0], path[1:]
    new = dict(value) if isinstance(value, dict) else list(value)
    result = _edit(new[key], rest, change)
    if result is _DELETE:
        del new[key]
    else:
        new[key] = result
    return type(value)(new) if isinstance(value, tuple) else new


_DELETE = object()

# Words a spec holds: every choice, model and site names, and strings that break things.
_WORDS = [*choices.POOLS, "custom", *choices.PLACEMENTS, *choices.ACTIVATIONS, *choices.COMPARISON_MODULES,
          *choices.TASKS, "conv", "max_pool", "avg_pool", "skip", "torchvision", "module", MODEL, "resnet18",
          "features.0.0", "features_0_0", "", " ", "\n", "x" * 300, "é", "pool", "weights", "0.29.1"]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([2**31, 2**63, -(2**63), 10**12, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(_WORDS), st.text(max_size=8), st.binary(max_size=4),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
                            st.dictionaries(st.sampled_from(_WORDS) | st.integers(0, 2), inner, max_size=3)),
    max_leaves=8,
) | st.sampled_from(["tensor", "zeros"]).map(lambda k: torch.tensor(3) if k == "tensor" else torch.zeros(2, 2))


def _near(old: Any) -> st.SearchStrategy:
    """A value of the same kind as ``old``: another int, word, flag, tuple of ints, ..."""
    if isinstance(old, bool):
        return st.just(not old)
    if isinstance(old, int):
        return st.integers(old - 3, old + 3) | st.sampled_from([0, 1, 2 * old, old * 1000, -old])
    if isinstance(old, float):
        return st.sampled_from([0.0, 1e-9, 0.05, 0.2, 1.0, -0.1, 1e6, float("nan"), float("inf")])
    if isinstance(old, str):
        return st.sampled_from(_WORDS) | st.text(max_size=6).map(lambda t: old + t)
    if old is None:
        return st.sampled_from(_WORDS) | st.integers(0, 4)
    if isinstance(old, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in old):
        return st.lists(st.integers(-1, 9), min_size=max(0, len(old) - 1), max_size=len(old) + 1).map(type(old))
    return _values


def _retype(old: Any) -> Any:
    """The same value as another type (list <-> tuple, int -> str/float, str -> bytes, ...)."""
    if isinstance(old, bool):
        return int(old)
    if isinstance(old, int):
        return str(old)
    if isinstance(old, float):
        return str(old)
    if isinstance(old, str):
        return old.encode()
    if isinstance(old, tuple):
        return list(old)
    if isinstance(old, list):
        return tuple(old)
    if isinstance(old, dict):
        return list(old.items())
    return 0


# The base spec and the marker file (set by the test: strategy arguments are printed on failure).
_BASE: Dict[str, Any] = {}


@st.composite
def mutated_spec(draw) -> Any:
    spec, paths, marker = _BASE["spec"], _BASE["paths"], _BASE["marker"]
    for _ in range(draw(st.integers(1, 3))):
        live = [p for p in paths if _exists(spec, p)]
        path = draw(st.sampled_from(live))
        old = _get(spec, path)
        kind = draw(st.sampled_from(["delete", "near", "near", "retype", "any", "extra", "payload"]))
        if kind == "delete" and path:
            spec = _edit(spec, path, lambda _: _DELETE)
        elif kind == "near":
            new = draw(_near(old))
            spec = _edit(spec, path, lambda _, new=new: new)
        elif kind == "retype":
            spec = _edit(spec, path, _retype)
        elif kind == "extra" and isinstance(old, dict):
            key, new = draw(st.sampled_from(_WORDS + ["zzz"]) | st.integers(0, 2)), draw(_values)
            spec = _edit(spec, path, lambda d, key=key, new=new: {**d, key: new})
        elif kind == "payload":
            spec = _edit(spec, path, lambda _: Payload(marker))
        else:
            new = draw(_values)
            spec = _edit(spec, path, lambda _, new=new: new)
        if not isinstance(spec, (dict, list, tuple)):
            break
    return spec


def _exists(value: Any, path: Tuple[Any, ...]) -> bool:
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, (list, tuple)) and isinstance(key, int) and key < len(value):
            value = value[key]
        else:
            return False
    return True


def _get(value: Any, path: Tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


@pytest.mark.parametrize("run", RUNS)
def test_mutated_specs_end_in_bad_input_or_a_model(work, run):
    raw, marker, path = work["raw"], work["marker"], work["dir"] / "spec.pt"
    spec = raw["spec"]
    outcomes: Counter = Counter()

    _BASE.update(spec=spec, paths=_paths(spec), marker=marker)

    @settings(max_examples=run[1], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated_spec())
    def check(mutated):
        # the spec in a file of its own (fast to write and read); the weights join it once it is read
        torch.save({**raw, "spec": mutated, "state_dict": {}}, path)
        outcomes[_outcome(path, marker, raw["state_dict"])] += 1

    start = time.perf_counter()
    check()
    print(f"\nspec fuzz: {sum(outcomes.values())} cases in {time.perf_counter() - start:.1f} s, "
          f"{len(work['replays'])} distinct replays: {dict(outcomes)}")
    assert outcomes["refused"] and outcomes["loaded"]
