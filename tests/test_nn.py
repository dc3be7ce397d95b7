"""ur.nn without torch: parameter names and nodes, modules, seeding, graph structure, unroll oracle."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

import unroll as ur
from unroll.ir.node import all_nodes
from unroll.ir.ops import Op


def run(outputs, **feeds):
    return ur.compile(list(outputs), backend="numpy")(**feeds)


def random_feeds(graph: ur.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for the graph's INPUT leaves (ids in [0, 3))."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for node in graph.inputs:
        if node.op is Op.INPUT:
            if node.dtype.startswith("int"):
                feeds[node.name] = rng.integers(0, 3, node.shape).astype(node.dtype)
            else:
                feeds[node.name] = rng.standard_normal(node.shape).astype(node.dtype)
    return feeds


# ---- names, parameters, state_dict --------------------------------------------------------------

def test_lstm_state_dict_has_torch_names_and_layouts() -> None:
    lstm = ur.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    shapes = {k: v.shape for k, v in lstm.state_dict().items()}
    expected = {}
    for layer, fan_in in ((0, 3), (1, 10)):
        for sfx in ("", "_reverse"):
            expected |= {f"weight_ih_l{layer}{sfx}": (20, fan_in), f"weight_hh_l{layer}{sfx}": (20, 5),
                         f"bias_ih_l{layer}{sfx}": (20,), f"bias_hh_l{layer}{sfx}": (20,)}
    assert list(shapes.items()) == list(expected.items())
    assert list(ur.nn.GRU(2, 4, bias=False).state_dict()) == ["weight_ih_l0", "weight_hh_l0"]
    assert ur.nn.GRU(2, 4).state_dict()["weight_hh_l0"].shape == (12, 4)
    assert ur.nn.RNN(2, 4).state_dict()["weight_ih_l0"].shape == (4, 2)


def test_parameters_are_graph_inputs_named_by_state_dict_keys() -> None:
    gru = ur.nn.GRU(3, 4, num_layers=2, name="enc")
    keys = list(gru.state_dict())
    assert keys[0] == "enc.weight_ih_l0" and keys[-1] == "enc.bias_hh_l1"
    params = gru.parameters()
    assert [p.op for p in params] == [Op.PARAM] * len(keys)
    assert [p.name for p in params] == keys
    assert [p.shape for p in params] == [v.shape for v in gru.state_dict().values()]
    out, h_n = gru(ur.input("x", (5, 2, 3)))
    graph = ur.graph(out, h_n)
    assert {p.name for p in graph.params()} == set(keys)
    assert all(any(p is q for q in graph.inputs) for p in params)


def test_calling_a_module_twice_shares_its_parameter_nodes() -> None:
    lstm = ur.nn.LSTM(3, 4)
    out1, _ = lstm(ur.input("a", (5, 2, 3)))
    out2, _ = lstm(ur.input("b", (7, 2, 3)))
    first = lstm.parameters()
    assert all(p is q for p, q in zip(first, lstm.parameters()))
    graph = ur.graph(out1, out2)
    assert len(graph.params()) == 4
    assert lstm.weight_ih_l0 is first[0]  # parameters read as attributes


def test_separately_built_modules_never_share_parameters() -> None:
    first, second = ur.nn.GRU(3, 4), ur.nn.GRU(3, 4, seed=1)
    x = ur.input("x", (5, 2, 3))
    (out1, _), (out2, _) = first(x), second(x)
    graph = ur.graph(out1, out2)
    assert len(graph.params()) == 8
    assert set(first.state_dict()).isdisjoint(second.state_dict())
    assert {p.name for p in graph.params()} == set(ur.nn.state(first, second))
    xv = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    values = ur.compile(graph, backend="numpy")(x=xv, **ur.nn.state(first, second))
    assert not np.allclose(values[0], values[1])


def test_train_and_eval_set_the_flag_on_the_whole_tree() -> None:
    model = Tagger(6, 3, 2)
    assert model.training and model.rnn.training
    assert model.eval() is model and not model.rnn.training and not model.head.training
    model.train()
    assert model.embed.training


def test_init_is_torch_like_seeded_and_typed() -> None:
    for module, bound in [(ur.nn.LSTM(3, 16), 1 / 4), (ur.nn.Linear(9, 2), 1 / 3),
                          (ur.nn.Conv1d(2, 3, 2), 1 / 2)]:
        for value in module.state_dict().values():
            assert np.abs(value).max() <= bound
            assert value.size < 12 or np.abs(value).max() > bound / 2  # uses the whole range
            assert value.dtype == np.float32
    same = ur.nn.GRU(3, 4, seed=7).state_dict(), ur.nn.GRU(3, 4, seed=7).state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(same[0].values(), same[1].values()))
    other = ur.nn.GRU(3, 4, seed=8).state_dict()
    assert not np.array_equal(same[0]["weight_ih_l0"], other["weight_ih_l0"])
    double = ur.nn.GRU(3, 4, dtype="float64")
    assert all(v.dtype == np.float64 for v in double.state_dict().values())
    assert all(p.dtype == "float64" for p in double.parameters())
    tcn = ur.nn.TCN(2, [3, 3])
    assert np.std(tcn.state_dict()["network.0.conv1.weight"]) < 0.05  # Bai et al.'s N(0, 0.01)


class Tagger(ur.nn.Module):
    """A user's model: nested modules by attribute assignment."""

    def __init__(self, vocab: int, hidden: int, tags: int, name: str | None = None) -> None:
        super().__init__(name)
        self.embed = ur.nn.Embedding(vocab, 4)
        self.rnn = ur.nn.LSTM(4, hidden, bidirectional=True)
        self.head = ur.nn.Linear(2 * hidden, tags)

    def forward(self, ids: ur.Node) -> ur.Node:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


