"""Gradients against PyTorch 2.13 autograd (CPU) for the ur.nn models: RNN/LSTM/GRU (1-2 layers,
uni/bidirectional), TCN, an LSTM encoder-decoder with teacher forcing, and truncated BPTT of a
stacked LSTM against the detach-per-chunk loop. Relative error <= 1e-4 (float32), 1e-10 (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unroll as ur
from unroll.bench import torch_tcn

torch = pytest.importorskip("torch")
from torch_reference import KINDS, TORCH_DTYPE  # noqa: E402

torch.set_num_threads(1)

TOL = {"float32": 1e-4, "float64": 1e-10}


def load(model, ref, prefix=""):
    model.load_state_dict({prefix + k: v.detach().numpy() for k, v in ref.state_dict().items()})


def assert_grads_close(ours: dict, theirs: dict, dtype: str) -> None:
    """Norm-wise relative error per tensor: max |ours - theirs| / max |theirs|."""
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
        got = ours[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        err = np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"


def our_grads(loss, wrt: dict, feeds: dict) -> dict:
    """name -> gradient, from value_and_grad compiled with the numpy backend (also checks the loss
    node value_and_grad returns)."""
    value, grads = ur.value_and_grad(loss, list(wrt.values()))
    out = ur.compile([value, *grads], backend="numpy")(**feeds)
    return {"loss": out[0], **dict(zip(wrt, out[1:]))}


def torch_grads(ref_params: dict, loss) -> dict:
    loss.backward()
    return {"loss": loss.detach().numpy(), **{k: p.grad for k, p in ref_params.items()}}


# ---- RNN / LSTM / GRU ----------------------------------------------------------------------------

recurrent_cases = st.fixed_dictionaries({
    "T": st.integers(1, 6), "B": st.integers(1, 3), "I": st.integers(1, 4), "H": st.integers(1, 4),
    "layers": st.integers(1, 2), "with_state": st.booleans(), "loss": st.sampled_from(["mse", "ce"]),
    "dtype": st.sampled_from(["float32", "float64"]), "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=8)
@given(case=recurrent_cases)
def test_recurrent_gradients_match_torch(kind, bidirectional, case):
    ours_cls, torch_cls = KINDS[kind]
    T, B, I, H, L, dtype = case["T"], case["B"], case["I"], case["H"], case["layers"], case["dtype"]
    D, lstm = 2 if bidirectional else 1, kind == "lstm"
    torch.manual_seed(case["seed"])
    ref = torch_cls(I, H, num_layers=L, bidirectional=bidirectional).to(TORCH_DTYPE[dtype])
    model = ours_cls(I, H, num_layers=L, bidirectional=bidirectional, dtype=dtype)
    load(model, ref)
    rng = np.random.default_rng(case["seed"])
    feeds = {"x": rng.standard_normal((T, B, I)).astype(dtype)}
    state_names = (["h0", "c0"] if lstm else ["h0"]) if case["with_state"] else []
    for n in state_names:
        feeds[n] = rng.standard_normal((L * D, B, H)).astype(dtype)

    x = ur.input("x", (T, B, I), dtype)
    states = [ur.input(n, (L * D, B, H), dtype) for n in state_names]
    hx = (tuple(states) if lstm else states[0]) if states else None
    out, final = model(x, hx)
    h_n = final[0] if lstm else final
    t_x = torch.tensor(feeds["x"], requires_grad=True)
    t_states = {n: torch.tensor(feeds[n], requires_grad=True) for n in state_names}
    t_hx = (tuple(t_states.values()) if lstm else t_states["h0"]) if t_states else None
    t_out, t_final = ref(t_x, t_hx)
    t_h_n = t_final[0] if lstm else t_final

    if case["loss"] == "mse":  # every output and the final state matter
        feeds["y"] = rng.standard_normal((T, B, D * H)).astype(dtype)
        loss = ur.nn.mse(out, ur.input("y", (T, B, D * H), dtype)) + ur.mean(h_n * h_n)
        t_loss = torch.nn.functional.mse_loss(t_out, torch.from_numpy(feeds["y"])) + (t_h_n ** 2).mean()
    else:  # classify every step with a linear head
        V = 3
        head, t_head = ur.nn.Linear(D * H, V, dtype=dtype, name="head"), torch.nn.Linear(D * H, V).to(TORCH_DTYPE[dtype])
        load(head, t_head)
        feeds.update(head.state_dict())
        feeds["targets"] = rng.integers(0, V, (T, B)).astype(np.int32)
        loss = ur.nn.cross_entropy(head(out), ur.input("targets", (T, B), "int32"))
        t_loss = torch.nn.functional.cross_entropy(t_head(t_out).reshape(T * B, V),
                                                   torch.from_numpy(feeds["targets"]).long().reshape(-1))
    feeds.update(model.state_dict())
    params = dict(model.named_parameters())
    wrt = {**params, "x": x, **{n: s for n, s in zip(state_names, states)}}
    t_params = {**dict(ref.named_parameters()), "x": t_x, **t_states}
    assert_grads_close(our_grads(loss, wrt, feeds), torch_grads(t_params, t_loss), dtype)


# ---- TCN ----------------------------------------------------------------------------------------------

@settings(max_examples=10)
@given(T=st.integers(1, 10), B=st.integers(1, 3), I=st.integers(1, 4),
       channels=st.lists(st.integers(1, 4), min_size=1, max_size=3), k=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_tcn_gradients_match_torch(T, B, I, channels, k, dtype, seed):
    torch.manual_seed(seed)
    ref = torch_tcn(torch, I, channels, k, seq_first=True).to(TORCH_DTYPE[dtype])
    model = ur.nn.TCN(I, channels, kernel_size=k, dtype=dtype)
    load(model, ref)
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((T, B, I)).astype(dtype),
             "y": rng.standard_normal((T, B, channels[-1])).astype(dtype), **model.state_dict()}
    x = ur.input("x", (T, B, I), dtype)
    loss = ur.nn.mse(model(x), ur.input("y", (T, B, channels[-1]), dtype))
    t_x = torch.tensor(feeds["x"], requires_grad=True)
    t_loss = torch.nn.functional.mse_loss(ref(t_x), torch.from_numpy(feeds["y"]))
    wrt = {**dict(model.named_parameters()), "x": x}
    assert_grads_close(our_grads(loss, wrt, feeds),
                       torch_grads({**dict(ref.named_parameters()), "x": t_x}, t_loss), dtype)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=15)
@given(T=st.integers(1, 9), B=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 4),
       k=st.integers(1, 4), d=st.integers(1, 3), causal=st.booleans(),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_conv1d_gradients_match_torch(T, B, cin, cout, k, d, causal, dtype, seed):
    """Causal and "same" padding: the sum of row-shifted products (nn/conv.py) and its backward,
    including taps that look ahead and sequences shorter than the kernel's reach."""
    torch.manual_seed(seed)
    pad = (k - 1) * d
    ref = torch.nn.Conv1d(cin, cout, k, dilation=d, padding=pad if causal else "same").to(TORCH_DTYPE[dtype])
    conv = ur.nn.Conv1d(cin, cout, k, dilation=d, causal=causal, dtype=dtype)
    load(conv, ref)
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((T, B, cin)).astype(dtype),
             "y": rng.standard_normal((T, B, cout)).astype(dtype), **conv.state_dict()}
    x = ur.input("x", (T, B, cin), dtype)
    loss = ur.nn.mse(conv(x), ur.input("y", (T, B, cout), dtype))
    t_x = torch.tensor(feeds["x"], requires_grad=True)
    t_out = ref(t_x.permute(1, 2, 0))[:, :, :T].permute(2, 0, 1)
    t_loss = torch.nn.functional.mse_loss(t_out, torch.from_numpy(feeds["y"]))
    wrt = {**dict(conv.named_parameters()), "x": x}
    assert_grads_close(our_grads(loss, wrt, feeds),
                       torch_grads({**dict(ref.named_parameters()), "x": t_x}, t_loss), dtype)


