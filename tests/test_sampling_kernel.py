"""schedules/sampling.py: the compiled top-k / top-p sampler against device/sampling.py's rule."""
import numpy as np
import pytest
import tvm

from device.sampling import filter_logits, keep_mask
from schedules.sampling import sample_rows

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def sampler(N, V):
    ex = tvm.compile(tvm.IRModule({"f": sample_rows(N, V).with_attr("global_symbol", "f")}), target=TARGET)

    def draw(logits, u, top_k, top_p):
        out = tvm.runtime.empty((N,), "int32")
        ex["f"](tvm.runtime.tensor(logits.astype(np.float32)), tvm.runtime.tensor(u.astype(np.float32)),
                tvm.runtime.tensor(np.array([top_k, top_p], np.float32)), out)
        return out.numpy()
    return draw


@pytest.mark.parametrize("V", [50, 1001, 1024])   # 50 and 1001: rows that end in a part of a vector
def test_draws_stay_in_the_filtered_set_and_greedy_is_the_first_argmax(V):
    N = 64
    rng = np.random.default_rng(V)
    logits = (rng.standard_normal((N, V)) * 3).astype(np.float32)
    logits[0] = 1.5                       # a row of ties
    logits[1, [3, V - 1]] = 20.0          # two equal maxima: greedy takes the first
    logits[2] = -np.abs(logits[2]) - 50   # every logit negative and far from 0
    draw = sampler(N, V)
    assert np.array_equal(draw(logits, np.zeros(N), 1, 0.0), logits.argmax(axis=-1))
    for top_k, top_p in [(0, 0.0), (7, 0.0), (0, 0.8), (7, 0.8), (V - 1, 0.95), (V + 5, 0.5), (1000, 0.95)]:
        keep = keep_mask(logits, top_k, top_p)
        for u in (np.zeros(N), np.full(N, 0.999999), rng.random(N)):
            tok = draw(logits, u, top_k, top_p)
            assert keep[np.arange(N), tok].all(), (top_k, top_p)


@pytest.mark.parametrize("top_k, top_p", [(7, 0.0), (7, 0.8), (40, 0.95), (0, 0.0), (0, 0.5)])
def test_draws_follow_the_filtered_distribution(top_k, top_p):
    row = (np.random.default_rng(2).standard_normal(50) * 2).astype(np.float32)
    f = filter_logits(row, top_k, top_p).astype(np.float64)
    want = np.exp(f - f.max())
    want /= want.sum()
    N = 40000
    tok = sampler(N, 50)(np.repeat(row[None], N, 0), np.random.default_rng(0).random(N), top_k, top_p)
    freq = np.bincount(tok, minlength=50) / N
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    assert np.abs(freq - want).max() < 0.01


def test_a_token_depends_only_on_its_row_and_quantile():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((32, 200)) * 2).astype(np.float32)
    u = rng.random(32)
    one = sampler(32, 200)(logits, u, 20, 0.9)
    shuffled = np.random.default_rng(5).permutation(32)
    assert np.array_equal(sampler(32, 200)(logits[shuffled], u[shuffled], 20, 0.9), one[shuffled])
