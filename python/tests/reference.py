"""Plain NumPy references of the three ops, float64, written from the equations
(docs/math.md) with explicit loops and solves, independent of the C++ code.

Every function takes one (batch, head) slice or loops over the batch and heads
itself; the batched forms take (B, H, T, d) arrays like the package.
"""

import numpy as np


def linear_forward(q, k, v, S0=None):
    """o_t = S_t q_t, S_t = S_0 + sum_{i<=t} v_i k_i^T. Returns (out, S_T)."""
    B, H, T, d = q.shape
    dv = v.shape[3]
    out = np.zeros((B, H, T, dv))
    final = np.zeros((B, H, dv, d))
    for b in range(B):
        for h in range(H):
            S = np.zeros((dv, d)) if S0 is None else np.array(S0[b, h], dtype=np.float64)
            for t in range(T):
                S = S + np.outer(v[b, h, t], k[b, h, t])
                out[b, h, t] = S @ q[b, h, t]
            final[b, h] = S
    return out, final


def softmax_forward(q, k, v, K0=None, V0=None):
    """o_t = sum_{i <= P + t} softmax(q_t . k_i / sqrt(d)) v_i over [K0; k], [V0; v]."""
    B, H, T, d = q.shape
    dv = v.shape[3]
    out = np.zeros((B, H, T, dv))
    for b in range(B):
        for h in range(H):
            K = k[b, h] if K0 is None else np.concatenate([K0[b, h], k[b, h]])
            V = v[b, h] if V0 is None else np.concatenate([V0[b, h], v[b, h]])
            P = 0 if K0 is None else K0.shape[2]
            for t in range(T):
                s = np.array([q[b, h, t] @ K[i] for i in range(P + t + 1)]) / np.sqrt(d)
                a = np.exp(s - s.max())
                a /= a.sum()
                out[b, h, t] = sum(a[i] * V[i] for i in range(P + t + 1))
    return out


def _per_head(x, H):
    x = np.asarray(x, dtype=np.float64)
    return np.full(H, float(x)) if x.ndim == 0 else x


def mesa_forward(q, k, v, lam, forget=1.0, R0=None, S0=None, regularizer="decaying"):
    """o_t = S_t P_t^{-1} q_t with P_t = gamma P_{t-1} + k_t k_t^T (+ (1 - gamma)/lam I for
    the constant regulariser), P_0 = I/lam or R0^{-1}, S_t = gamma S_{t-1} + v_t k_t^T,
    solved directly at every t (np.linalg.solve). Returns (out, (R_T, S_T))."""
    B, H, T, d = q.shape
    dv = v.shape[3]
    lam = _per_head(lam, H)
    forget = _per_head(forget, H)
    out = np.zeros((B, H, T, dv))
    RT = np.zeros((B, H, d, d))
    ST = np.zeros((B, H, dv, d))
    for b in range(B):
        for h in range(H):
            g, lm = forget[h], lam[h]
            P = np.eye(d) / lm if R0 is None else np.linalg.inv(R0[b, h])
            S = np.zeros((dv, d)) if S0 is None else np.array(S0[b, h], dtype=np.float64)
            for t in range(T):
                P = g * P + np.outer(k[b, h, t], k[b, h, t])
                if regularizer == "constant":
                    P = P + (1.0 - g) / lm * np.eye(d)
                S = g * S + np.outer(v[b, h, t], k[b, h, t])
                out[b, h, t] = S @ np.linalg.solve(P, q[b, h, t])
            RT[b, h] = np.linalg.inv(P)
            ST[b, h] = S
    return out, (RT, ST)


def numerical_gradient(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every entry of the float64 array x (in place)."""
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
