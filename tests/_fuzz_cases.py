"""Bad arguments for every public entry point, run by test_fuzz_entry_points.py in a subprocess.

Each case builds fresh state, calls one entry point with one bad argument and checks: a
ValueError/RuntimeError/TypeError (or the documented FileNotFoundError) whose message matches the
argument, and every parameter, buffer, requires_grad flag and file unchanged. Details (which
entry is duplicated, where the NaN goes, how a file is cut) come from a fixed-seed generator.

Run as ``python _fuzz_cases.py BATCH [SKIP...]``: prints ``START name`` before and one JSON line
after each case, so that a crash names the case it happened in.
"""

import functools
import json
import random
import re
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))

import slimtune  # noqa: E402
import slimtune.nn  # noqa: E402
from _state import assert_same, files, snapshot  # noqa: E402
from slimtune.lora.functional import lora_linear  # noqa: E402
from slimtune.lora.peft import export_peft_adapter, load_peft_adapter  # noqa: E402
from slimtune.sparse import rowptr_for  # noqa: E402
from slimtune.sparse.functional import sparse_delta_linear, sparse_delta_sddmm  # noqa: E402

ERRORS = (ValueError, RuntimeError, TypeError)
CASES = {}  # name -> (batch, build, match, errors, accept)
RNG = random.Random(20261123)
TMP = Path(tempfile.mkdtemp(prefix="slimtune-fuzz-"))


def case(batch, name, match, errors=ERRORS, accept=None):
    """``accept(result)``: where torch itself defines a result (a meta input gives a meta output,
    as stock layers do), returning that result is correct too."""

    def register(build):
        CASES[name] = (batch, build, match, errors, accept)
        return build

    return register


def defect_cases(batch, op, matches, suffix=""):
    """One case per defect of ``matches`` (defect -> the pattern its message must match), named
    ``op-defect`` plus ``suffix``, built by ``build(defect)``. Where the defect is a meta ``x``
    (``"x-meta"``), a meta result is accepted too."""

    def register(build):
        for defect, match in matches.items():
            accept = _meta_result if defect == "x-meta" else None
            case(batch, f"{op}-{defect}{suffix}", match, accept=accept)(functools.partial(build, defect))
        return build

    return register


