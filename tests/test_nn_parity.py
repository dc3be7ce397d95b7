"""torch.nn parity for RNN/LSTM/GRU and their cells, in float64: outputs, and gradients (ur.grad
against torch autograd) of every input, initial state and parameter, to a relative error of 1e-10.

The case tables port PyTorch's own (torch/testing/_internal/common_modules.py:
module_inputs_torch_nn_RNN_GRU, module_inputs_torch_nn_LSTM, module_inputs_torch_nn_RNN_GRU_Cell,
module_inputs_torch_nn_LSTMCell and the module_error_inputs_* functions), plus batched versions,
torch's positional argument order, batch_first, proj_size, dropout, variable lengths, parameter
identity (separately built modules, PyTorch's seq2seq tutorial) and torch's errors.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable

import numpy as np
import pytest

import unroll as ur

torch = pytest.importorskip("torch")
F = torch.nn.functional
torch.set_num_threads(1)

RTOL = 1e-10
F64 = "float64"


# ---- helpers: nested inputs, one loss, ur.grad against torch.autograd ----------------------------

def leaves(tree: Any) -> list:
    if tree is None:
        return []
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


def rebuild(tree: Any, values: list) -> Any:
    it = iter(values)

    def build(t: Any) -> Any:
        if t is None:
            return None
        if isinstance(t, (tuple, list)):
            return tuple(build(i) for i in t)
        return next(it)
    return build(tree)


def assert_close(ours: np.ndarray, theirs: Any, what: str, rtol: float = RTOL) -> None:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != torch's {theirs.shape}"
    err = np.abs(ours - theirs).max(initial=0.0) / max(np.abs(theirs).max(initial=0.0), 1e-300)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def compare(model: ur.nn.Module, ref: torch.nn.Module, args: tuple, *, grads: bool = True,
            ours_call: Callable | None = None, torch_call: Callable | None = None, seed: int = 0,
            params: list | None = None, extra_feeds: dict | None = None) -> None:
    """Call `model` and `ref` on the same nested numpy `args`; compare every output and the
    gradients of sum_k <out_k, W_k> (random W_k) with respect to every float input and parameter.
    The model's parameters (or `params`, (ours, torch) module pairs) are compared by position."""
    rng = np.random.default_rng(seed)
    arrays = leaves(args)
    names = [f"a{i}" for i in range(len(arrays))]
    sym = rebuild(args, [ur.input(n, a.shape, a.dtype.name) for n, a in zip(names, arrays)])
    tens = rebuild(args, [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays])
    out = (ours_call or model)(*sym)
    t_out = (torch_call or ref)(*tens)
    outs, t_outs = leaves(out), leaves(t_out)
    assert len(outs) == len(t_outs)
    feeds = dict(zip(names, arrays))
    pairs = params if params is not None else [(model, ref)]
    p_nodes = [p for m, _ in pairs for p in m.parameters()]
    t_params = [p for _, t in pairs for p in t.parameters()]
    assert [tuple(p.shape) for p in p_nodes] == [tuple(p.shape) for p in t_params]
    values = ur.nn.state(*[m for m, _ in pairs])
    feeds.update(values)
    feeds.update(extra_feeds or {})
    weights = [rng.standard_normal(o.shape) for o in outs]
    if not grads:
        got = ur.compile(outs, backend="numpy")(**feeds)
        for k, (a, t) in enumerate(zip(got, t_outs)):
            assert_close(a, t, f"output {k}")
        return
    loss = sum((ur.sum(o * ur.input(f"w{k}", o.shape, F64)) for k, o in enumerate(outs)), ur.zeros((), F64))
    feeds.update({f"w{k}": w for k, w in enumerate(weights)})
    wrt_inputs = [s for s, a in zip(leaves(sym), arrays) if a.dtype.kind == "f"]
    wrt = wrt_inputs + p_nodes
    step = ur.compile([*outs, *ur.grad(loss, wrt)], backend="numpy")
    got = step(**{k: v for k, v in feeds.items() if k in step.input_names})  # tgt may be unused
    for k, (a, t) in enumerate(zip(got, t_outs)):
        assert_close(a, t, f"output {k}")
    t_loss = sum((t * torch.from_numpy(w)).sum() for t, w in zip(t_outs, weights))
    t_inputs = [t for t in leaves(tens) if t.dtype.is_floating_point]
    t_grads = torch.autograd.grad(t_loss, t_inputs + t_params, allow_unused=True)
    for k, (a, t, node) in enumerate(zip(got[len(outs):], t_grads, wrt)):
        assert_close(a, np.zeros(a.shape) if t is None else t, f"gradient of {node.name or k}")


def pair(ours_cls: Callable, torch_cls: Callable, *args: Any, seed: int = 0, **kwargs: Any):
    """torch's module (float64, seeded) and ours with the same arguments and torch's values."""
    torch.manual_seed(seed)
    ref = torch_cls(*args, **kwargs).double()
    model = ours_cls(*args, dtype=F64, **kwargs)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    return model, ref