def test_nested_modules_have_dotted_torch_names_and_compile_with_state_dict() -> None:
    model = Tagger(6, 3, 2)
    keys = list(model.state_dict())
    assert keys == ["embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                    "rnn.bias_hh_l0", "rnn.weight_ih_l0_reverse", "rnn.weight_hh_l0_reverse",
                    "rnn.bias_ih_l0_reverse", "rnn.bias_hh_l0_reverse", "head.weight", "head.bias"]
    assert [p.name for p in model.parameters()] == keys
    logits = model(ur.input("ids", (5, 2), "int32"))
    ids = np.random.default_rng(0).integers(0, 6, (5, 2)).astype(np.int32)
    (value,) = run([logits], ids=ids, **model.state_dict())
    assert value.shape == (5, 2, 2)
    assert [path for path, _ in model.named_modules()] == ["", "embed", "rnn", "head"]

    named = Tagger(6, 3, 2, name="tagger")
    assert list(named.state_dict())[0] == "tagger.embed.weight"
    outer = ur.nn.Module()
    outer.register_module("inner", named)  # the parent decides the names, as in torch
    assert list(outer.state_dict())[-1] == "inner.head.bias"
    assert list(ur.nn.Sequential(ur.nn.Linear(2, 3), ur.nn.Linear(3, 1)).state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias"]


def test_custom_module_with_its_own_parameters() -> None:
    class Scale(ur.nn.Module):
        def __init__(self) -> None:
            super().__init__(name="scale")
            self.add_param("gain", (3,), "ones")

        def forward(self, x: ur.Node) -> ur.Node:
            return x * self.gain

    m = Scale()
    assert m.gain.name == "scale.gain" and m.gain.arg[1] == "ones"
    (value,) = run([m(ur.input("x", (2, 3)))], x=np.ones((2, 3), np.float32), **m.state_dict())
    assert np.array_equal(value, np.ones((2, 3)))


def test_load_state_dict_copies_converts_and_accepts_relative_or_full_names() -> None:
    lstm = ur.nn.LSTM(2, 3, name="enc")
    new = {k[len("enc."):]: np.full(v.shape, 0.5, np.float64) for k, v in lstm.state_dict().items()}
    lstm.load_state_dict(new)  # relative names (a bare torch module's state_dict)
    assert all(v.dtype == np.float32 and np.all(v == 0.5) for v in lstm.state_dict().values())
    new["weight_hh_l0"][:] = 9  # the module holds copies
    assert np.all(lstm.state_dict()["enc.weight_hh_l0"] == 0.5)
    lstm.load_state_dict({"enc.bias_hh_l0": np.zeros(12)}, strict=False)  # a training update
    values = lstm.state_dict()
    assert np.all(values["enc.bias_hh_l0"] == 0) and np.all(values["enc.bias_ih_l0"] == 0.5)
    state = {k: v + 1 for k, v in lstm.state_dict().items()}  # full names
    lstm.load_state_dict(state)
    assert np.all(lstm.state_dict()["enc.bias_hh_l0"] == 1)


# ---- graph structure ---------------------------------------------------------------------------

def loops_of(*outputs: ur.Node) -> list:
    return [n for n, depth in all_nodes(ur.graph(*outputs)) if n.op is Op.LOOP]


def test_each_layer_and_direction_is_one_scan_with_the_input_projection_in_the_body() -> None:
    out, (h_n, c_n) = ur.nn.LSTM(3, 4, num_layers=2, bidirectional=True)(ur.input("x", (5, 2, 3)))
    loops = loops_of(out, h_n, c_n)
    assert len(loops) == 4
    assert sorted(loop.arg.reverse for loop in loops) == [False, False, True, True]
    for loop in loops:
        info = loop.arg
        assert (info.length, info.n_carry, info.n_xs, info.n_ys) == (5, 2, 1, 1)
        body_ops = [n.op for n in info.body.nodes()]
        assert body_ops.count(Op.MATMUL) == 2  # x_t @ W_ih.T and h @ W_hh.T, one per weight
        assert body_ops.count(Op.SLICE) == 4   # the gate split


def test_unbatched_and_no_sequence_shapes() -> None:
    out, h_n = ur.nn.GRU(3, 4, num_layers=2, bidirectional=True)(ur.input("x", (5, 3)))
    assert out.shape == (5, 8) and h_n.shape == (4, 4)
    assert ur.nn.Linear(3, 2)(ur.input("v", (3,))).shape == (2,)
    assert ur.nn.Embedding(5, 2)(ur.input("i", (), "int32")).shape == (2,)


def test_step_runs_one_time_step_like_forward() -> None:
    lstm = ur.nn.LSTM(3, 4, num_layers=2)
    x = ur.input("x", (6, 2, 3))
    out, (h_n, c_n) = lstm(x)
    zero = ur.zeros((2, 2, 4))
    (h_s, c_s), ys = ur.scan(lambda s, x_t: lstm.step(s, x_t), init=(zero, zero), xs=x)
    feeds = {"x": np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)}
    whole = run([out, h_n, c_n], **feeds, **lstm.state_dict())
    stepped = run([ys, h_s, c_s], **feeds, **lstm.state_dict())
    for u, v in zip(whole, stepped):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_tcn_levels_dilate_and_downsample_only_when_channels_change() -> None:
    tcn = ur.nn.TCN(3, [4, 4, 2], kernel_size=3)
    blocks = list(tcn.network.children())
    assert [blk.conv1.dilation for blk in blocks] == [1, 2, 4]
    assert [blk.downsample is not None for blk in blocks] == [True, False, True]
    assert "network.1.downsample.weight" not in tcn.state_dict()
    assert tcn.state_dict()["network.2.downsample.weight"].shape == (2, 4, 1)
    assert tcn(ur.input("x", (7, 2, 3))).shape == (7, 2, 2)
    with pytest.warns(UserWarning, match="dropout is ignored"):
        ur.nn.TCN(3, [4], dropout=0.2)