def _meta_result(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return all(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs)


def _module_state(*modules):
    return lambda: [snapshot(m) for m in modules]


def _tensor_state(*ts):
    return lambda: [t.detach().clone() for t in ts]


def _files_state(*dirs):
    return lambda: [files(d) for d in dirs]


def _compare(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        if isinstance(b, dict) and "types" in b:
            assert_same(b, a)
        elif isinstance(b, torch.Tensor):
            assert b.dtype == a.dtype and b.shape == a.shape
            assert torch.equal(b.reshape(-1).view(torch.uint8), a.reshape(-1).view(torch.uint8)), "tensor changed"
        else:
            assert b == a, "files changed"


def _bad_index(n, numel):
    """A sorted index set of n entries with one defect picked at random."""
    idx = torch.tensor(sorted(RNG.sample(range(numel), n)), dtype=torch.int32)
    kind = RNG.choice(["duplicate", "out-of-range", "negative", "unsorted"])
    i = RNG.randrange(1, n)
    if kind == "duplicate":
        idx[i] = idx[i - 1]
    elif kind == "out-of-range":
        idx[-1] = numel + RNG.randrange(0, 1000)
    elif kind == "negative":
        idx[0] = -RNG.randrange(1, 100)
    else:
        idx[i - 1], idx[i] = idx[i].item(), idx[i - 1].item()
    return idx, kind


def _nan_at(n, dtype=torch.float32):
    v = torch.randn(n, dtype=dtype)
    v[RNG.randrange(n)] = RNG.choice([float("nan"), float("inf"), float("-inf")])
    return v


def _lin(i=8, o=6):
    torch.manual_seed(RNG.randrange(1000))
    return nn.Linear(i, o)


def _model():
    torch.manual_seed(RNG.randrange(1000))
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


# ------------------------------------------------------------------ batch 0: ops and functional


for dtype in (torch.float32, torch.bfloat16):

    @defect_cases(
        0,
        "sparse_delta_merge_",
        {
            "index": "indices",
            "values-nan": "values",
            "alpha-nan": "alpha",
            "values-len": "values",
            "index-dtype": "indices",
            "meta": "weight|device|meta",
            "weight-int": "weight",
            "noncontig": "weight",
        },
        suffix=f"-{str(dtype)[6:]}",
    )
    def _merge(defect, dtype=dtype):
        w = torch.randn(6, 7, dtype=dtype)
        idx = torch.tensor(sorted(RNG.sample(range(42), 5)), dtype=torch.int32)
        vals, alpha = torch.randn(5), 1.0
        if defect == "index":
            idx, _ = _bad_index(5, 42)
        elif defect == "values-nan":
            vals = _nan_at(5)
        elif defect == "alpha-nan":
            alpha = RNG.choice([float("nan"), float("inf")])
        elif defect == "values-len":
            vals = torch.randn(RNG.choice([0, 4, 6, 50]))
        elif defect == "index-dtype":
            idx = idx.to(RNG.choice([torch.float32, torch.int16, torch.uint8]))
        elif defect == "meta":
            vals = vals.to("meta")
        elif defect == "weight-int":
            w = torch.randint(0, 5, (6, 7))
        else:
            w = torch.randn(7, 6, dtype=dtype).t()
        return (lambda: slimtune.functional.sparse_delta_merge_(w, idx, vals, alpha)), _tensor_state(w)


@defect_cases(
    0,
    "sparse_delta_linear",
    {
        "x-features": "x|in_features|shape",
        "x-dtype": "x|dtype",
        "rowptr-len": "rowptr",
        "values-len": "values",
        "index": "indices|rowptr",
        "x-meta": "x|device|meta",
        "weight-1d": "weight",
    },
)
def _sdl(defect):
    w = torch.randn(6, 8)
    idx = torch.tensor(sorted(RNG.sample(range(48), 7)), dtype=torch.int32)
    rowptr, vals = rowptr_for(idx, w.shape), torch.randn(7, requires_grad=True)
    x = torch.randn(3, 8)
    if defect == "x-features":
        x = torch.randn(3, RNG.choice([1, 7, 9]))
    elif defect == "x-dtype":
        x = x.to(RNG.choice([torch.float64, torch.int64]))
    elif defect == "rowptr-len":
        rowptr = rowptr[:-2]
    elif defect == "values-len":
        vals = torch.randn(6, requires_grad=True)
    elif defect == "index":
        idx = idx.flip(0).contiguous()
    elif defect == "x-meta":
        x = x.to("meta")
    else:
        w = torch.randn(48)
    return (lambda: sparse_delta_linear(x, w, None, idx, rowptr, vals)), _tensor_state(w, vals)


for defect in ("rowptr-end", "rowptr-stale"):

    @case(0, f"sparse_delta_linear_backward-{defect}", "rowptr")
    def _sdl_bw(defect=defect):
        w, x, g = torch.randn(6, 8), torch.randn(3, 8), torch.randn(3, 6)
        idx = torch.tensor(sorted(RNG.sample(range(48), 7)), dtype=torch.int32)
        rowptr, vals = rowptr_for(idx, w.shape), torch.randn(7)
        if defect == "rowptr-end":
            rowptr[-1] = RNG.choice([8, 1000, 10**9])
        else:
            rowptr[1:-1] = rowptr[1:-1].flip(0)
            if torch.equal(rowptr, rowptr_for(idx, w.shape)):
                rowptr[1] = 7
        return (
            lambda: torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rowptr, vals, [True, True, True])
        ), _tensor_state(w, vals)


@case(0, "memsave_maxpool_compact-indices-outside-windows", "indices|window|range")
def _pool_compact():
    ind = torch.full((1, 1, 3, 3), RNG.choice([36, 10**6, -1]), dtype=torch.int64)
    return (
        lambda: torch.ops.slimtune.memsave_maxpool_compact(ind, [1, 1, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1])
    ), _tensor_state(ind)


for defect in ("a-shape", "index-len", "rowptr-short", "b-dtype"):

    @case(0, f"sparse_delta_sddmm-{defect}", "a|b|indices|rowptr|shape")
    def _sddmm(defect=defect):
        a, b = torch.randn(5, 6), torch.randn(5, 8)
        idx = torch.tensor(sorted(RNG.sample(range(48), 7)), dtype=torch.int32)
        rowptr = rowptr_for(idx, (6, 8))
        if defect == "a-shape":
            a = torch.randn(4, 6)
        elif defect == "index-len":
            idx = idx[:3]
        elif defect == "rowptr-short":
            rowptr = rowptr[:3]
        else:
            b = b.double()
        return (lambda: sparse_delta_sddmm(a, b, idx, rowptr)), _tensor_state(a, b)


@defect_cases(
    0,
    "lora_linear",
    {
        "x-features": "x|lora_A|features",
        "A-rank": "lora_B|rank|lora_A",
        "dropout-high": "dropout",
        "dropout-negative": "dropout",
        "x-meta": "x|device|meta",
        "B-dtype": "lora_B|dtype",
        "scale-nan": "scale",
    },
)
def _lora(defect):
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    p, s = 0.0, 2.0
    if defect == "x-features":
        x = torch.randn(3, 5)
    elif defect == "A-rank":
        B = torch.randn(6, 3, requires_grad=True)
    elif defect == "dropout-high":
        p = RNG.choice([1.0, 1.5, 100.0])
    elif defect == "dropout-negative":
        p = -RNG.random()
    elif defect == "x-meta":
        x = x.to("meta")
    elif defect == "B-dtype":
        B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    else:
        s = float("nan")
    return (lambda: lora_linear(x, w, None, A, B, s, p, seed=1)), _tensor_state(w, A, B)


for defect in ("mask-dtype", "mask-len"):

    @case(0, f"memsave_relu_backward-{defect}", "mask")
    def _relu_bw(defect=defect):
        g = torch.randn(4, 9)
        m = torch.zeros(5, dtype=torch.uint8)
        if defect == "mask-dtype":
            m = m.to(torch.int32)
        else:
            m = torch.zeros(RNG.choice([1, 4, 6]), dtype=torch.uint8)
        return (lambda: torch.ops.slimtune.memsave_relu_backward(g, m)), _tensor_state(g)


for defect in ("offsets-dtype", "offsets-shape", "offset-out-of-window", "input-size-small"):

    @case(0, f"memsave_maxpool_backward-{defect}", "offsets|input_size|grad|window|shape")
    def _pool_bw(defect=defect):
        g = torch.randn(1, 2, 3, 3)
        off = torch.zeros(1, 2, 3, 3, dtype=torch.int8)
        size = [1, 2, 6, 6]
        if defect == "offsets-dtype":
            off = off.long()
        elif defect == "offsets-shape":
            off = torch.zeros(1, 2, 3, 2, dtype=torch.int8)
        elif defect == "offset-out-of-window":
            off[0, 0, RNG.randrange(3), RNG.randrange(3)] = RNG.choice([4, 100, -3])
        else:
            size = [1, 2, 2, 2]
        return (
            lambda: torch.ops.slimtune.memsave_maxpool_backward(g, off, size, [2, 2], [2, 2], [0, 0], [1, 1])
        ), _tensor_state(g)


# ------------------------------------------------------------------ batch 1: nn modules, memsave


for name, make, match in [
    ("LoRALinear-r0", lambda b: slimtune.nn.LoRALinear(b, r=0), "r"),
    ("LoRALinear-r-float", lambda b: slimtune.nn.LoRALinear(b, r=2.5), "r"),
    (
        "LoRALinear-dropout",
        lambda b: slimtune.nn.LoRALinear(b, dropout=RNG.choice([1.0, -0.1, float("nan")])),
        "dropout",
    ),
    ("LoRALinear-alpha-inf", lambda b: slimtune.nn.LoRALinear(b, alpha=float("inf")), "alpha"),
    ("LoRALinear-base", lambda b: slimtune.nn.LoRALinear(nn.Conv1d(2, 2, 1)), "base"),
    (
        "SparseDeltaLinear-density",
        lambda b: slimtune.nn.SparseDeltaLinear(b, density=RNG.choice([-0.5, 1.5, 0.0])),
        "density",
    ),
    ("SparseDeltaLinear-k-huge", lambda b: slimtune.nn.SparseDeltaLinear(b, k=10**6), "k"),
    ("SparseDeltaLinear-k-negative", lambda b: slimtune.nn.SparseDeltaLinear(b, k=-3), "k"),
    ("SparseDeltaLinear-both", lambda b: slimtune.nn.SparseDeltaLinear(b, k=3, density=0.1), "k|density"),
    ("SparseDeltaLinear-structure", lambda b: slimtune.nn.SparseDeltaLinear(b, k=3, structure="diag"), "structure"),
    (
        "SparseDeltaLinear-scores-shape",
        lambda b: slimtune.nn.SparseDeltaLinear(b, k=3, init=torch.randn(3, 3)),
        "scores|shape|init",
    ),
    ("LoRASparseLinear-r", lambda b: slimtune.nn.LoRASparseLinear(b, r=-1, k=3), "r"),
]:

    @case(1, f"construct-{name}", match)
    def _construct(make=make):
        base = _lin()
        return (lambda: make(base)), _module_state(base)


for defect in ("x-features", "x-meta", "x-int"):
    for cls in ("lora", "sparse", "rosa"):

        @case(
            1,
            f"forward-{cls}-{defect}",
            "x|in_features|shape|size|dtype|device|meta|mat1|float|Long",
            accept=_meta_result if defect == "x-meta" else None,
        )
        def _forward(defect=defect, cls=cls):
            base = _lin()
            layer = {
                "lora": lambda: slimtune.nn.LoRALinear(base, r=2),
                "sparse": lambda: slimtune.nn.SparseDeltaLinear(base, k=5),
                "rosa": lambda: slimtune.nn.LoRASparseLinear(base, r=2, k=5),
            }[cls]()
            x = {
                "x-features": torch.randn(2, 7),
                "x-meta": torch.randn(2, 8, device="meta"),
                "x-int": torch.randint(0, 3, (2, 8)),
            }[defect]
            return (lambda: layer(x)), _module_state(layer)


@defect_cases(
    1,
    "set_delta",
    {
        "index": "indices",
        "values-nan": "values",
        "values-len": "values",
        "values-int": "values",
        "merged": "merged",
    },
)
def _set_delta(defect):
    layer = slimtune.nn.SparseDeltaLinear(_lin(), k=6)
    with torch.no_grad():
        layer.values.normal_()
    idx = torch.tensor(sorted(RNG.sample(range(48), 6)), dtype=torch.int32)
    vals = torch.randn(6)
    if defect == "index":
        idx, _ = _bad_index(6, 48)
    elif defect == "values-nan":
        vals = _nan_at(6)
    elif defect == "values-len":
        vals = torch.randn(RNG.choice([5, 7]))
    elif defect == "values-int":
        vals = torch.ones(6, dtype=torch.int64)
    else:
        layer.merge()
    return (lambda: layer.set_delta(idx, vals)), _module_state(layer)


for defect in ("not-module", "layers-type"):

    @case(1, f"memsave-{defect}", "model|layers")
    def _memsave(defect=defect):
        model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU())
        if defect == "not-module":
            return (lambda: slimtune.memsave("resnet")), _module_state(model)
        return (lambda: slimtune.memsave(model, layers=42)), _module_state(model)