def make(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


CLASSES = {"RNN": (ur.nn.RNN, torch.nn.RNN), "GRU": (ur.nn.GRU, torch.nn.GRU),
           "LSTM": (ur.nn.LSTM, torch.nn.LSTM), "RNNCell": (ur.nn.RNNCell, torch.nn.RNNCell),
           "GRUCell": (ur.nn.GRUCell, torch.nn.GRUCell), "LSTMCell": (ur.nn.LSTMCell, torch.nn.LSTMCell)}


# ---- torch's module_inputs tables -----------------------------------------------------------------

def rnn_gru_table(is_rnn: bool) -> list[tuple[dict, tuple]]:
    """module_inputs_torch_nn_RNN_GRU: (constructor kwargs, forward shapes); the forward inputs
    are unbatched, as in torch's table."""
    cases = []
    grid = itertools.product(("relu", "tanh"), (False, True), (False, True), (False, True)) if is_rnn \
        else ((None, *rest) for rest in itertools.product((False, True), (False, True), (False, True)))
    for nl, bias, batch_first, bidir in grid:
        cons = {"input_size": 2, "hidden_size": 2, "num_layers": 2, "batch_first": batch_first,
                "bias": bias, "bidirectional": bidir}
        cons_hidden = dict(cons, hidden_size=3)
        if is_rnn:
            cons["nonlinearity"] = cons_hidden["nonlinearity"] = nl
        cases.append((cons, ((3, 2),)))
        cases.append((cons_hidden, ((3, 2), (4 if bidir else 2, 3))))
    return cases


def lstm_table() -> list[tuple[dict, tuple]]:
    """module_inputs_torch_nn_LSTM."""
    cases = []
    for bias, batch_first, bidir, proj in itertools.product((False, True), (False, True), (False, True), (0, 2)):
        cons = {"input_size": 2, "hidden_size": 3, "num_layers": 2, "proj_size": proj,
                "batch_first": batch_first, "bias": bias, "bidirectional": bidir}
        h_out = proj if proj > 0 else 3
        cases.append((cons, ((2, 2),)))
        cases.append((cons, ((3, 2), ((4 if bidir else 2, h_out), (4 if bidir else 2, 3)))))
    return cases


def cell_table() -> list[tuple[str, tuple, dict, tuple]]:
    """module_inputs_torch_nn_RNN_GRU_Cell (RNNCell also with relu) and ..._LSTMCell."""
    cases = []
    for kind in ("RNNCell", "GRUCell"):
        cases += [(kind, (5, 10), {}, ((5,), (10,))), (kind, (5, 10), {"bias": True}, ((5,), (10,)))]
    cases.append(("RNNCell", (5, 10), {"bias": True, "nonlinearity": "relu"}, ((5,), (10,))))
    cases += [("LSTMCell", (5, 10), {}, ((5,), ((10,), (10,)))),
              ("LSTMCell", (5, 10), {"bias": True}, ((5,), ((10,), (10,))))]
    return cases


def shapes_to_arrays(shapes: tuple, rng: np.random.Generator) -> tuple:
    def build(s: Any) -> Any:
        if isinstance(s, tuple) and s and isinstance(s[0], tuple):
            return tuple(build(i) for i in s)
        return make(rng, *s)
    return tuple(build(s) for s in shapes)


def case_id(kind: str, cons: dict, shapes: tuple) -> str:
    flags = ",".join(f"{k}={v}" for k, v in cons.items() if k not in ("input_size", "hidden_size", "num_layers"))
    return f"{kind}({flags})-{len(shapes)}in"


MODULE_CASES = ([("RNN", c, s) for c, s in rnn_gru_table(True)] + [("GRU", c, s) for c, s in rnn_gru_table(False)]
                + [("LSTM", c, s) for c, s in lstm_table()])


@pytest.mark.parametrize("kind, cons, shapes", MODULE_CASES,
                         ids=[case_id(*c) for c in MODULE_CASES])
def test_torch_module_inputs_table(kind: str, cons: dict, shapes: tuple) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    model, ref = pair(ours_cls, torch_cls, **cons)
    compare(model, ref, shapes_to_arrays(shapes, np.random.default_rng(0)))


def batched(shapes: tuple, batch: int, batch_first: bool) -> tuple:
    """The table's unbatched shapes with a batch dimension (torch's no_batch_dim reference)."""
    x, *rest = shapes
    xs = (batch,) + x if batch_first else (x[0], batch, x[1])
    def hidden(s: Any) -> Any:
        if isinstance(s[0], tuple):
            return tuple(hidden(i) for i in s)
        return (s[0], batch, s[1])
    return (xs, *[hidden(s) for s in rest])


@pytest.mark.parametrize("kind, cons, shapes", MODULE_CASES,
                         ids=[case_id(*c) for c in MODULE_CASES])
def test_torch_module_inputs_table_batched(kind: str, cons: dict, shapes: tuple) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    model, ref = pair(ours_cls, torch_cls, seed=1, **cons)
    args = shapes_to_arrays(batched(shapes, 3, cons["batch_first"]), np.random.default_rng(1))
    compare(model, ref, args, seed=1)


CELL_CASES = cell_table()


@pytest.mark.parametrize("kind, args, kwargs, shapes", CELL_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CELL_CASES])
@pytest.mark.parametrize("batch", [None, 4])
def test_torch_cell_inputs_table(kind: str, args: tuple, kwargs: dict, shapes: tuple, batch: int | None) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    model, ref = pair(ours_cls, torch_cls, *args, **kwargs)
    if batch is not None:
        def add_batch(s: Any) -> Any:
            return tuple(add_batch(i) for i in s) if isinstance(s[0], tuple) else (batch, *s)
        shapes = tuple(add_batch(s) for s in shapes)
    rng = np.random.default_rng(2)
    compare(model, ref, shapes_to_arrays(shapes, rng))
    compare(model, ref, shapes_to_arrays(shapes[:1], rng))  # no state: zeros


def test_cells_step_through_a_scan_like_torch_loop() -> None:
    """torch's LSTMCell docstring example: a Python loop over steps; ours as an ur.scan."""
    model, ref = pair(ur.nn.LSTMCell, torch.nn.LSTMCell, 10, 20)
    rng = np.random.default_rng(3)
    xs, h0, c0 = make(rng, 6, 3, 10), make(rng, 3, 20), make(rng, 3, 20)

    def ours(x, h, c):
        def step(state, x_t):
            h, c = model(x_t, state)
            return (h, c), h
        (h_n, c_n), out = ur.scan(step, (h, c), x)
        return out, h_n, c_n

    def theirs(x, h, c):
        outs = []
        for t in range(x.shape[0]):
            h, c = ref(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs), h, c

    compare(model, ref, (xs, h0, c0), ours_call=ours, torch_call=theirs)


# ---- torch's module_error_inputs tables -------------------------------------------------------------

