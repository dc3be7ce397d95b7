"""The README's "Backprop through time" section, runnable: grad, truncate and the bias report."""
import numpy as np
import unroll as ur

T, B, I, H = 40, 8, 4, 16
x = ur.input("x", (T, B, I))
y = ur.input("y", (T, B, H))
lstm = ur.nn.LSTM(I, H)
out, _ = lstm(x)
loss = ur.nn.mse(out, y)

grads = ur.grad(loss, lstm.parameters())                  # full BPTT: a reversed loop in the IR
tgrads = ur.grad(ur.truncate(loss, 10), lstm.parameters())  # truncated BPTT, k = 10
step = ur.compile([loss, *grads])                          # forward loop + backward loop

rng = np.random.default_rng(0)
feeds = dict(x=rng.normal(size=(T, B, I)), y=rng.normal(size=(T, B, H)) * 0.1, **lstm.state_dict())
loss_value, *grad_values = step(**feeds)
print("loss", loss_value, "|dW_hh|", np.linalg.norm(grad_values[2]))
for k, bias in ur.truncation_bias(loss, lstm.parameters(), [1, 5, 10, 20, 40], feeds).items():
    print(f"k={k:3d}  |g_trunc - g_full| / |g_full| = {bias:.3e}")

# the backward loop of a small tanh RNN, as printed IR
xs = ur.input("xs", (5, 2, 3))
W, U = ur.param("W", (3, 4), 0.5), ur.param("U", (4, 4), 0.5)
hT, hs = ur.scan(lambda h, x_t: (ur.tanh(x_t @ W + h @ U),) * 2, ur.zeros((2, 4)), xs)
print(ur.graph(*ur.grad(ur.sum(hs), [W, U])))
