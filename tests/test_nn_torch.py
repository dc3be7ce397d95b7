"""ur.nn against PyTorch 2.13 (CPU): same state_dict, same outputs (numpy reference backend)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unroll as ur
from unroll.bench import torch_tcn

torch = pytest.importorskip("torch")
from torch_reference import KINDS, TORCH_DTYPE  # noqa: E402

F = torch.nn.functional
torch.set_num_threads(1)

TOL = {"float32": 1e-5, "float64": 1e-12}


def to_numpy(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in state.items()}


def assert_close(ours, theirs, dtype: str) -> None:
    """Norm-wise relative error: max |ours - theirs| / max |theirs| (elementwise relative error is
    meaningless for entries near zero)."""
    for a, b in zip(ours, theirs, strict=True):
        b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        err = np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30)
        assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def run(outputs, **feeds):
    return ur.compile(list(outputs), backend="numpy")(**feeds)


# ---- RNN / LSTM / GRU ---------------------------------------------------------------------------

recurrent_cases = st.fixed_dictionaries({
    "T": st.integers(1, 6), "B": st.integers(1, 3), "I": st.integers(1, 5), "H": st.integers(1, 6),
    "layers": st.integers(1, 2), "with_state": st.booleans(), "bias": st.booleans(),
    "dtype": st.sampled_from(["float32", "float32", "float64"]), "seed": st.integers(0, 2**16),
    "batch_first": st.booleans(), "proj": st.integers(0, 3),
})


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=10)
@given(case=recurrent_cases)
def test_recurrent_matches_torch(kind: str, bidirectional: bool, case: dict) -> None:
    ours_cls, torch_cls = KINDS[kind]
    T, B, I, H, L, dtype = case["T"], case["B"], case["I"], case["H"], case["layers"], case["dtype"]
    torch.manual_seed(case["seed"])
    lstm = kind == "lstm"
    extra = {"batch_first": case["batch_first"]}
    if lstm and case["proj"] < H:
        extra["proj_size"] = case["proj"]  # torch's weight_hr_l{k}; h is proj_size wide
    ref = torch_cls(I, H, num_layers=L, bias=case["bias"], bidirectional=bidirectional,
                    **extra).to(TORCH_DTYPE[dtype])
    model = ours_cls(I, H, num_layers=L, bias=case["bias"], bidirectional=bidirectional, dtype=dtype, **extra)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(to_numpy(ref.state_dict()))

    rng = np.random.default_rng(case["seed"])
    D = 2 if bidirectional else 1
    H_out = extra.get("proj_size") or H
    x_shape = (B, T, I) if case["batch_first"] else (T, B, I)
    feeds = {"x": rng.standard_normal(x_shape).astype(dtype)}
    x = ur.input("x", x_shape, dtype)
    if case["with_state"]:
        names = ["h0", "c0"] if lstm else ["h0"]
        shapes = {"h0": (L * D, B, H_out), "c0": (L * D, B, H)}
        for n in names:
            feeds[n] = rng.standard_normal(shapes[n]).astype(dtype)
        state = [ur.input(n, shapes[n], dtype) for n in names]
        out, final = model(x, tuple(state) if lstm else state[0])
        with torch.no_grad():
            t_out, t_final = ref(torch.from_numpy(feeds["x"]),
                                 tuple(torch.from_numpy(feeds[n]) for n in names) if lstm
                                 else torch.from_numpy(feeds["h0"]))
    else:
        out, final = model(x)
        with torch.no_grad():
            t_out, t_final = ref(torch.from_numpy(feeds["x"]))
    finals, t_finals = (list(final), list(t_final)) if lstm else ([final], [t_final])
    values = run([out, *finals], **feeds, **model.state_dict())
    assert_close(values, [t_out, *t_finals], dtype)


@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched_input_matches_torch(kind: str) -> None:
    ours_cls, torch_cls = KINDS[kind]
    torch.manual_seed(1)
    ref = torch_cls(3, 4, num_layers=2, bidirectional=True)
    model = ours_cls(3, 4, num_layers=2, bidirectional=True)
    model.load_state_dict(to_numpy(ref.state_dict()))
    xv = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    out, final = model(ur.input("x", (5, 3)))
    with torch.no_grad():
        t_out, t_final = ref(torch.from_numpy(xv))
    finals, t_finals = (list(final), list(t_final)) if kind == "lstm" else ([final], [t_final])
    assert_close(run([out, *finals], x=xv, **model.state_dict()), [t_out, *t_finals], "float32")


# ---- TCN and its convolutions ---------------------------------------------------------------------

@settings(max_examples=12)
@given(T=st.integers(1, 12), B=st.integers(1, 3), I=st.integers(1, 4),
       channels=st.lists(st.integers(1, 5), min_size=2, max_size=3), k=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_tcn_matches_torch(T, B, I, channels, k, dtype, seed) -> None:
    torch.manual_seed(seed)
    ref = torch_tcn(torch, I, channels, k, seq_first=True).to(TORCH_DTYPE[dtype])
    model = ur.nn.TCN(I, channels, kernel_size=k, dtype=dtype)
    assert list(model.state_dict()) == list(ref.state_dict())
    # torch's default init makes the blocks do visible work (ours starts at N(0, 0.01) like Bai's)
    model.load_state_dict(to_numpy(ref.state_dict()))
    xv = np.random.default_rng(seed).standard_normal((T, B, I)).astype(dtype)
    y = model(ur.input("x", (T, B, I), dtype))
    with torch.no_grad():
        assert_close(run([y], x=xv, **model.state_dict()), [ref(torch.from_numpy(xv))], dtype)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=15)
@given(T=st.integers(1, 9), B=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 4),
       k=st.integers(1, 4), d=st.integers(1, 3), causal=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv1d_matches_torch(T, B, cin, cout, k, d, causal, bias, seed) -> None:
    torch.manual_seed(seed)
    pad = (k - 1) * d
    ref = torch.nn.Conv1d(cin, cout, k, dilation=d, bias=bias, padding=pad if causal else "same")
    conv = ur.nn.Conv1d(cin, cout, k, dilation=d, causal=causal, bias=bias)
    conv.load_state_dict(to_numpy(ref.state_dict()))
    xv = np.random.default_rng(seed).standard_normal((T, B, cin)).astype(np.float32)
    with torch.no_grad():
        t_y = ref(torch.from_numpy(xv).permute(1, 2, 0))[:, :, :T].permute(2, 0, 1)
    assert_close(run([conv(ur.input("x", (T, B, cin)))], x=xv, **conv.state_dict()), [t_y], "float32")


# ---- Linear, Embedding --------------------------------------------------------------------------

@settings(max_examples=15)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), fin=st.integers(1, 5),
       fout=st.integers(1, 5), bias=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**16))
def test_linear_matches_torch(lead, fin, fout, bias, dtype, seed) -> None:
    torch.manual_seed(seed)
    ref = torch.nn.Linear(fin, fout, bias=bias).to(TORCH_DTYPE[dtype])
    lin = ur.nn.Linear(fin, fout, bias=bias, dtype=dtype)
    assert list(lin.state_dict()) == list(ref.state_dict())
    lin.load_state_dict(to_numpy(ref.state_dict()))
    xv = np.random.default_rng(seed).standard_normal((*lead, fin)).astype(dtype)
    with torch.no_grad():
        t_y = ref(torch.from_numpy(xv))
    assert_close(run([lin(ur.input("x", xv.shape, dtype))], x=xv, **lin.state_dict()), [t_y], dtype)


@settings(max_examples=15)
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), num=st.integers(1, 7),
       dim=st.integers(1, 5), id_dtype=st.sampled_from(["int32", "int64"]), seed=st.integers(0, 2**16))
def test_embedding_matches_torch(shape, num, dim, id_dtype, seed) -> None:
    torch.manual_seed(seed)
    ref = torch.nn.Embedding(num, dim)
    emb = ur.nn.Embedding(num, dim)
    emb.load_state_dict(to_numpy(ref.state_dict()))
    ids = np.random.default_rng(seed).integers(0, num, shape).astype(id_dtype)
    with torch.no_grad():
        t_y = ref(torch.from_numpy(ids.astype(np.int64)))
    y = emb(ur.input("ids", shape, id_dtype))
    assert y.shape == (*shape, dim)
    assert_close(run([y], ids=ids, **emb.state_dict()), [t_y], "float32")


# ---- losses -------------------------------------------------------------------------------------

@settings(max_examples=15)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       dtype=st.sampled_from(["float32", "float64"]), reduction=st.sampled_from(["mean", "sum", "none"]),
       seed=st.integers(0, 2**16))
def test_mse_and_bce_match_torch(shape, dtype, reduction, seed) -> None:
    rng = np.random.default_rng(seed)
    pred, target = (rng.standard_normal(shape) * 10).astype(dtype), rng.standard_normal(shape).astype(dtype)
    probs = rng.uniform(0, 1, shape).astype(dtype)
    p, t = ur.input("p", shape, dtype), ur.input("t", shape, dtype)
    ours = run([ur.nn.mse(p, t, reduction), ur.nn.bce_with_logits(p, t, reduction)], p=pred, t=target)
    tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
    assert_close(ours[:1], [F.mse_loss(tp, tt, reduction=reduction)], dtype)
    ours_bce = run([ur.nn.bce_with_logits(p, t, reduction)], p=pred, t=probs)
    assert_close(ours_bce, [F.binary_cross_entropy_with_logits(tp, torch.from_numpy(probs),
                                                                 reduction=reduction)], dtype)


def test_bce_with_logits_is_stable_for_large_logits() -> None:
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], np.float32)
    y = np.array([1.0, 0.0, 1.0, 1.0, 0.0], np.float32)
    p, t = ur.input("p", (5,)), ur.input("t", (5,))
    (ours,) = run([ur.nn.bce_with_logits(p, t, "none")], p=x, t=y)
    assert np.all(np.isfinite(ours))
    assert_close([ours], [F.binary_cross_entropy_with_logits(torch.from_numpy(x), torch.from_numpy(y),
                                                               reduction="none")], "float32")


@settings(max_examples=15)
@given(T=st.integers(1, 5), B=st.integers(1, 3), V=st.integers(2, 6), scale=st.sampled_from([1.0, 100.0]),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_cross_entropy_matches_torch(T, B, V, scale, dtype, seed) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((T, B, V)) * scale).astype(dtype)
    targets = rng.integers(0, V, (T, B)).astype(np.int32)
    targets[0, 0] = -100  # torch's default ignore_index
    lg, tg = ur.input("logits", (T, B, V), dtype), ur.input("targets", (T, B), "int32")
    flat_l = torch.from_numpy(logits.reshape(-1, V))
    flat_t = torch.from_numpy(targets.reshape(-1).astype(np.int64))
    if T * B > 1:  # with every position ignored the mean is 0/0 in both
        (ours,) = run([ur.nn.cross_entropy(lg, tg, ignore_index=-100)], logits=logits, targets=targets)
        assert_close([ours], [F.cross_entropy(flat_l, flat_t, ignore_index=-100)], dtype)
    summed = ur.nn.cross_entropy(lg, tg, ignore_index=-100, reduction="sum")
    (ours,) = run([summed], logits=logits, targets=targets)
    assert_close([ours], [F.cross_entropy(flat_l, flat_t, ignore_index=-100, reduction="sum")], dtype)
    # classes on axis 1, torch's own layout (N, C, d)
    logits_ncd = np.ascontiguousarray(logits.transpose(1, 2, 0))
    targets_nd = np.abs(targets.T).copy() % V
    lg2, tg2 = ur.input("l2", (B, V, T), dtype), ur.input("t2", (B, T), "int32")
    (ours,) = run([ur.nn.cross_entropy(lg2, tg2, axis=1, reduction="none")], l2=logits_ncd, t2=targets_nd)
    assert_close([ours], [F.cross_entropy(torch.from_numpy(logits_ncd), torch.from_numpy(targets_nd).long(),
                                          reduction="none")], dtype)


def test_cross_entropy_mask_equals_ignore_index() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 2, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (4, 2)).astype(np.int32)
    mask = rng.uniform(size=(4, 2)) < 0.6
    mask[0, 0] = True
    lg, tg, mk = ur.input("l", (4, 2, 5)), ur.input("t", (4, 2), "int32"), ur.input("m", (4, 2), "bool")
    (ours,) = run([ur.nn.cross_entropy(lg, tg, mask=mk)], l=logits, t=targets, m=mask)
    ignored = np.where(mask, targets, -100).reshape(-1)
    ref = F.cross_entropy(torch.from_numpy(logits.reshape(-1, 5)), torch.from_numpy(ignored).long())
    assert_close([ours], [ref], "float32")


# ---- structures ---------------------------------------------------------------------------------

def test_encoder_decoder_teacher_forcing_and_greedy_match_torch() -> None:
    T, T2, B, V, E, H, L = 5, 4, 3, 7, 4, 6, 2
    torch.manual_seed(0)
    t_emb, t_enc, t_dec = torch.nn.Embedding(V, E), torch.nn.GRU(E, H, L), torch.nn.GRU(E, H, L)
    t_head = torch.nn.Linear(H, V)

    class Seq2Seq(ur.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.enc, self.dec = ur.nn.Embedding(V, E), ur.nn.GRU(E, H, L), ur.nn.GRU(E, H, L)
            self.head = ur.nn.Linear(H, V)
    model = Seq2Seq()
    parts = {"emb": t_emb, "enc": t_enc, "dec": t_dec, "head": t_head}
    model.load_state_dict({f"{p}.{k}": v for p, m in parts.items()
                           for k, v in to_numpy(m.state_dict()).items()})
    rng = np.random.default_rng(0)
    src_v, tgt_v = rng.integers(0, V, (T, B)).astype(np.int32), rng.integers(0, V, (T2, B)).astype(np.int32)
    start_v = rng.integers(0, V, (B,)).astype(np.int32)
    src, tgt = ur.input("src", (T, B), "int32"), ur.input("tgt", (T2, B), "int32")
    start = ur.input("start", (B,), "int32")
    logits = ur.nn.teacher_forcing(model.enc, model.dec, model.head, model.emb(src), model.emb(tgt))
    _, state = model.enc(model.emb(src))
    g_logits, g_ids = ur.nn.greedy_decode(model.dec, model.head, model.emb, state, start, length=6)
    values = run([logits, g_logits, g_ids], src=src_v, tgt=tgt_v, start=start_v, **model.state_dict())

    with torch.no_grad():
        _, h = t_enc(t_emb(torch.from_numpy(src_v).long()))
        out, _ = t_dec(t_emb(torch.from_numpy(tgt_v).long()), h)
        ref_logits = t_head(out)
        ids, all_logits, all_ids = torch.from_numpy(start_v).long(), [], []
        for _ in range(6):
            o, h = t_dec(t_emb(ids)[None], h)
            step_logits = t_head(o[0])
            ids = step_logits.argmax(-1)
            all_logits.append(step_logits)
            all_ids.append(ids)
    assert_close(values[:2], [ref_logits, torch.stack(all_logits)], "float32")
    np.testing.assert_array_equal(values[2], torch.stack(all_ids).numpy())


def test_one_to_many_matches_torch_loop() -> None:
    B, I, H, steps = 2, 3, 5, 7
    torch.manual_seed(0)
    t_cond, t_lstm, t_head = torch.nn.Linear(4, H), torch.nn.LSTM(I, H), torch.nn.Linear(H, I)
    cond, lstm = ur.nn.Linear(4, H, name="cond"), ur.nn.LSTM(I, H, name="lstm")
    head = ur.nn.Linear(H, I, name="head")
    for ours, ref in [(cond, t_cond), (lstm, t_lstm), (head, t_head)]:
        ours.load_state_dict(to_numpy(ref.state_dict()))  # keys relative to each module's name
    rng = np.random.default_rng(0)
    vec_v = rng.standard_normal((B, 4)).astype(np.float32)
    x0_v = rng.standard_normal((B, I)).astype(np.float32)
    vec, x0 = ur.input("vec", (B, 4)), ur.input("x0", (B, I))
    ys, (h_n, c_n) = ur.nn.one_to_many(lstm, head, ur.nn.state_from(lstm, ur.tanh(cond(vec))), x0, steps)
    params = {**cond.state_dict(), **lstm.state_dict(), **head.state_dict()}
    values = run([ys, h_n, c_n], vec=vec_v, x0=x0_v, **params)
    with torch.no_grad():
        h = torch.tanh(t_cond(torch.from_numpy(vec_v)))[None]
        state, x, outs = (h, torch.zeros_like(h)), torch.from_numpy(x0_v), []
        for _ in range(steps):
            o, state = t_lstm(x[None], state)
            x = t_head(o[0])
            outs.append(x)
    assert_close(values, [torch.stack(outs), *state], "float32")


def test_many_to_one_and_many_to_many_match_torch() -> None:
    T, B, I, H, O = 6, 2, 3, 4, 2
    torch.manual_seed(0)
    t_rnn, t_head = torch.nn.RNN(I, H, bidirectional=True), torch.nn.Linear(2 * H, O)
    rnn, head = ur.nn.RNN(I, H, bidirectional=True, name="rnn"), ur.nn.Linear(2 * H, O, name="head")
    rnn.load_state_dict(to_numpy(t_rnn.state_dict()))
    head.load_state_dict(to_numpy(t_head.state_dict()))
    xv = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    out, _ = rnn(ur.input("x", (T, B, I)))
    outs = [ur.nn.many_to_many(out, head), ur.nn.many_to_one(out, head), ur.nn.many_to_one(out, head, "mean")]
    values = run(outs, x=xv, **rnn.state_dict(), **head.state_dict())
    with torch.no_grad():
        t_out, _ = t_rnn(torch.from_numpy(xv))
        refs = [t_head(t_out), t_head(t_out[-1]), t_head(t_out.mean(0))]
    assert_close(values, refs, "float32")
