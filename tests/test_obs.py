"""Layer-wise OBS (SparseGPT): closed-form OBS, exact counts, reconstruction against magnitude, N:M,
equivalence with SparseGPT's loop, obs_layerwise on an MLP and a CNN, and bad input."""
import copy
import importlib
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import sparse_modules, sparsify
from sparse_engine.pruning import check_nm, nm_mask, prune_

obs = importlib.import_module("sparse_engine.pruning.second_order.obs")
obs_prune_weight, obs_prune_weight_ref, obs_layerwise = (obs.obs_prune_weight, obs.obs_prune_weight_ref,
                                                      obs.obs_layerwise)


def correlated_inputs(n, cols, dtype=torch.float64, rank=None):
    """n samples of cols correlated features (a random mixing of ``rank`` sources)."""
    rank = cols if rank is None else rank
    return (torch.randn(n, rank, dtype=dtype) @ torch.randn(rank, cols, dtype=dtype)
            + 0.3 * torch.randn(n, 1, dtype=dtype))


def hessian(X):
    return 2.0 / X.shape[0] * X.T @ X


def problem(rows, cols, n=None, dtype=torch.float64):
    X = correlated_inputs(n or 2 * cols + 7, cols, dtype)
    return torch.randn(rows, cols, dtype=dtype), hessian(X), X


def n_kept(numel, sparsity):
    return numel - round(sparsity * numel)