# ---- encoder-decoder ---------------------------------------------------------------------------------

@settings(max_examples=6)
@given(T=st.integers(1, 5), T2=st.integers(1, 5), B=st.integers(1, 3), layers=st.integers(1, 2),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_encoder_decoder_gradients_match_torch(T, T2, B, layers, dtype, seed):
    """Embedding -> LSTM encoder -> LSTM decoder (teacher forcing) -> Linear -> cross-entropy."""
    V, E, H = 6, 3, 4
    torch.manual_seed(seed)
    t_parts = {"emb": torch.nn.Embedding(V, E), "enc": torch.nn.LSTM(E, H, layers),
               "dec": torch.nn.LSTM(E, H, layers), "head": torch.nn.Linear(H, V)}
    for m in t_parts.values():
        m.to(TORCH_DTYPE[dtype])

    class Seq2Seq(ur.nn.Module):
        def __init__(self):
            super().__init__(dtype=dtype)
            self.emb, self.head = ur.nn.Embedding(V, E, dtype=dtype), ur.nn.Linear(H, V, dtype=dtype)
            self.enc, self.dec = ur.nn.LSTM(E, H, layers, dtype=dtype), ur.nn.LSTM(E, H, layers, dtype=dtype)
    model = Seq2Seq()
    model.load_state_dict({f"{p}.{k}": v.detach().numpy() for p, m in t_parts.items()
                           for k, v in m.state_dict().items()})
    rng = np.random.default_rng(seed)
    src_v = rng.integers(0, V, (T, B)).astype(np.int32)
    tgt_v = rng.integers(0, V, (T2 + 1, B)).astype(np.int32)
    src, tgt_in, tgt_out = (ur.input(n, s, "int32") for n, s in
                            [("src", (T, B)), ("tgt_in", (T2, B)), ("tgt_out", (T2, B))])
    logits = ur.nn.teacher_forcing(model.enc, model.dec, model.head, model.emb(src), model.emb(tgt_in))
    loss = ur.nn.cross_entropy(logits, tgt_out)
    feeds = {"src": src_v, "tgt_in": tgt_v[:-1], "tgt_out": tgt_v[1:], **model.state_dict()}

    _, state = t_parts["enc"](t_parts["emb"](torch.from_numpy(src_v).long()))
    out, _ = t_parts["dec"](t_parts["emb"](torch.from_numpy(tgt_v[:-1]).long()), state)
    t_logits = t_parts["head"](out)
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, V), torch.from_numpy(tgt_v[1:]).long().reshape(-1))
    t_params = {f"{p}.{k}": v for p, m in t_parts.items() for k, v in m.named_parameters()}
    assert_grads_close(our_grads(loss, dict(model.named_parameters()), feeds),
                       torch_grads(t_params, t_loss), dtype)