for cls, shape, match in [
    (nn.Conv2d, (2, 5, 5), "channels|input|weight|shape|size"),
    (nn.MaxPool2d, (5,), "input|size|dim|shape"),
    (nn.BatchNorm2d, (2, 3, 4), "input|dim|expected|shape"),
    (nn.LayerNorm, (2, 3), "normalized_shape|input|shape"),
]:

    @case(1, f"memsave-forward-{cls.__name__}", match)
    def _memsave_forward(cls=cls, shape=shape):
        layer = {
            nn.Conv2d: lambda: nn.Conv2d(3, 2, 3),
            nn.MaxPool2d: lambda: nn.MaxPool2d(2),
            nn.BatchNorm2d: lambda: nn.BatchNorm2d(3).eval(),
            nn.LayerNorm: lambda: nn.LayerNorm(5),
        }[cls]()
        slimtune.memsave(layer)
        x = torch.randn(*shape, requires_grad=True)
        return (lambda: layer(x)), _module_state(layer)


# ------------------------------------------------------------------ batch 2: whole models and files


for name, call, match in [
    ("apply_lora-r", lambda m: slimtune.apply_lora(m, r=RNG.choice([0, -4])), "r"),
    ("apply_lora-dropout", lambda m: slimtune.apply_lora(m, dropout=1.5), "dropout"),
    ("apply_lora-targets", lambda m: slimtune.apply_lora(m, ["nope"]), "nope"),
    ("apply_lora-targets-type", lambda m: slimtune.apply_lora(m, 42), "target_modules"),
    ("apply_sparse_delta-density", lambda m: slimtune.apply_sparse_delta(m, density=-1.0), "density"),
    ("apply_sparse_delta-k", lambda m: slimtune.apply_sparse_delta(m, k=10**9), "k"),
    ("apply-method", lambda m: slimtune.convert.apply(m, "nope"), "method"),
    ("merge-unconverted", lambda m: slimtune.merge(m), "converted"),
    ("save-unconverted", lambda m: slimtune.save(m, TMP / "never"), "converted"),
]:

    @case(2, f"model-{name}", match)
    def _model_call(call=call):
        model = _model()
        return (lambda: call(model)), _module_state(model)