def sparsegpt_loop(W, H, sparsity, blocksize, percdamp, prunen=0, prunem=0):
    """SparseGPT's ``fasterprune`` (IST-DASLab/sparsegpt, sparsegpt.py) line by line in float64;
    only the unstructured mask line differs: the blocks up to column i2 prune
    round_half_up(P * i2 / columns) weights in total (P = round(sparsity * numel)), the smallest
    scores of the block (float32, the earlier element kept on ties), instead of SparseGPT's
    ``int(numel_block * sparsity) + 1``. ``prunen`` of every ``prunem`` columns are pruned."""
    W = W.clone().double()
    H = H.clone().double()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    P = round(sparsity * W.numel())
    pruned_so_far = 0
    keep = torch.ones(rows, columns, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            total = math.floor(Fraction(P * i2, columns) + Fraction(1, 2))
            n_block = total - pruned_so_far
            pruned_so_far = total
            order = torch.sort(tmp.float().flatten(), descending=True, stable=True).indices
            mask1 = torch.ones(tmp.numel(), dtype=torch.bool)
            mask1[order[:tmp.numel() - n_block]] = False
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        keep[:, i1:i2] = ~mask1
    return W, keep


def recon_error(W, W_new, X):
    return ((W - W_new).double() @ X.T.double()).norm().item()


def magnitude_keep(W, kept):
    keep = torch.zeros(W.numel(), dtype=torch.bool)
    keep[W.abs().reshape(-1).topk(kept).indices] = True
    return keep.reshape(W.shape)


# ------------------------------------------------------------------------------------------------
# (a) the closed-form single-weight OBS update

@pytest.mark.parametrize("damp", [0.0, 0.05])
@pytest.mark.parametrize("q", [0, 5, 10])
def test_single_weight_matches_closed_form_obs(q, damp):
    """Pruning one weight q of a one-row problem: SparseGPT fixes the columns before q, so its
    update is OBS on the columns q.. with their Hessian H[q:, q:]; for q = 0 that is plain OBS:
    delta_w = -w_q / [H^-1]_qq H^-1[:, q], loss increase w_q^2 / (2 [H^-1]_qq)."""
    p = 11
    W, H, _ = problem(1, p)
    W[0, q] = 1e-3  # the smallest OBS saliency by far: the one weight pruned
    Hd = H + damp * H.diagonal().mean() * torch.eye(p, dtype=H.dtype)
    W_new, keep = obs_prune_weight(W, H, 1 / p, block_size=128, damp=damp)
    assert keep.sum() == p - 1 and not keep[0, q]
    Hs = torch.linalg.inv(Hd[q:, q:])  # (H restricted to the free columns)^-1
    delta = torch.zeros(p, dtype=H.dtype)
    delta[q:] = -W[0, q] / Hs[0, 0] * Hs[:, 0]
    torch.testing.assert_close(W_new[0] - W[0], delta, rtol=1e-10, atol=1e-13)
    assert W_new[0, q] == 0
    dW = W_new[0] - W[0]
    torch.testing.assert_close(0.5 * dW @ Hd @ dW, W[0, q] ** 2 / (2 * Hs[0, 0]), rtol=1e-9, atol=0)
    if q == 0:
        Hinv = torch.linalg.inv(Hd)
        torch.testing.assert_close(dW, -W[0, 0] / Hinv[0, 0] * Hinv[:, 0], rtol=1e-10, atol=1e-13)


def test_single_weight_update_is_optimal():
    """The OBS update minimises the quadratic loss over all updates that zero weight q: any
    perturbation of the free columns increases it."""
    p, q = 9, 3
    W, H, _ = problem(1, p)
    W[0, q] = 1e-3
    W_new, _ = obs_prune_weight(W, H, 1 / p, damp=0.0)
    loss = lambda w: (0.5 * (w - W[0]) @ H @ (w - W[0])).item()
    base = loss(W_new[0])
    for _ in range(5):
        pert = torch.randn(p, dtype=H.dtype) * 1e-3
        pert[:q + 1] = 0
        assert loss(W_new[0] + pert) > base


# ------------------------------------------------------------------------------------------------
# (b) exact counts

@pytest.mark.parametrize("shape", [(7, 97), (13, 131), (1, 257), (6, 3, 3, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_exact_number_of_nonzeros(shape, sparsity, block_size):
    cols = math.prod(shape[1:])
    W = torch.randn(shape, dtype=torch.float64)
    H = hessian(correlated_inputs(cols + 3, cols))
    W_new, keep = obs_prune_weight(W, H, sparsity, block_size=block_size)
    kept = n_kept(W.numel(), sparsity)
    assert keep.shape == W.shape and keep.dtype == torch.bool
    assert W_new.shape == W.shape and W_new.dtype == W.dtype
    assert int(keep.sum()) == kept
    assert (W_new[~keep] == 0).all()
    assert int(torch.count_nonzero(W_new)) == kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_dtype_and_count(dtype):
    W, H, _ = problem(12, 40)
    W_new, keep = obs_prune_weight(W.to(dtype), H.float(), 0.6, block_size=16)
    assert W_new.dtype == dtype and int(keep.sum()) == n_kept(W.numel(), 0.6)
    assert (W_new[~keep] == 0).all()


@pytest.mark.parametrize("rows,cols,block_size", [(1, 1, 1), (3, 10, 4), (7, 97, 7), (5, 300, 128)])
def test_block_counts_sum_to_the_layer_count(rows, cols, block_size):
    for n_prune in range(0, rows * cols + 1, max(1, rows * cols // 23)):
        counts = obs._block_pruned_counts(n_prune, cols, block_size)
        sizes = [min(i + block_size, cols) - i for i in range(0, cols, block_size)]
        assert sum(counts) == n_prune
        assert all(0 <= c <= rows * s for c, s in zip(counts, sizes))


# ------------------------------------------------------------------------------------------------
# (c) better than magnitude on the same quadratic model

@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_reconstruction_beats_magnitude(sparsity):
    W, H, X = problem(24, 96, n=300)
    W_new, keep = obs_prune_weight(W, H, sparsity, block_size=32, damp=0.01)
    mag = W * magnitude_keep(W, n_kept(W.numel(), sparsity))
    assert recon_error(W, W_new, X) < recon_error(W, mag, X)
    # The same mask with the weights simply zeroed is worse than the OBS update.
    assert recon_error(W, W_new, X) < recon_error(W, W * keep, X)


def test_nm_reconstruction_beats_magnitude_nm():
    W, H, X = problem(24, 96, n=300)
    W_new, keep = obs_prune_weight(W, H, 0.5, block_size=32, nm="2:4")
    mag = W * nm_mask(W.abs(), 2, 4)
    assert recon_error(W, W_new, X) < recon_error(W, mag, X)


def test_float32_matches_float64_reconstruction():
    """The float32 fast path reaches the float64 reference's reconstruction error (1e-3 relative)."""
    W, H, X = problem(64, 256, n=600)
    ref, _ = obs_prune_weight_ref(W, H, 0.7, block_size=64)
    out, keep = obs_prune_weight(W.float(), H.float(), 0.7, block_size=64)
    assert out.dtype == torch.float32 and int(keep.sum()) == n_kept(W.numel(), 0.7)
    e_ref, e_out = recon_error(W, ref, X), recon_error(W, out, X)
    assert abs(e_out - e_ref) <= 1e-3 * e_ref


# ------------------------------------------------------------------------------------------------
# (d) N:M

@pytest.mark.parametrize("nm,block_size", [("2:4", 4), ("2:4", 128), ((1, 4), 12), ("4:8", 16), ("3:7", 7)],
                         ids=["2:4-b4", "2:4-b128", "1:4-b12", "4:8-b16", "3:7-b7"])
def test_nm_pattern_holds(nm, block_size):
    n, m = (int(v) for v in nm.split(":")) if isinstance(nm, str) else nm
    W = torch.randn(11, 5, 1, 2 * m, dtype=torch.float64)  # conv-shaped: 10 * m columns
    cols = W[0].numel()
    H = hessian(correlated_inputs(cols + 5, cols))
    W_new, keep = obs_prune_weight(W, H, 1 - n / m, block_size=block_size, nm=nm)
    assert check_nm(keep, n, m, exact=True)
    assert (W_new[~keep] == 0).all() and int(torch.count_nonzero(W_new)) == keep.sum()


# ------------------------------------------------------------------------------------------------
# (e) equivalence with SparseGPT's loop

@pytest.mark.parametrize("block_size", [1, 7, 128])
@pytest.mark.parametrize("shape,sparsity", [((9, 61), 0.5), ((16, 150), 0.83)], ids=["9x61-s0.5", "16x150-s0.83"])
def test_matches_sparsegpt_loop_unstructured(block_size, shape, sparsity):
    W, H, _ = problem(*shape)
    expected_W, expected_keep = sparsegpt_loop(W, H, sparsity, block_size, 0.01)
    for fn in (obs_prune_weight, obs_prune_weight_ref):
        W_new, keep = fn(W, H, sparsity, block_size=block_size, damp=0.01)
        assert torch.equal(keep, expected_keep), fn.__name__
        torch.testing.assert_close(W_new, expected_W, rtol=1e-9, atol=1e-11, msg=fn.__name__)


@pytest.mark.parametrize("nm,block_size", [((2, 4), 4), ((2, 4), 128), ((3, 7), 7)], ids=["2:4-b4", "2:4-b128",
                                                                                        "3:7-b7"])
def test_matches_sparsegpt_loop_nm(nm, block_size):
    n, m = nm
    W, H, _ = problem(10, 14 * m)
    expected_W, expected_keep = sparsegpt_loop(W, H, 1 - n / m, block_size, 0.01, prunen=m - n, prunem=m)
    for fn in (obs_prune_weight, obs_prune_weight_ref):
        W_new, keep = fn(W, H, 1 - n / m, block_size=block_size, nm=nm)
        assert torch.equal(keep, expected_keep), fn.__name__
        torch.testing.assert_close(W_new, expected_W, rtol=1e-9, atol=1e-11, msg=fn.__name__)


def test_dead_inputs_are_zeroed():
    W, H, _ = problem(6, 20)
    dead = [3, 11]
    H[dead, :] = 0
    H[:, dead] = 0
    W_new, keep = obs_prune_weight(W, H, 0.4, block_size=8)
    assert (W_new[:, dead] == 0).all() and int(keep.sum()) == n_kept(W.numel(), 0.4)
    expected_W, expected_keep = sparsegpt_loop(W, H, 0.4, 8, 0.01)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(W_new, expected_W, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------------
# (f) obs_layerwise on models

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


class Recorder:
    """Spy on obs._layer_hessian: each layer's Hessian and its weights before pruning."""

    def __init__(self, monkeypatch):
        self.H, self.W = {}, {}
        original = obs._layer_hessian

        def spy(model, name, layer, calib_data, dtype):
            self.W[name] = layer.weight.detach().clone()
            self.H[name] = original(model, name, layer, calib_data, dtype)
            return self.H[name]

        monkeypatch.setattr(obs, "_layer_hessian", spy)


def layer_inputs(model, layer, batches):
    """The inputs of ``layer`` over ``batches`` in the model as it is now."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    return seen


def test_mlp_layerwise(monkeypatch):
    model = sparsify(mlp().double())
    dense = copy.deepcopy(model)
    batches = [torch.randn(40, 3, 4, 4, dtype=torch.float64) for _ in range(3)]
    rec = Recorder(monkeypatch)
    report = obs_layerwise(model, batches, 0.6, block_size=16)
    for layer in report.layers:
        assert layer.kept == n_kept(layer.numel, 0.6)
    for name, layer in sparse_modules(model):
        # Each Hessian is 2/n X^T X of the inputs coming from the already pruned layers, streamed over batches.
        X = torch.cat(layer_inputs(model, layer, batches))
        X = X.reshape(-1, X.shape[-1])
        torch.testing.assert_close(rec.H[name][0], hessian(X), rtol=1e-10, atol=1e-12)
        W_new, keep = obs_prune_weight(rec.W[name], rec.H[name][0], 0.6, block_size=16)
        assert torch.equal(layer.mask, keep)
        torch.testing.assert_close(layer.weight.detach(), W_new, rtol=0, atol=0)
    # The pruned model still works: closer to the dense outputs than uniform magnitude pruning.
    magnitude = copy.deepcopy(dense)
    prune_(magnitude, 0.6, "magnitude", "uniform")
    x = torch.cat(batches)
    with torch.no_grad():
        ref = dense(x)
        out = model(x)
        assert torch.isfinite(out).all()
        assert (out - ref).norm() < (magnitude(x) - ref).norm()


def test_mlp_layerwise_nm_float32():
    model = sparsify(mlp())
    report = obs_layerwise(model, [(torch.randn(64, 48), torch.zeros(64))], 0.5, block_size=8, pattern="2:4")
    assert report.sparsity == 0.5
    for _, layer in sparse_modules(model):
        assert check_nm(layer.mask, 2, 4, exact=True)
        assert layer.weight.dtype == torch.float32 and (layer.weight[~layer.mask] == 0).all()
    assert torch.isfinite(model(torch.randn(5, 48))).all()


def test_cnn_layerwise(monkeypatch):
    model = sparsify(cnn().double()).eval()
    batches = [torch.randn(6, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    rec = Recorder(monkeypatch)
    buffers = {n: b.clone() for n, b in model.named_buffers() if "mask" not in n}
    report = obs_layerwise(model, batches, 0.7, block_size=8)
    for layer in report.layers:
        assert layer.kept == n_kept(layer.numel, 0.7)
    for n, b in model.named_buffers():
        if "mask" not in n:
            assert torch.equal(b, buffers[n])
    for name, layer in sparse_modules(model):
        assert (layer.weight[~layer.mask] == 0).all()
        if not isinstance(layer, nn.Conv2d):
            continue
        # The quadratic model of the Hessian is the convolution's own output error:
        # 2/n sum conv(x, dW)^2 = sum_g tr(dW_g H_g dW_g^T), n = output positions.
        xs = layer_inputs(model, layer, batches)
        H = rec.H[name]
        groups = layer.groups
        for _ in range(3):
            dW = torch.randn_like(layer.weight)
            lhs = 0.0
            n = 0
            for x in xs:
                if layer.padding_mode != "zeros":
                    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                    padding = 0
                else:
                    padding = layer.padding
                y = F.conv2d(x, dW, None, layer.stride, padding, layer.dilation, groups)
                lhs += y.square().sum().item()
                n += y.shape[0] * y.shape[2] * y.shape[3]
            dWg = dW.reshape(groups, dW.shape[0] // groups, -1)
            rhs = sum(torch.trace(dWg[g] @ H[g] @ dWg[g].T).item() for g in range(groups))
            assert math.isclose(2 * lhs / n, rhs, rel_tol=1e-9)
    with torch.no_grad():
        assert torch.isfinite(model(torch.cat(batches))).all()


def test_layerwise_exclude_and_train_mode_buffers():
    model = sparsify(cnn())
    before = {n: b.clone() for n, b in model.named_buffers() if "mask" not in n}
    weight = model[7].weight.detach().clone()
    report = obs_layerwise(model, [torch.randn(4, 3, 8, 8)], 0.5, exclude="7")
    assert [layer.name for layer in report.layers if layer.kept == layer.numel] == ["7"]
    assert torch.equal(model[7].weight, weight)
    for n, b in model.named_buffers():
        if "mask" not in n:
            assert torch.equal(b, before[n])  # BatchNorm statistics untouched in train mode


# ------------------------------------------------------------------------------------------------
# (g) bad input

def test_singular_hessian_is_damped_or_a_clear_error():
    W = torch.randn(5, 30, dtype=torch.float64)
    H = hessian(correlated_inputs(10, 30, rank=10))  # rank 10 < 30 columns
    W_new, keep = obs_prune_weight(W, H, 0.5, block_size=8, damp=0.01)
    assert torch.isfinite(W_new).all() and int(keep.sum()) == n_kept(W.numel(), 0.5)
    H_exact = hessian(correlated_inputs(10, 30, rank=5))
    for fn in (obs_prune_weight, obs_prune_weight_ref):
        with pytest.raises(ValueError, match="not positive definite after damping"):
            fn(W, H_exact.float() - 1e-3 * torch.eye(30), 0.5, damp=0.0)


def test_indefinite_hessian_is_a_clear_error():
    W, H, _ = problem(4, 20)
    Q = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64)).Q
    eigenvalues = torch.rand(20, dtype=torch.float64) + 1
    eigenvalues[0] = -1.0  # far below what damping adds (0.01 * mean(diag) ~ 0.015)
    indefinite = Q @ torch.diag(eigenvalues) @ Q.T
    assert (indefinite.diagonal() > 0).all()
    with pytest.raises(ValueError, match="not positive definite after damping"):
        obs_prune_weight(W, indefinite, 0.5)
    negative = H.clone()
    negative[2, 2] = -1.0
    with pytest.raises(ValueError, match="positive semi-definite.*diagonal entry 2"):
        obs_prune_weight(W, negative, 0.5)
    asymmetric = H.clone()
    asymmetric[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        obs_prune_weight(W, asymmetric, 0.5)


@pytest.mark.parametrize("where", ["W", "H"])
def test_nan_weights_or_hessian(where):
    W, H, _ = problem(4, 12)
    (W if where == "W" else H)[1, 1] = float("nan")
    with pytest.raises(ValueError, match=f"{where}: contains NaN"):
        obs_prune_weight(W, H, 0.5)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_sparsity_outside_range(sparsity):
    W, H, _ = problem(4, 12)
    with pytest.raises(ValueError, match="sparsity: expected a number in"):
        obs_prune_weight(W, H, sparsity)
    with pytest.raises(ValueError, match="sparsity: expected a number in"):
        obs_layerwise(sparsify(mlp()), torch.randn(4, 48), sparsity)


def test_bad_arguments():
    W, H, _ = problem(4, 12)
    cases = [
        (dict(block_size=0), ValueError, "block_size: expected an int >= 1"),
        (dict(damp=-0.1), ValueError, "damp: expected a finite number >= 0"),
        (dict(damp=float("inf")), ValueError, "damp: expected a finite number >= 0"),
        (dict(nm="2:4", sparsity=0.3), ValueError, r"N:M 2:4 keeps 2 of every 4"),
        (dict(nm="2:4", block_size=6), ValueError, "block_size: expected a multiple of M=4"),
        (dict(nm="4x4"), ValueError, "nm: expected None"),
        (dict(nm=(3, 2)), ValueError, "1 <= N <= M"),
        (dict(nm="2:5", sparsity=0.6, block_size=10), ValueError, "12 columns .* not a multiple of M=5"),
        (dict(H=H[:5, :5]), ValueError, r"H: expected shape \(12, 12\)"),
        (dict(W=W.long()), TypeError, "W: expected a floating-point"),
        (dict(W=W[0]), ValueError, "W: expected rank >= 2"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(W=W, H=H, sparsity=0.5, block_size=8) | overrides
        with pytest.raises(error, match=message):
            obs_prune_weight(**kwargs)


def test_layerwise_bad_calibration_data():
    model = sparsify(mlp())
    bad = torch.randn(8, 48)
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match="batch 1 gives NaN or inf inputs to layer '1'"):
        obs_layerwise(model, [torch.randn(8, 48), bad], 0.5)
    with pytest.raises(ValueError, match="at least one batch"):
        obs_layerwise(model, [], 0.5)
    with pytest.raises(ValueError, match="calib_data: expected calibration inputs"):
        obs_layerwise(model, None, 0.5)
    with pytest.raises(TypeError, match="one-shot iterator"):
        obs_layerwise(model, (x for x in [torch.randn(8, 48)]), 0.5)
    with pytest.raises(ValueError, match="layer '1' received no input samples"):
        obs_layerwise(model, torch.randn(0, 48), 0.5)


def test_layerwise_singular_layer_hessian_names_the_layer():
    model = sparsify(mlp())
    x = torch.zeros(2, 48)
    x[0, :2] = 1.0  # H = [[1, 1], [1, 1]] on two inputs (exactly singular), the other inputs dead
    with pytest.raises(ValueError, match="layer '1'.*not positive definite after damping"):
        obs_layerwise(model, x, 0.5, damp=0.0)
    model = sparsify(mlp())
    obs_layerwise(model, torch.randn(5, 48), 0.5)  # damped: fine
    assert all(int(m.mask.sum()) == n_kept(m.weight.numel(), 0.5) for _, m in sparse_modules(model))


def test_layerwise_bad_models_and_patterns():
    with pytest.raises(ValueError, match="sparse layers"):
        obs_layerwise(mlp(), torch.randn(4, 48), 0.5)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        obs_layerwise("mlp", torch.randn(4, 48), 0.5)
    with pytest.raises(ValueError, match="every sparse layer is excluded"):
        obs_layerwise(sparsify(mlp()), torch.randn(4, 48), 0.5, exclude="*")
    with pytest.raises(ValueError, match="pattern: expected 'unstructured' or 'N:M'"):
        obs_layerwise(sparsify(mlp()), torch.randn(4, 48), 0.5, pattern="4x4")
    odd = sparsify(nn.Sequential(nn.Linear(48, 10), nn.Linear(10, 4)))
    with pytest.raises(ValueError, match="layer '1' has 10 input columns"):
        obs_layerwise(odd, torch.randn(4, 48), 0.5, pattern="2:4")
    unused = sparsify(nn.ModuleDict({"used": nn.Linear(8, 4), "unused": nn.Linear(4, 4)}))
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(ValueError, match="layer 'unused' received no input samples"):
        obs_layerwise(unused, torch.randn(4, 8), 0.5)