# ---- truncated BPTT of a stacked LSTM against the chunked PyTorch loop -----------------------------------

@pytest.mark.parametrize("T,k", [(6, 2), (7, 3), (5, 4), (6, 6)])
def test_truncated_stacked_lstm_matches_torch_detach_per_chunk(T, k):
    B, I, H, L, dtype = 2, 3, 4, 2, "float64"
    torch.manual_seed(T * 10 + k)
    ref = torch.nn.LSTM(I, H, L).double()
    model = ur.nn.LSTM(I, H, L, dtype=dtype)
    load(model, ref)
    rng = np.random.default_rng(k)
    feeds = {"x": rng.standard_normal((T, B, I)), "y": rng.standard_normal((T, B, H)), **model.state_dict()}
    out, _ = model(ur.input("x", (T, B, I), dtype))
    loss = ur.nn.mse(out, ur.input("y", (T, B, H), dtype), reduction="sum")
    ours = our_grads(ur.truncate(loss, k), dict(model.named_parameters()), feeds)

    x, y = torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["y"])
    state, total = None, 0.0
    for c in range(math.ceil(T / k)):  # the PyTorch idiom: k steps, detach, next chunk
        if state is not None:
            state = tuple(s.detach() for s in state)
        chunk_out, state = ref(x[c * k:(c + 1) * k], state)
        total = total + ((chunk_out - y[c * k:(c + 1) * k]) ** 2).sum()
    assert_grads_close(ours, torch_grads(dict(ref.named_parameters()), total), dtype)