def test_conv1d_is_a_sum_of_row_shifted_products_without_im2col() -> None:
    """Each tap is pad_rows(x_rows[shifted] @ W_j.T) on the (T*B, C) view of x: no concat of taps,
    no padded copy of x; the shifts are j*d steps of B rows each (nn/conv.py)."""
    T, B = 6, 2
    conv = ur.nn.Conv1d(3, 4, 3, dilation=2)
    g = ur.graph(conv(ur.input("x", (T, B, 3))))
    ops = [n.op for n in g.nodes()]
    assert Op.CONCAT not in ops and ops.count(Op.MATMUL) == 3
    pads = [n for n in g.nodes() if n.op is Op.PAD]
    assert all(p.src[0].op is Op.MATMUL for p in pads)
    assert sorted(p.arg for p in pads) == [((2 * B, 0), (0, 0)), ((4 * B, 0), (0, 0))]
    same = ur.graph(ur.nn.Conv1d(3, 4, 3, dilation=2, causal=False)(ur.input("x", (T, B, 3))))
    assert sorted(p.arg for p in same.nodes() if p.op is Op.PAD) == [((0, 2 * B), (0, 0)), ((2 * B, 0), (0, 0))]


def test_causal_conv_does_not_see_the_future() -> None:
    conv = ur.nn.Conv1d(1, 1, 3, dilation=2)
    x = ur.input("x", (9, 1, 1))
    xv = np.zeros((9, 1, 1), np.float32)
    base = run([conv(x)], x=xv, **conv.state_dict())[0]
    xv[6] = 1.0
    moved = run([conv(x)], x=xv, **conv.state_dict())[0]
    changed = np.nonzero((moved != base).ravel())[0]
    assert list(changed) == [6, 8]  # taps at t, t-2, t-4


def test_repr() -> None:
    assert repr(ur.nn.LSTM(3, 4, num_layers=2)) == "LSTM(3, 4, num_layers=2)"
    text = repr(Tagger(6, 3, 2))
    assert "(rnn): LSTM(4, 3, bidirectional=True)" in text and "(head): Linear(" in text


# ---- the unroll oracle: interp(unroll(g)) == interp(g) for every model --------------------------