def _saved(method="lora"):
    src = _model()
    if method == "lora":
        slimtune.apply_lora(src, r=2)
    else:
        slimtune.apply_sparse_delta(src, k=5)
    d = TMP / f"saved-{RNG.randrange(10**9)}"
    slimtune.save(src, d)
    return d


def _corrupt(path):
    data = path.read_bytes()
    how = RNG.choice(["truncate", "garbage", "flip"])
    if how == "truncate":
        path.write_bytes(data[: RNG.randrange(1, len(data))])
    elif how == "garbage":
        path.write_bytes(bytes(RNG.randrange(256) for _ in range(RNG.randrange(1, 200))))
    else:
        b = bytearray(data)
        b[RNG.randrange(0, min(8, len(b)))] ^= 0xFF  # the header length
        path.write_bytes(bytes(b))


for what in ("weights", "config"):
    for method in ("lora", "sparse_delta"):

        @case(2, f"load-corrupt-{what}-{method}", "slimtune.load|JSON|read|config|format")
        def _load_corrupt(what=what, method=method):
            d = _saved(method)
            _corrupt(d / (slimtune.model_io.WEIGHTS_NAME if what == "weights" else slimtune.model_io.CONFIG_NAME))
            model = _model()
            return (lambda: slimtune.load(model, d)), lambda: [snapshot(model), files(d)]