# (class, constructor args, constructor kwargs, error type, torch's regex)
CONSTRUCTION_ERRORS = [
    (cls, args, kwargs, err, regex)
    for cls in ("RNN", "GRU", "LSTM")
    for args, kwargs, err, regex in [
        ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
        ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
        ((3, 5), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
        ((3, 5), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
        ((3, 5), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
        ((3, 5), {"batch_first": 0}, TypeError, "batch_first should be of type bool, got: int"),
        ((3, 5), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
        ((3, 5), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
        ((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
        (("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
        ((0, 5), {}, ValueError, "input_size must be greater than zero"),
        ((-1, 5), {}, ValueError, "input_size must be greater than zero"),
        ((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
        # not in torch's table, torch's behaviour all the same
        ((3, 5), {"dropout": 1.5}, ValueError, r"dropout should be a number in range \[0, 1\]"),
        ((3, 5), {"dropout": -0.1}, ValueError, r"dropout should be a number in range \[0, 1\]"),
        ((3, 5), {"dropout": True}, ValueError, r"dropout should be a number in range \[0, 1\]"),
        ((3, -5), {}, ValueError, "hidden_size must be greater than zero"),
    ]
] + [
    ("LSTM", (3, 5), {"proj_size": -1}, ValueError, "proj_size should be a positive integer or zero"),
    ("LSTM", (3, 5), {"proj_size": 5}, ValueError, "proj_size has to be smaller than hidden_size"),
    ("GRU", (3, 5), {"proj_size": 2}, ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ("RNN", (3, 5), {"proj_size": 2}, ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ("RNN", (3, 5), {"nonlinearity": "sigmoid"}, ValueError, "Unknown nonlinearity 'sigmoid'"),
]


@pytest.mark.parametrize("kind, args, kwargs, error, regex", CONSTRUCTION_ERRORS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CONSTRUCTION_ERRORS])
def test_torch_construction_errors(kind: str, args: tuple, kwargs: dict, error: type, regex: str) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    with pytest.raises(error, match=regex):
        torch_cls(*args, **kwargs)
    with pytest.raises(error, match=regex):
        ours_cls(*args, **kwargs)


def test_dropout_with_one_layer_warns_like_torch() -> None:
    for ours_cls, torch_cls in (CLASSES["LSTM"], CLASSES["GRU"], CLASSES["RNN"]):
        with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1") as ours:
            ours_cls(3, 4, dropout=0.5)
        assert ours[0].filename == __file__  # points at the caller
        with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
            torch_cls(3, 4, dropout=0.5)


# (class, constructor args, forward input shapes, error type, torch's regex)
FORWARD_ERRORS = [
    (kind, (10, 20), ((3, 11), (3, 20)), RuntimeError, "input has inconsistent input_size: got 11 expected 10")
    for kind in ("RNNCell", "GRUCell")
] + [
    (kind, args, shapes, err, regex)
    for kind in ("RNNCell", "GRUCell")
    for args, shapes, err, regex in [
        ((10, 20), ((3, 10), (3, 21)), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
        ((10, 20), ((3, 10), (5, 20)), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
        ((10, 20), ((3, 10), (3, 1, 1, 20)), ValueError, "Expected hidden to be 1D or 2D, got 4D instead"),
        ((10, 20), ((3, 1, 10),), ValueError, "Expected input to be 1D or 2D, got 3D instead"),
    ]
] + [
    ("RNNCell", (10, 20, "relu"), ((3, 10), (3, 21)), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ("RNNCell", (10, 20, "tanh"), ((3, 10), (3, 21)), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ("LSTMCell", (10, 20), ((3, 11), ((3, 20), (3, 20))), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
    ("LSTMCell", (10, 20), ((3, 10), ((3, 21), (3, 21))), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ("LSTMCell", (10, 20), ((3, 10), ((3, 20), (3, 21))), RuntimeError, "hidden1 has inconsistent hidden_size: got 21, expected 20"),
    ("LSTMCell", (10, 20), ((3, 10), ((5, 20), (5, 20))), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
    ("LSTMCell", (10, 20), ((3, 10), ((3, 1, 1, 20), (3, 1, 1, 20))), ValueError, r"Expected hx\[0\] to be 1D or 2D, got 4D instead"),
] + [
    (kind, args, shapes, err, regex)
    for kind, dims_text in (("RNN", "4D tensor instead"), ("GRU", "4D instead"), ("LSTM", "4D instead"))
    for args, shapes, err, regex in [
        ((3, 4), ((5, 2, 3, 1),), ValueError, f"{kind}: Expected input to be 2D or 3D, got {dims_text}"),
        ((3, 4), ((5, 2, 6),), RuntimeError, r"input.size\(-1\) must be equal to input_size. Expected 3, got 6"),
        ((3, 4), ((0, 2, 3),), RuntimeError, "Expected sequence length to be larger than 0 in RNN"),
        ((3, 4), ((0, 3),), RuntimeError, "Expected sequence length to be larger than 0 in RNN"),
    ]
] + [
    ("GRU", (3, 4), ((5, 2, 3), (1, 4)), RuntimeError, "For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    ("RNN", (3, 4), ((5, 3), (1, 2, 4)), RuntimeError, "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    ("GRU", (3, 4), ((5, 2, 3), (1, 3, 4)), RuntimeError, r"Expected hidden size \(1, 2, 4\), got \[1, 3, 4\]"),
    ("RNN", (3, 4, 2), ((5, 2, 3), (1, 2, 4)), RuntimeError, r"Expected hidden size \(2, 2, 4\), got \[1, 2, 4\]"),
    ("GRU", (3, 4), ((5, 3), (2, 4)), RuntimeError, r"Expected hidden size \(1, 1, 4\), got \[2, 1, 4\]"),
    ("LSTM", (3, 4, 2), ((5, 2, 3), ((2, 2, 4), (1, 2, 4))), RuntimeError, r"Expected hidden\[1\] size \(2, 2, 4\), got \[1, 2, 4\]"),
    ("LSTM", (3, 4, 2), ((5, 2, 3), ((2, 3, 4), (2, 3, 4))), RuntimeError, r"Expected hidden\[0\] size \(2, 2, 4\), got \[2, 3, 4\]"),
    ("LSTM", (3, 4), ((5, 2, 3), ((2, 4), (1, 2, 4))), RuntimeError,
     r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors"),
]


def _symbolic(shapes: tuple, dtype: str, torch_dtype: Any) -> tuple[tuple, tuple]:
    count = itertools.count()

    def build(s: Any) -> tuple[Any, Any]:
        if isinstance(s[0], tuple):
            pairs = [build(i) for i in s]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        return ur.input(f"e{next(count)}", s, dtype), torch.zeros(s, dtype=torch_dtype)
    built = [build(s) for s in shapes]
    return tuple(p[0] for p in built), tuple(p[1] for p in built)


@pytest.mark.parametrize("kind, args, shapes, error, regex", FORWARD_ERRORS,
                         ids=[f"{c[0]}-{c[2]}" for c in FORWARD_ERRORS])
def test_torch_forward_errors(kind: str, args: tuple, shapes: tuple, error: type, regex: str) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    sym, tens = _symbolic(shapes, "float32", torch.float32)
    with pytest.raises(error, match=regex):
        torch_cls(*args)(*tens)
    with pytest.raises(error, match=regex) as err:
        ours_cls(*args)(*sym)
    assert f"{__file__}:" in str(err.value)  # the caller's line
    if error is RuntimeError:
        assert isinstance(err.value, ur.ShapeError)  # also ours


def test_dtype_mismatch_error() -> None:
    """torch's module_error_inputs_torch_nn_RNN_GRU dtype case: a ValueError naming both dtypes."""
    for kind in ("RNN", "GRU", "LSTM"):
        ours_cls, torch_cls = CLASSES[kind]
        with pytest.raises(ValueError, match=r"input dtype .* does not match weight dtype"):
            torch_cls(3, 5)(torch.zeros(2, 4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"input dtype float64 does not match weight dtype float32"):
            ours_cls(3, 5)(ur.input("x", (2, 4, 3), F64))
    with pytest.raises(ValueError, match=r"hidden0 dtype float32 does not match weight dtype float64"):
        ur.nn.GRUCell(3, 5, dtype=F64)(ur.input("x", (2, 3), F64), ur.input("h", (2, 5)))


def test_bad_initial_state_types() -> None:
    lstm = ur.nn.LSTM(3, 4)
    x = ur.input("x", (5, 2, 3))
    with pytest.raises(TypeError, match=r"tuple \(h0, c0\)"):
        lstm(x, ur.input("h", (1, 2, 4)))
    with pytest.raises(TypeError, match="expected a symbolic initial state h0"):
        ur.nn.GRU(3, 4)(x, np.zeros((1, 2, 4)))
    with pytest.raises(TypeError, match=r"expected the state as a tuple \(h, c\)"):
        ur.nn.LSTMCell(3, 4)(ur.input("x1", (2, 3)), ur.input("h1", (2, 4)))


# ---- torch's argument order, batch_first, h0/c0, proj_size ------------------------------------------

POSITIONAL = [
    ("LSTM", (4, 5, 1, True, True)),                      # batch_first, not bidirectional
    ("LSTM", (4, 5, 2, False, True, 0.0, True)),
    ("LSTM", (4, 5, 2, True, False, 0.0, True, 3)),       # proj_size 3
    ("GRU", (4, 5, 2, True, True, 0.0, True)),
    ("RNN", (4, 5, 2, "relu", False, True, 0.0, True)),   # nonlinearity before bias
    ("RNN", (4, 5, 1, "tanh", True, True)),
]


@pytest.mark.parametrize("kind, args", POSITIONAL, ids=[f"{k}{a}" for k, a in POSITIONAL])
def test_positional_arguments_mean_what_they_mean_in_torch(kind: str, args: tuple) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    model, ref = pair(ours_cls, torch_cls, *args)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        if hasattr(ref, attr):
            assert getattr(model, attr) == getattr(ref, attr), attr
    if kind == "RNN":
        assert model.nonlinearity == ref.nonlinearity
    x = make(np.random.default_rng(4), 3, 2, 4)  # (B, T, I) when batch_first
    compare(model, ref, (x,))


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_first_with_initial_state(kind: str, batch_first: bool) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    extra = {"proj_size": 2} if kind == "LSTM" else {}
    model, ref = pair(ours_cls, torch_cls, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first,
                      **extra)
    rng = np.random.default_rng(5)
    T, B = 5, 2
    x = make(rng, B, T, 3) if batch_first else make(rng, T, B, 3)
    h0 = make(rng, 4, B, 2 if kind == "LSTM" else 4)
    state = (h0, make(rng, 4, B, 4)) if kind == "LSTM" else h0
    compare(model, ref, (x, state))
    out, _ = model(ur.input("xs", x.shape, F64))
    assert out.shape == ((B, T, 2 * model.output_size) if batch_first else (T, B, 2 * model.output_size))


def test_proj_size_state_dict_layout_matches_torch() -> None:
    model, ref = pair(ur.nn.LSTM, torch.nn.LSTM, 3, 6, 2, proj_size=4, bidirectional=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert model.state_dict()["weight_hr_l1_reverse"].shape == (4, 6)
    assert model.state_dict()["weight_ih_l1"].shape == (24, 8)
    assert repr(model) == "LSTM(3, 6, proj_size=4, num_layers=2, bidirectional=True)"
    assert repr(model) == repr(ref)
    x = ur.input("x", (5, 2, 3), F64)
    out, (h, c) = model(x)
    assert (out.shape, h.shape, c.shape) == ((5, 2, 8), (4, 2, 4), (4, 2, 6))
    bound = 1 / np.sqrt(6)  # torch: U(-1/sqrt(hidden_size), ...) for every parameter, weight_hr too
    fresh = ur.nn.LSTM(3, 6, proj_size=4).state_dict()["weight_hr_l0"]
    assert np.abs(fresh).max() <= bound and np.abs(fresh).max() > bound / 2


def test_proj_size_lstm_step_and_state_from() -> None:
    model, ref = pair(ur.nn.LSTM, torch.nn.LSTM, 3, 5, 2, proj_size=2)
    model.eval()
    rng = np.random.default_rng(6)
    h = make(rng, 4, 2)

    def ours(h, x0):
        return ur.nn.one_to_many(model, lambda y: ur.concat([y, y[:, :1]], -1), ur.nn.state_from(model, h), x0, 4)

    def theirs(h, x0):
        state, x, outs = (h[None].expand(2, 4, 2), torch.zeros(2, 4, 5, dtype=torch.float64)), x0, []
        for _ in range(4):
            o, state = ref(x[None], state)
            x = torch.cat([o[0], o[0][:, :1]], -1)
            outs.append(x)
        return torch.stack(outs), state

    compare(model, ref, (h, make(rng, 4, 3)), ours_call=ours, torch_call=theirs)


# ---- dropout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_dropout_in_eval_mode_equals_torch_eval(kind: str) -> None:
    ours_cls, torch_cls = CLASSES[kind]
    model, ref = pair(ours_cls, torch_cls, 3, 4, 3, dropout=0.5, bidirectional=True)
    assert model.training and ref.training
    model.eval(), ref.eval()
    assert not model.training
    x = make(np.random.default_rng(7), 5, 2, 3)
    compare(model, ref, (x,))
    out, _ = model(ur.input("x", (5, 2, 3), F64))
    assert ur.nn.dropout_inputs(out) == []


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_dropout_in_training_mode_is_a_seeded_mask_input(kind: str) -> None:
    """Training mode: the mask between layers is a graph input whose values a seed decides; with
    the same masks torch's layer-by-layer computation gives the same outputs and gradients."""
    ours_cls, torch_cls = CLASSES[kind]
    L, T, B, H, p = 3, 4, 2, 5, 0.4
    model, ref = pair(ours_cls, torch_cls, 3, H, L, dropout=p, bidirectional=True)
    x = ur.input("x", (T, B, 3), F64)
    out, _ = model(x)
    (mask,) = ur.nn.dropout_inputs(out)
    assert mask.name == "dropout_mask" and mask.shape == (L - 1, T, B, 2 * H)
    feeds = ur.nn.dropout_feeds(out, seed=3)
    again = ur.nn.dropout_feeds(ur.graph(out), seed=3)
    other = ur.nn.dropout_feeds(out, seed=4)
    assert np.array_equal(feeds["dropout_mask"], again["dropout_mask"])
    assert not np.array_equal(feeds["dropout_mask"], other["dropout_mask"])
    assert set(np.unique(feeds["dropout_mask"])) <= {0.0, 1 / (1 - p)}
    big = ur.nn.LSTM(2, 50, 2, dropout=p)(ur.input("xb", (40, 20, 2)))[0]
    (big_mask,) = ur.nn.dropout_feeds(big, 0).values()
    assert ur.nn.dropout_inputs(big)[0].name == "lstm.dropout_mask"  # named after its module
    dropped = (big_mask == 0).mean()
    assert abs(dropped - p) < 0.02

    # torch, layer by layer with the same masks (torch's own dropout draws from its generator)
    full = ref.state_dict()
    layers = [torch_cls(3 if l == 0 else 2 * H, H, bidirectional=True).double() for l in range(L)]
    for l, layer in enumerate(layers):
        layer.load_state_dict({k: full[k.replace("_l0", f"_l{l}")] for k in layer.state_dict()})
    masks = feeds["dropout_mask"]

    def theirs(xt):
        h, finals = xt, []
        for l, layer in enumerate(layers):
            h, final = layer(h)
            finals.append(final)
            if l < L - 1:
                h = h * torch.from_numpy(masks[l])
        if kind == "LSTM":
            return h, (torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]))
        return h, torch.cat(finals)

    rng = np.random.default_rng(8)
    xv = make(rng, T, B, 3)
    sym_x = ur.input("a0", (T, B, 3), F64)
    o, st = model(sym_x)
    (m_node,) = ur.nn.dropout_inputs(o)
    outs = [o, *(st if kind == "LSTM" else (st,))]
    weights = [rng.standard_normal(n.shape) for n in outs]
    loss = sum((ur.sum(n * ur.input(f"w{k}", n.shape, F64)) for k, n in enumerate(outs)), ur.zeros((), F64))
    run_feeds = {"a0": xv, m_node.name: masks, **model.state_dict(),
                 **{f"w{k}": w for k, w in enumerate(weights)}}
    got = ur.compile([*outs, *ur.grad(loss, [sym_x, *model.parameters()])], backend="numpy")(**run_feeds)
    xt = torch.tensor(xv, requires_grad=True)
    t_out, t_state = theirs(xt)
    t_outs = [t_out, *(t_state if kind == "LSTM" else (t_state,))]
    for k, (a, t) in enumerate(zip(got, t_outs)):
        assert_close(a, t, f"output {k}")
    t_loss = sum((t * torch.from_numpy(w)).sum() for t, w in zip(t_outs, weights))
    t_params = {name.replace("_l0", f"_l{l}"): prm for l, layer in enumerate(layers)
                for name, prm in layer.named_parameters()}
    t_grads = torch.autograd.grad(t_loss, [xt, *[t_params[n.name] for n in model.parameters()]])
    for a, t, name in zip(got[len(outs):], t_grads, ["x", *[n.name for n in model.parameters()]]):
        assert_close(a, t, f"gradient of {name}")


def test_dropout_module_train_and_eval() -> None:
    drop = ur.nn.Dropout(0.25, dtype=F64)
    assert repr(drop) == repr(torch.nn.Dropout(0.25))
    x = ur.input("x", (6, 4), F64)
    y = drop(x)
    (mask,) = ur.nn.dropout_inputs(y)
    feeds = ur.nn.dropout_feeds(y, seed=0)
    xv = make(np.random.default_rng(9), 6, 4)
    np.testing.assert_array_equal(ur.compile(y, backend="numpy")(x=xv, **feeds), xv * feeds[mask.name])
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
        ur.nn.Dropout(1.5)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        torch.nn.Dropout(1.5)
    full = ur.nn.Dropout(1.0)(ur.input("z", (3,)))
    assert not ur.nn.dropout_feeds(full, 1)[ur.nn.dropout_inputs(full)[0].name].any()  # p = 1: zeros


def test_step_refuses_dropout_in_training_mode() -> None:
    gru = ur.nn.GRU(3, 4, 2, dropout=0.3)
    with pytest.raises(ValueError, match=r"dropout between layers needs a mask per step.*\.eval\(\)"):
        gru.step(ur.zeros((2, 2, 4)), ur.input("x", (2, 3)))
    gru.eval().step(ur.zeros((2, 2, 4)), ur.input("x", (2, 3)))


# ---- parameter identity -------------------------------------------------------------------------

def test_two_separately_built_grus_are_two_sets_of_weights() -> None:
    torch.manual_seed(0)
    t1, t2 = torch.nn.GRU(3, 4).double(), torch.nn.GRU(3, 4).double()
    g1, g2 = ur.nn.GRU(3, 4, dtype=F64), ur.nn.GRU(3, 4, dtype=F64)
    g1.load_state_dict(t1.state_dict())
    g2.load_state_dict(t2.state_dict())  # relative (torch) names load whatever the prefix
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(g1, t1, (make(np.random.default_rng(10), 5, 2, 3),),
                ours_call=lambda x: (g1(x), g2(x)), torch_call=lambda x: (t1(x), t2(x)),
                params=[(g1, t1), (g2, t2)])
    names1, names2 = [p.name for p in g1.parameters()], [p.name for p in g2.parameters()]
    assert names1 == list(t1.state_dict())                    # the first keeps torch's names
    assert names2 == [f"gru.{k}" for k in t2.state_dict()]   # the second takes its class name
    assert list(g2.state_dict()) == names2
    out1, _ = g1(ur.input("x", (5, 2, 3), F64))
    out2, _ = g2(ur.input("x", (5, 2, 3), F64))
    assert len(ur.graph(out1, out2).params()) == 8
    g3 = ur.nn.GRU(3, 4, dtype=F64)
    assert [p.name for p in g3.parameters()][0] == "gru_1.weight_ih_l0"


def test_the_same_module_twice_shares_and_names_are_claimed_while_alive() -> None:
    lstm = ur.nn.LSTM(3, 4, name="shared_enc")
    a, _ = lstm(ur.input("a", (5, 2, 3)))
    b, _ = lstm(ur.input("b", (5, 2, 3)))
    assert len(ur.graph(a, b).params()) == 4
    other = ur.nn.LSTM(3, 4, name="shared_enc")
    assert other.parameters()[0].name == "shared_enc_1.weight_ih_l0"
    del lstm, a, b, other
    again = ur.nn.LSTM(3, 4, name="shared_enc")  # the names are free once the module is gone
    assert again.parameters()[0].name == "shared_enc.weight_ih_l0"


def test_a_clash_that_cannot_be_resolved_is_an_error() -> None:
    first = ur.nn.Linear(2, 2)
    first.parameters()  # claims "weight" and "bias" (or "linear.*" if those are taken)

    class Odd(ur.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_param("weight", (2, 2), "zeros")
            self.inner = ur.nn.Linear(2, 2)

    odd = Odd()
    odd.inner.parameters()  # building a child claims the whole tree: "weight" is taken, so ...
    assert [p.name for p in odd.parameters()] == ["odd.weight", "odd.inner.weight", "odd.inner.bias"]
    odd.add_param("bias", (2,), "zeros")  # added after building: under the fixed prefix, free
    assert odd.bias.name == "odd.bias"
    clash = ur.nn.Module()
    clash.add_param("x", (1,), "zeros")
    clash.parameters()  # claims "x" (or "module.x")
    fixed = ur.nn.Module()
    fixed.add_param("y", (1,), "zeros")
    fixed.parameters()  # the tree's names are fixed from now on
    fixed.add_param(clash.parameters()[0].name, (1,), "zeros")
    with pytest.raises(ur.nn.NameClashError, match=r"is already a parameter of Module\(\).*fixed"):
        fixed.parameters()
    with pytest.raises(ValueError, match="cannot take the names"):
        ur.nn.Module().late = odd  # built modules keep their names


def test_state_merges_modules_and_claims_their_names() -> None:
    a, b_ = ur.nn.Linear(2, 3), ur.nn.Linear(2, 3)
    merged = ur.nn.state(a, b_, a)
    assert list(merged) == ["weight", "bias", "linear.weight", "linear.bias"]
    x = ur.input("x", (4, 2))
    y = a(x) + b_(x)
    assert ur.compile(y, backend="numpy")(x=np.ones((4, 2), np.float32), **merged).shape == (4, 3)
    with pytest.raises(TypeError, match="expected modules"):
        ur.nn.state({"weight": 1})


def test_whole_model_state_dict_loads_from_torch_and_shared_submodules_load_once() -> None:
    class Ours(ur.nn.Module):
        def __init__(self) -> None:
            super().__init__(dtype=F64)
            self.embedding = ur.nn.Embedding(5, 3, dtype=F64)
            self.encoder = ur.nn.LSTM(3, 4, 2, batch_first=True, dtype=F64)
            self.decoder = ur.nn.LSTM(3, 4, 2, batch_first=True, proj_size=3, dtype=F64)
            self.head = ur.nn.Linear(3, 5, dtype=F64)
            self.tied = self.head  # one module at two paths

    class Theirs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(5, 3)
            self.encoder = torch.nn.LSTM(3, 4, 2, batch_first=True)
            self.decoder = torch.nn.LSTM(3, 4, 2, batch_first=True, proj_size=3)
            self.head = torch.nn.Linear(3, 5)
            self.tied = self.head

    torch.manual_seed(0)
    ref, model = Theirs().double(), Ours()
    assert list(model.state_dict()) == [k for k in ref.state_dict() if not k.startswith("tied.")]
    model.load_state_dict(ref.state_dict())  # torch lists the shared head under both paths

    def ours(ids):
        _, state = model.encoder(model.embedding(ids))
        out, _ = model.decoder(model.embedding(ids), (state[0][:, :, :3], state[1]))
        return model.tied(out)

    def theirs(ids):
        _, state = ref.encoder(ref.embedding(ids))
        out, _ = ref.decoder(ref.embedding(ids), (state[0][:, :, :3].contiguous(), state[1]))
        return ref.tied(out)

    compare(model, ref, (np.random.default_rng(15).integers(0, 5, (2, 4)),), ours_call=ours, torch_call=theirs)
    bad = {k: v.clone() for k, v in ref.state_dict().items()}
    bad["tied.bias"] += 1
    with pytest.raises(ur.nn.StateDictError, match="names the shared parameter 'head.bias' again"):
        model.load_state_dict(bad)


def test_readme_single_module_feed_keeps_working() -> None:
    T, B, I, H = 5, 2, 3, 4
    x, y = ur.input("x", (T, B, I)), ur.input("y", (T, B, H))
    lstm = ur.nn.LSTM(I, H)
    out, _ = lstm(x)
    loss = ur.nn.mse(out, y)
    rng = np.random.default_rng(0)
    value = ur.compile(loss, backend="numpy")(x=rng.normal(size=(T, B, I)), y=rng.normal(size=(T, B, H)),
                                              **lstm.state_dict())
    assert np.isfinite(value)


class EncoderRNN(ur.nn.Module):
    """PyTorch's seq2seq tutorial (intermediate/seq2seq_translation_tutorial), written with ur.nn."""

    def __init__(self, input_size: int, hidden_size: int, dropout_p: float = 0.1) -> None:
        super().__init__(dtype=F64)
        self.hidden_size = hidden_size
        self.embedding = ur.nn.Embedding(input_size, hidden_size, dtype=F64)
        self.gru = ur.nn.GRU(hidden_size, hidden_size, batch_first=True, dtype=F64)
        self.dropout = ur.nn.Dropout(dropout_p)

    def forward(self, input):
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden


SOS_token, MAX_LENGTH = 0, 4


class DecoderRNN(ur.nn.Module):
    def __init__(self, hidden_size: int, output_size: int) -> None:
        super().__init__(dtype=F64)
        self.embedding = ur.nn.Embedding(output_size, hidden_size, dtype=F64)
        self.gru = ur.nn.GRU(hidden_size, hidden_size, batch_first=True, dtype=F64)
        self.out = ur.nn.Linear(hidden_size, output_size, dtype=F64)

    def forward(self, encoder_outputs, encoder_hidden, target_tensor=None):
        batch_size = encoder_outputs.shape[0]
        decoder_input = ur.full((batch_size, 1), SOS_token, "int64")
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        for i in range(MAX_LENGTH):
            decoder_output, decoder_hidden = self.forward_step(decoder_input, decoder_hidden)
            decoder_outputs.append(decoder_output)
            if target_tensor is not None:
                decoder_input = ur.reshape(target_tensor[:, i], (batch_size, 1))  # teacher forcing
            else:
                decoder_input = ur.reshape(ur.argmax(decoder_output, -1), (batch_size, 1))
        decoder_outputs = ur.concat(decoder_outputs, 1)
        decoder_outputs = ur.log_softmax(decoder_outputs, -1)
        return decoder_outputs, decoder_hidden, None

    def forward_step(self, input, hidden):
        output = self.embedding(input)
        output = ur.relu(output)
        output, hidden = self.gru(output, hidden)
        output = self.out(output)
        return output, hidden


class TorchEncoderRNN(torch.nn.Module):
    def __init__(self, input_size, hidden_size, dropout_p=0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = torch.nn.Embedding(input_size, hidden_size)
        self.gru = torch.nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = torch.nn.Dropout(dropout_p)

    def forward(self, input):
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden


class TorchDecoderRNN(torch.nn.Module):
    def __init__(self, hidden_size, output_size):
        super().__init__()
        self.embedding = torch.nn.Embedding(output_size, hidden_size)
        self.gru = torch.nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.out = torch.nn.Linear(hidden_size, output_size)

    def forward(self, encoder_outputs, encoder_hidden, target_tensor=None):
        batch_size = encoder_outputs.size(0)
        decoder_input = torch.empty(batch_size, 1, dtype=torch.long).fill_(SOS_token)
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        for i in range(MAX_LENGTH):
            decoder_output, decoder_hidden = self.forward_step(decoder_input, decoder_hidden)
            decoder_outputs.append(decoder_output)
            if target_tensor is not None:
                decoder_input = target_tensor[:, i].unsqueeze(1)
            else:
                _, topi = decoder_output.topk(1)
                decoder_input = topi.squeeze(-1).detach()
        decoder_outputs = torch.cat(decoder_outputs, dim=1)
        decoder_outputs = F.log_softmax(decoder_outputs, dim=-1)
        return decoder_outputs, decoder_hidden, None

    def forward_step(self, input, hidden):
        output = self.embedding(input)
        output = F.relu(output)
        output, hidden = self.gru(output, hidden)
        output = self.out(output)
        return output, hidden


@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_pytorch_seq2seq_tutorial_encoder_decoder(teacher_forcing: bool) -> None:
    """Two separately constructed top-level modules with the same attribute names and different
    vocabulary sizes, used in one graph: distinct weights, no warning, torch's outputs and gradients."""
    n_in, n_out, hidden, B, T = 7, 9, 6, 3, 5
    torch.manual_seed(0)
    t_enc, t_dec = TorchEncoderRNN(n_in, hidden).double().eval(), TorchDecoderRNN(hidden, n_out).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder, decoder = EncoderRNN(n_in, hidden).eval(), DecoderRNN(hidden, n_out)
        encoder.load_state_dict(t_enc.state_dict())
        decoder.load_state_dict(t_dec.state_dict())
        rng = np.random.default_rng(11)
        src = rng.integers(0, n_in, (B, T))
        tgt = rng.integers(0, n_out, (B, MAX_LENGTH))

        def ours(src, tgt):
            encoder_outputs, encoder_hidden = encoder(src)
            out, hid, _ = decoder(encoder_outputs, encoder_hidden, tgt if teacher_forcing else None)
            return out, hid, encoder_outputs

        def theirs(src, tgt):
            encoder_outputs, encoder_hidden = t_enc(src)
            out, hid, _ = t_dec(encoder_outputs, encoder_hidden, tgt if teacher_forcing else None)
            return out, hid, encoder_outputs

        compare(encoder, t_enc, (src, tgt), ours_call=ours, torch_call=theirs,
                params=[(encoder, t_enc), (decoder, t_dec)])
    assert not set(encoder.state_dict()) & set(decoder.state_dict())
    assert list(encoder.state_dict())[0] == "embedding.weight"
    assert list(decoder.state_dict())[0] == "decoderrnn.embedding.weight"


def test_train_step_with_two_top_level_modules() -> None:
    """TrainStep takes both modules; their values come from and go back to each state_dict."""
    n_in, n_out, hidden, B, T = 5, 6, 4, 2, 3
    encoder, decoder = EncoderRNN(n_in, hidden).eval(), DecoderRNN(hidden, n_out)
    src, tgt = ur.input("src", (B, T), "int64"), ur.input("tgt", (B, MAX_LENGTH), "int64")
    out, _, _ = decoder(*encoder(src), tgt)
    loss = ur.nn.cross_entropy(out, tgt)  # out is already log-probabilities; fine for a smoke test
    before = {k: v.copy() for k, v in ur.nn.state(encoder, decoder).items()}
    step = ur.TrainStep(loss, [encoder, decoder], optimizer="sgd", lr=0.1, backend="numpy")
    rng = np.random.default_rng(0)
    step(src=rng.integers(0, n_in, (B, T)), tgt=rng.integers(0, n_out, (B, MAX_LENGTH)))
    step.write_back()
    after = ur.nn.state(encoder, decoder)
    assert set(before) == set(after) == set(step.values)
    assert all(not np.array_equal(before[k], after[k]) for k in ("embedding.weight", "decoderrnn.out.bias"))


# ---- variable lengths: lengths= and pack_padded_sequence / pad_packed_sequence -------------------

LENGTH_CASES = [
    (kind, bidir, bf, layers, with_state)
    for kind in ("RNN", "GRU", "LSTM")
    for bidir, bf, layers, with_state in [(False, False, 1, False), (True, False, 2, True),
                                          (True, True, 2, False), (False, True, 2, True)]
]


@pytest.mark.parametrize("kind, bidir, batch_first, layers, with_state", LENGTH_CASES)
def test_variable_lengths_match_torch_packed_sequences(kind, bidir, batch_first, layers, with_state) -> None:
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    ours_cls, torch_cls = CLASSES[kind]
    extra = {"proj_size": 2} if kind == "LSTM" and layers == 2 else {}
    model, ref = pair(ours_cls, torch_cls, 3, 4, layers, batch_first=batch_first, bidirectional=bidir, **extra)
    T, B = 6, 4
    lens = np.array([6, 2, 5, 1])  # unsorted, one full, one of length 1
    rng = np.random.default_rng(12)
    x = make(rng, B, T, 3) if batch_first else make(rng, T, B, 3)
    D = 2 if bidir else 1
    args: tuple = (x, lens)
    if with_state:
        h0 = make(rng, layers * D, B, model.output_size)
        args = (x, lens, (h0, make(rng, layers * D, B, 4)) if kind == "LSTM" else h0)

    def ours(xs, ls, hx=None):
        packed = ur.nn.utils.rnn.pack_padded_sequence(xs, ls, batch_first=batch_first, enforce_sorted=False)
        out, state = model(packed, hx)
        padded, out_lens = ur.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first)
        direct, direct_state = model(xs, hx, lengths=ls)  # the same through lengths=
        return padded, state, direct, direct_state

    def theirs(xs, ls, hx=None):
        packed = pack_padded_sequence(xs, ls, batch_first=batch_first, enforce_sorted=False)
        out, state = ref(packed, hx)
        padded, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        return padded, state, padded, state

    compare(model, ref, args, ours_call=ours, torch_call=theirs)


def test_pad_packed_sequence_padding_value_total_length_and_errors() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    rng = np.random.default_rng(13)
    xv = make(rng, 4, 3, 2)
    x = ur.input("x", (4, 3, 2), F64)
    packed = ur.nn.utils.rnn.pack_padded_sequence(x, [4, 2, 1])  # constant lengths
    padded, lens = ur.nn.utils.rnn.pad_packed_sequence(packed, batch_first=True, padding_value=-1.0,
                                                       total_length=6)
    got, got_lens = ur.compile([padded, lens], backend="numpy")(x=xv)
    want, want_lens = pad_packed_sequence(pack_padded_sequence(torch.from_numpy(xv), [4, 2, 1]),
                                          batch_first=True, padding_value=-1.0, total_length=6)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(got_lens, want_lens.numpy())
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order when `enforce_sorted` is True"):
        ur.nn.utils.rnn.pack_padded_sequence(x, [1, 2, 4])
    ur.nn.utils.rnn.pack_padded_sequence(x, [1, 2, 4], enforce_sorted=False)
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        ur.nn.utils.rnn.pack_padded_sequence(x, [4, 2, 0])
    with pytest.raises(RuntimeError, match=r"Expected `len\(lengths\)` to be equal to batch_size, but got 2"):
        ur.nn.utils.rnn.pack_padded_sequence(x, [4, 2])
    with pytest.raises(ValueError, match="Expected total_length to be at least the length of the longest"):
        ur.nn.utils.rnn.pad_packed_sequence(packed, total_length=3)
    with pytest.raises(ur.ShapeError, match=r"lengths expected shape \[2\]"):
        ur.nn.GRU(2, 3)(ur.input("y", (4, 2, 2)), lengths=ur.input("l", (3,), "int32"))
    with pytest.raises(TypeError, match="lengths must be a symbolic int32 or int64"):
        ur.nn.GRU(2, 3)(ur.input("y", (4, 2, 2)), lengths=ur.input("lf", (2,)))


def test_unbatched_sequence_with_a_length() -> None:
    model, ref = pair(ur.nn.GRU, torch.nn.GRU, 3, 4, bidirectional=True)
    xv = make(np.random.default_rng(14), 5, 3)
    out, h = model(ur.input("x", (5, 3), F64), lengths=ur.input("n", (), "int64"))
    got = ur.compile([out, h], backend="numpy")(x=xv, n=np.array(3), **model.state_dict())
    with torch.no_grad():
        t_out, t_h = ref(torch.from_numpy(xv[:3]))
    assert_close(got[0][:3], t_out, "output")
    assert not got[0][3:].any()
    assert_close(got[1], t_h, "h_n")