def _recurrent(cls: type, **kw) -> Callable[[], tuple[list[ur.Node], ur.nn.Module]]:
    def build():
        m = cls(3, 4, num_layers=2, bidirectional=True, **kw)
        x = ur.input("x", (5, 2, 3))
        if cls is ur.nn.LSTM:
            out, (h, c) = m(x, (ur.input("h0", (4, 2, 4)), ur.input("c0", (4, 2, 4))))
            return [out, h, c], m
        out, h = m(x, ur.input("h0", (4, 2, 4)))
        return [out, h], m
    return build


def _tcn():
    m = ur.nn.TCN(3, [4, 4, 2], kernel_size=2)
    return [m(ur.input("x", (6, 2, 3)))], m


def _layers():
    lin, emb, conv = ur.nn.Linear(3, 2, name="lin"), ur.nn.Embedding(3, 4, name="emb"), ur.nn.Conv1d(
        4, 2, 3, name="conv")
    ids = ur.input("ids", (5, 2), "int32")
    y = conv(emb(ids))
    model = ur.nn.Module()
    model.lin, model.emb, model.conv = lin, emb, conv
    return [lin(ur.input("v", (2, 2, 3))), y], model


def _losses():
    p, t = ur.input("p", (3, 4)), ur.input("t", (3, 4))
    ce = ur.nn.cross_entropy(p, ur.input("ids", (3,), "int32"), ignore_index=2)
    return [ur.nn.mse(p, t), ur.nn.bce_with_logits(p, t), ce], ur.nn.Module()


def _seq2seq():
    emb = ur.nn.Embedding(3, 4, name="emb")
    enc, dec = ur.nn.GRU(4, 5, name="enc"), ur.nn.GRU(4, 5, name="dec")
    head = ur.nn.Linear(5, 3, name="head")
    src, tgt = ur.input("src", (4, 2), "int32"), ur.input("tgt", (3, 2), "int32")
    tf = ur.nn.teacher_forcing(enc, dec, head, emb(src), emb(tgt))
    _, state = enc(emb(src))
    logits, ids = ur.nn.greedy_decode(dec, head, emb, state, ur.input("start", (2,), "int32"), 4)
    model = ur.nn.Module()
    model.emb, model.enc, model.dec, model.head = emb, enc, dec, head
    return [tf, logits, ids], model


def _one_to_many():
    lstm, head = ur.nn.LSTM(2, 3, num_layers=2, name="lstm"), ur.nn.Linear(3, 2, name="head")
    state = ur.nn.state_from(lstm, ur.tanh(ur.input("h", (2, 3))))
    ys, (h, c) = ur.nn.one_to_many(lstm, head, state, ur.input("x0", (2, 2)), 5)
    model = ur.nn.Module()
    model.lstm, model.head = lstm, head
    return [ys, h, c], model


MODELS = {
    "rnn_tanh": _recurrent(ur.nn.RNN), "rnn_relu": _recurrent(ur.nn.RNN, nonlinearity="relu"),
    "lstm": _recurrent(ur.nn.LSTM), "gru": _recurrent(ur.nn.GRU),
    "gru_nobias": _recurrent(ur.nn.GRU, bias=False),
    "tcn": _tcn, "layers": _layers, "losses": _losses, "seq2seq": _seq2seq, "one_to_many": _one_to_many,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_unrolled_graph_computes_the_same_values(name: str) -> None:
    outputs, model = MODELS[name]()
    graph = ur.verify(ur.graph(outputs))
    unrolled = ur.verify(ur.unroll(graph))
    assert not [n for n, _ in all_nodes(unrolled) if n.op is Op.LOOP]
    feeds = {**random_feeds(graph), **model.state_dict()}
    rolled_values = ur.compile(graph, backend="numpy")(**feeds)
    unrolled_values = ur.compile(unrolled, backend="numpy")(**feeds)
    for a, b in zip(rolled_values, unrolled_values, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_models_build_in_float64() -> None:
    lstm = ur.nn.LSTM(2, 3, dtype="float64")
    out, _ = lstm(ur.input("x", (4, 1, 2), "float64"))
    assert out.dtype == "float64"
    emb = ur.nn.Embedding(4, 2, dtype="float64")
    assert emb(ur.input("i", (3,), "int64")).dtype == "float64"
    loss = ur.nn.cross_entropy(ur.input("l", (3, 4), "float64"), ur.input("t", (3,), "int32"))
    assert loss.dtype == "float64" and loss.shape == ()
    assert math.isfinite(run([loss], l=np.zeros((3, 4)), t=np.zeros(3, np.int32))[0])