@case(2, "load-wrong-shape", "shape|in the file")
def _load_shape():
    d = _saved("lora")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))
    return (lambda: slimtune.load(model, d)), lambda: [snapshot(model), files(d)]


@case(2, "save-into-a-file", "path|directory")
def _save_file():
    model = _model()
    slimtune.apply_lora(model, r=2)
    f = TMP / f"file-{RNG.randrange(10**9)}"
    f.write_text("not a directory")
    return (lambda: slimtune.save(model, f)), lambda: [snapshot(model), f.read_text()]


def _delta_file():
    model = nn.Sequential(slimtune.nn.SparseDeltaLinear(_lin(8, 8), k=6))
    with torch.no_grad():
        model[0].values.normal_()
    path = TMP / f"delta-{RNG.randrange(10**9)}.safetensors"
    slimtune.save_delta(model, path)
    return model, path


@case(2, "load_delta-corrupt", "safetensors|corrupt|format|delta")
def _load_delta_corrupt():
    model, path = _delta_file()
    _corrupt(path)
    return (lambda: slimtune.load_delta(model, path)), _module_state(model)


@case(2, "load_delta-bad-dict", "indices|values")
def _load_delta_dict():
    model, path = _delta_file()
    delta = slimtune.read_delta(path)
    defect = RNG.choice(["index", "nan", "len"])
    if defect == "index":
        delta["0"]["indices"], _ = _bad_index(6, 64)
    elif defect == "nan":
        delta["0"]["values"] = _nan_at(6)
    else:
        delta["0"]["values"] = torch.randn(9)
    return (lambda: slimtune.load_delta(model, delta)), _module_state(model)


