"""Tests of ur.nn's attention (Bahdanau additive, Luong dot and general) and the GNMT-style model:
padding gets exactly zero weight, both layouts agree, gradients match PyTorch written the same way
(float64, 1e-10) and central finite differences, bad inputs raise errors naming what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import unroll as ur

T, B, K, Q = 5, 3, 4, 6
LENGTHS = np.array([5, 2, 1])
KINDS = ["additive", "dot", "general"]          # BahdanauAttention, then LuongAttention scores


def make(kind: str, q: int = Q, k: int = K, **kw) -> ur.nn.Module:
    if kind == "additive":
        return ur.nn.BahdanauAttention(q, k, hidden_size=7, dtype="float64", **kw)
    return ur.nn.LuongAttention(q, k, kind, dtype="float64", **kw)


def sizes(kind: str) -> tuple[int, int]:
    return (K, K) if kind == "dot" else (Q, K)        # dot needs query_size == key_size


def feeds(q: int, k: int, seed: int = 0, batch_first: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    enc = rng.standard_normal((T, B, k))
    return {"enc": enc.transpose(1, 0, 2).copy() if batch_first else enc,
            "q": rng.standard_normal((B, q)), "lens": LENGTHS}


def build(attn, q: int, k: int, batch_first: bool = False, use_mask: bool = False):
    enc = ur.input("enc", (B, T, k) if batch_first else (T, B, k), "float64")
    query = ur.input("q", (B, q), "float64")
    if use_mask:
        mask = ur.input("mask", (B, T), "bool")
        return attn(enc, query, mask=mask)
    return attn(enc, query, lengths=ur.input("lens", (B,), "int64"))


@pytest.mark.parametrize("kind", KINDS)
def test_padding_gets_exactly_zero_weight_and_rows_sum_to_one(kind):
    q, k = sizes(kind)
    attn = make(kind, q, k)
    ctx, w = build(attn, q, k)
    got_ctx, got_w = ur.compile([ctx, w], backend="numpy")(**feeds(q, k), **attn.state_dict())
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    assert got_w.shape == (B, T) and got_ctx.shape == (B, k)
    assert np.all(got_w[pad] == 0.0)                  # exact zeros, not tiny numbers
    assert np.all(got_w[~pad] > 0.0)
    np.testing.assert_allclose(got_w.sum(1), 1.0, rtol=1e-14)
    assert np.all(got_w[2] == [1, 0, 0, 0, 0])        # a source of length 1 attends to its one position
    enc = feeds(q, k)["enc"]
    np.testing.assert_allclose(got_ctx, np.einsum("bt,tbk->bk", got_w, enc), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_first_and_a_bool_mask_give_the_same_result(kind):
    q, k = sizes(kind)
    time_major, batch_major = make(kind, q, k), make(kind, q, k, batch_first=True)
    batch_major.load_state_dict({k_[len(time_major.prefix):]: v for k_, v in time_major.state_dict().items()})
    a = ur.compile(list(build(time_major, q, k)), backend="numpy")(**feeds(q, k), **time_major.state_dict())
    f = feeds(q, k, batch_first=True)
    mask = np.arange(T)[None, :] < LENGTHS[:, None]
    run = ur.compile(list(build(batch_major, q, k, batch_first=True, use_mask=True)), backend="numpy")
    b = run(enc=f["enc"], q=f["q"], mask=mask, **batch_major.state_dict())
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12)


def test_a_fully_masked_row_gives_zeros_not_nan():
    attn = make("additive")
    ctx, w = build(attn, Q, K, use_mask=True)
    f = feeds(Q, K)
    mask = np.ones((B, T), bool)
    mask[1] = False
    got_ctx, got_w = ur.compile([ctx, w], backend="numpy")(enc=f["enc"], q=f["q"], mask=mask, **attn.state_dict())
    assert np.all(got_w[1] == 0) and np.all(got_ctx[1] == 0) and np.isfinite(got_w).all()


# ---- gradients ------------------------------------------------------------------------------------

def _loss(attn, q: int, k: int):
    ctx, w = build(attn, q, k)
    r_ctx = ur.const(np.random.default_rng(7).standard_normal((B, k)), None, "float64")
    r_w = ur.const(np.random.default_rng(8).standard_normal((B, T)), None, "float64")
    return ur.sum(ctx * r_ctx) + ur.sum(w * r_w)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_torch_written_the_same_way(kind):
    torch = pytest.importorskip("torch")
    q, k = sizes(kind)
    attn = make(kind, q, k)
    f = feeds(q, k)
    loss = _loss(attn, q, k)
    enc_node, q_node = ur.input("enc", (T, B, k), "float64"), ur.input("q", (B, q), "float64")
    params = attn.parameters()
    out = ur.compile([loss, *ur.grad(loss, [*params, enc_node, q_node])], backend="numpy")(**f, **attn.state_dict())

    # the same module in torch: nn.Linear layers (or a weight) under the same names, masked softmax
    values = {name: torch.tensor(v, requires_grad=True) for name, v in attn.state_dict().items()}
    enc = torch.tensor(f["enc"], requires_grad=True)
    query = torch.tensor(f["q"], requires_grad=True)
    if kind == "additive":
        keys = enc @ values["key_layer.weight"].T                              # (T, B, A)
        e = (torch.tanh(keys + (query @ values["query_layer.weight"].T)[None]) @ values["energy.weight"].T)[..., 0]
    elif kind == "dot":
        e = (enc * query[None]).sum(-1)
    else:
        e = ((enc @ values["weight"].T) * query[None]).sum(-1)
    valid = torch.arange(T)[:, None] < torch.tensor(LENGTHS)[None, :]          # (T, B)
    w = torch.softmax(e.masked_fill(~valid, float("-inf")), dim=0)
    ctx = (w[..., None] * enc).sum(0)
    r_ctx = torch.tensor(np.random.default_rng(7).standard_normal((B, k)))
    r_w = torch.tensor(np.random.default_rng(8).standard_normal((B, T)))
    torch_loss = (ctx * r_ctx).sum() + (w.T * r_w).sum()
    torch_loss.backward()
    assert abs(out[0] - torch_loss.item()) <= 1e-12 * abs(torch_loss.item())
    theirs = [values[p.name].grad.numpy() for p in params] + [enc.grad.numpy(), query.grad.numpy()]
    for name, got, want in zip([p.name for p in params] + ["enc", "q"], out[1:], theirs):
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        assert err <= 1e-10, f"{kind} {name}: relative error {err:.3g}"
    assert np.all(enc.grad.numpy()[LENGTHS[None, :] <= np.arange(T)[:, None]] == 0)  # padding: no gradient


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind):
    q, k = sizes(kind)
    attn = make(kind, q, k)
    f = feeds(q, k, seed=3)
    loss = _loss(attn, q, k)
    wrt = [*attn.parameters(), ur.input("q", (B, q), "float64")]
    run = ur.compile([loss, *ur.grad(loss, wrt)], backend="numpy")
    point = {**f, **attn.state_dict()}
    _, *grads = run(**point)
    rng = np.random.default_rng(1)
    for node, g in zip(wrt, grads):
        direction = rng.standard_normal(g.shape)
        eps = 1e-6
        plus = {**point, node.name: point[node.name] + eps * direction}
        minus = {**point, node.name: point[node.name] - eps * direction}
        numeric = (run(**plus)[0] - run(**minus)[0]) / (2 * eps)
        assert numeric == pytest.approx(float(np.sum(g * direction)), rel=1e-6, abs=1e-9), node.name


# ---- bad input ------------------------------------------------------------------------------------

def test_an_empty_source_length_is_refused_when_the_step_runs():
    attn = make("additive")
    ctx, _ = build(attn, Q, K)
    run = ur.compile(ctx, backend="numpy")
    f = feeds(Q, K)
    with pytest.raises(ur.FeedValueError, match=r"lengths\[1\] = 0.*1 <= length <= 5"):
        run(**{**f, "lens": np.array([5, 0, 1])}, **attn.state_dict())
    with pytest.raises(ur.FeedValueError, match=r"lengths\[0\] = 6, which exceeds the 5 steps"):
        run(**{**f, "lens": np.array([6, 2, 1])}, **attn.state_dict())


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="score 'dot' needs query_size == key_size, found query_size=6 and key_size=4"):
        ur.nn.LuongAttention(6, 4, "dot")
    with pytest.raises(ValueError, match="score expected one of 'dot', 'general', found 'concat'"):
        ur.nn.LuongAttention(6, 4, "concat")
    attn = make("additive")
    enc, query = ur.input("enc", (T, B, K), "float64"), ur.input("q", (B, Q), "float64")
    with pytest.raises(ur.ShapeError, match=r"mask expected a bool \(B, T_src\) = \(3, 5\) tensor, found"):
        attn(enc, query, mask=ur.input("m", (T, B), "bool"))
    with pytest.raises(ur.ShapeError, match="query"):
        attn(enc, ur.input("q2", (B, Q + 1), "float64"))
    with pytest.raises(ur.ShapeError, match="empty source: encoder_outputs has 0 time steps"):
        attn(ur.input("e0", (0, B, K), "float64"), query)
    with pytest.raises(ValueError, match="not both"):
        attn(enc, query, mask=ur.input("m2", (B, T), "bool"), lengths=ur.input("l", (B,), "int64"))


# ---- the GNMT-style model -------------------------------------------------------------------------

def _gnmt_graph(model, Ts=6, Tt=4, batch=2):
    src, lens = ur.input("src", (Ts, batch), "int32"), ur.input("src_lens", (batch,), "int64")
    tin, tgt = ur.input("tin", (Tt, batch), "int32"), ur.input("tgt", (Tt, batch), "int32")
    tmask = ur.input("tmask", (Tt, batch), "bool")
    logits, weights = model(src, lens, tin)
    return logits, weights, ur.nn.cross_entropy(logits, tgt, mask=tmask)


def _gnmt_feeds(seed=0, Ts=6, Tt=4, batch=2):
    rng = np.random.default_rng(seed)
    return {"src": rng.integers(0, 9, (Ts, batch)).astype(np.int32), "src_lens": np.array([6, 3]),
            "tin": rng.integers(0, 7, (Tt, batch)).astype(np.int32),
            "tgt": rng.integers(0, 7, (Tt, batch)).astype(np.int32),
            "tmask": np.arange(Tt)[:, None] < np.array([4, 2])[None, :]}


def test_gnmt_names_residual_stack_and_padding_is_ignored():
    model = ur.nn.GNMT(9, 7, 5, embed=3, layers=3, dtype="float64")
    logits, weights, _ = _gnmt_graph(model)
    names = list(model.state_dict())
    assert "encoder.0.weight_ih_l0_reverse" in names and "encoder.2.weight_hh_l0" in names
    assert "decoder.2.weight_ih" in names and "attention.key_layer.weight" in names
    assert model.state_dict()["decoder.1.weight_ih"].shape == (20, 10)   # [h_0; context] -> 4H
    run = ur.compile([logits, weights], backend="numpy")
    f = _gnmt_feeds()
    a = run(**{k: v for k, v in f.items() if k in run.input_names}, **model.state_dict())
    f["src"][3:, 1] = 8                                  # other tokens in the padding of source 1
    b = run(**{k: v for k, v in f.items() if k in run.input_names}, **model.state_dict())
    np.testing.assert_array_equal(a[0], b[0])
    assert np.all(a[1][:, 1, 3:] == 0.0)                 # no attention on the padding


def test_gnmt_gradient_matches_a_finite_difference():
    model = ur.nn.GNMT(9, 7, 4, embed=3, layers=3, attention="general", dtype="float64")
    *_, loss = _gnmt_graph(model)
    params = model.parameters()
    run = ur.compile([loss, *ur.grad(loss, params)], backend="numpy")
    point = {**_gnmt_feeds(), **model.state_dict()}
    _, *grads = run(**point)
    rng = np.random.default_rng(2)
    direction = {p.name: rng.standard_normal(p.shape) for p in params}
    eps = 1e-6
    shifted = [run(**{**point, **{k: point[k] + s * eps * d for k, d in direction.items()}})[0] for s in (1, -1)]
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    analytic = sum(float(np.sum(g * direction[p.name])) for p, g in zip(params, grads))
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_gnmt_refuses_bad_arguments():
    with pytest.raises(ValueError, match="layers expected an int >= 2"):
        ur.nn.GNMT(9, 7, 4, layers=1)
    with pytest.raises(ValueError, match="attention expected one of 'additive', 'dot', 'general', found 'x'"):
        ur.nn.GNMT(9, 7, 4, attention="x")


def test_gnmt_refuses_source_lengths_beyond_the_compiled_maximum_and_empty_sources():
    model = ur.nn.GNMT(9, 7, 4, embed=3, layers=2, dtype="float64")
    logits, _, _ = _gnmt_graph(model)
    run = ur.compile(logits, backend="numpy")
    f = {k: v for k, v in _gnmt_feeds().items() if k in run.input_names}
    for lens, message in ((np.array([7, 3]), r"lengths\[0\] = 7, which exceeds the 6 steps"),
                          (np.array([6, 0]), r"lengths\[1\] = 0")):
        with pytest.raises(ur.FeedValueError, match=message):
            run(**{**f, "src_lens": lens}, **model.state_dict())
    with pytest.raises(ur.FeedError, match="src"):
        run(**{**f, "src": np.zeros((7, 2), np.int32)}, **model.state_dict())