@defect_cases(
    2,
    "compose",
    {
        "weights-len": "weights",
        "weights-nan": "weights",
        "corrupt": "safetensors|corrupt|format",
        "not-a-list": "deltas",
    },
)
def _compose(defect):
    _, path = _delta_file()
    target = nn.Sequential(_lin(8, 8))
    deltas, weights = [path, path], [1.0, 0.5]
    if defect == "weights-len":
        weights = [1.0]
    elif defect == "weights-nan":
        weights = [1.0, RNG.choice([float("nan"), float("inf")])]
    elif defect == "corrupt":
        _corrupt(path)
    else:
        deltas = path
    return (lambda: slimtune.compose(target, deltas, weights)), _module_state(target)


def _peft_dir():
    src = _model()
    slimtune.apply_lora(src, r=2)
    d = TMP / f"peft-{RNG.randrange(10**9)}"
    export_peft_adapter(src, d)
    return d


@defect_cases(
    2,
    "load_peft_adapter",
    {
        "weights-corrupt": "safetensors",
        "config-garbage": "JSON|object",
        "r-mismatch": "rank",
        "nan": "NaN",
        "dropout": "lora_dropout",
        "pattern-regex": "regular expression",
    },
)
def _peft(defect):
    d = _peft_dir()
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if defect == "weights-corrupt":
        _corrupt(d / "adapter_model.safetensors")
    elif defect == "config-garbage":
        cfg_path.write_text(RNG.choice(["{", "[1, 2]", "null"]))
    elif defect == "r-mismatch":
        cfg["r"] = 3
    elif defect == "dropout":
        cfg["lora_dropout"] = 7
    elif defect == "pattern-regex":
        cfg["rank_pattern"] = {"(": 2}
    else:
        from safetensors.torch import load_file, save_file

        t = load_file(str(d / "adapter_model.safetensors"))
        key = sorted(t)[RNG.randrange(len(t))]
        t[key].view(-1)[0] = float("nan")
        save_file(t, str(d / "adapter_model.safetensors"))
    if defect not in ("config-garbage", "weights-corrupt", "nan"):
        cfg_path.write_text(json.dumps(cfg))
    model = _model()
    return (lambda: load_peft_adapter(model, d)), lambda: [snapshot(model), files(d)]


# ------------------------------------------------------------------ runner


def run(batch, skip):
    for name in sorted(n for n, c in CASES.items() if c[0] == batch):
        if name in skip:
            continue
        print(f"START {name}", flush=True)
        RNG.seed(name)  # each case draws the same details however the batch is split
        _, build, match, errors, accept = CASES[name]
        result = {"case": name, "ok": False, "detail": ""}
        try:
            action, state = build()
            before = state()
            try:
                out = action()
                if accept is not None and accept(out):
                    _compare(before, state())
                    result["ok"] = True
                else:
                    result["detail"] = "no exception"
            except errors as e:
                msg = str(e)
                if not re.search(match, msg, re.I):
                    result["detail"] = f"{type(e).__name__} does not name /{match}/: {msg[:300]}"
                else:
                    _compare(before, state())
                    result["ok"] = True
            except Exception as e:  # the wrong type of error
                result["detail"] = f"{type(e).__name__}: {str(e)[:300]}"
        except AssertionError as e:
            result["detail"] = f"state changed: {e}"
        except Exception:
            result["detail"] = "setup failed: " + traceback.format_exc()[-300:]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run(int(sys.argv[1]), set(sys.argv[2:]))
