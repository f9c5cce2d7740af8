"""fastrp.nn.EnsembleMLP against a loop over members of plain nn.Linear layers (under torch's
spectral_norm parametrization where normalized), SN buffer semantics, state_dict, jvp path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrp.nn import EnsembleMLP
from utils import needs_triton, no_host_sync

ACTS = {"silu": F.silu, "relu": torch.relu, "tanh": torch.tanh}
TOL = dict(rtol=1e-5, atol=1e-5)


def _member_layers(model: EnsembleMLP, e: int):
    """Member ``e`` of ``model`` as plain nn.Linear layers (weights copied, parametrized with
    torch's spectral_norm where ``model`` normalizes, ``_u``/``_v`` copied from its buffers)."""
    layers = []
    for layer, (weight, bias) in enumerate(zip(model.weights, model.biases)):
        lin = nn.Linear(weight.shape[1], weight.shape[2]).to(dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            lin.weight.copy_(weight[e].T)
            lin.bias.copy_(bias[e])
        if layer in model.sn_layers:
            lin = nn.utils.parametrizations.spectral_norm(lin, n_power_iterations=model.n_power_iterations, eps=model.eps)
            param = lin.parametrizations.weight[0]
            with torch.no_grad():
                param._u.copy_(getattr(model, f"sn_u_{layer}")[e])
                param._v.copy_(getattr(model, f"sn_v_{layer}")[e])
        layers.append(lin)
    return nn.ModuleList(layers)


def _run_member(layers, x, activation):
    for k, lin in enumerate(layers):
        x = lin(x)
        if k < len(layers) - 1:
            x = ACTS[activation](x)
    return x


def _loop_reference(model: EnsembleMLP, x: torch.Tensor, training: bool):
    """``[E, B, out]`` by a loop over members; also returns the torch layers (their SN buffers
    after the forward)."""
    members = [_member_layers(model, e) for e in range(model.ensemble_size)]
    ys = []
    for e, layers in enumerate(members):
        layers.train(training)
        xe = x if x.dim() == 2 else x[e]
        ys.append(_run_member(layers, xe, model.activation))
    return torch.stack(ys), members


def _assert_buffers_match(model: EnsembleMLP, members):
    for layer in model.sn_layers:
        for e, layers in enumerate(members):
            param = layers[layer].parametrizations.weight[0]
            torch.testing.assert_close(getattr(model, f"sn_u_{layer}")[e], param._u, **TOL)
            torch.testing.assert_close(getattr(model, f"sn_v_{layer}")[e], param._v, **TOL)


CASES = [
    # (E, B, in, hidden, num_layers, out, activation)
    (1, 1, 5, 7, 1, 1, "silu"),
    (7, 37, 5, 200, 2, 3, "relu"),
    (7, 256, 17, 257, 1, 1, "tanh"),
    (3, 37, 1, 5, 3, 257, "silu"),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sn", ["none", "hidden", "all"])
@pytest.mark.parametrize("E,B,i,h,L,o,act", CASES)
def test_forward_matches_member_loop(E, B, i, h, L, o, act, sn, training):
    model = EnsembleMLP(i, o, h, L, E, activation=act, spectral_norm=sn, n_power_iterations=2, backend="torch")
    model.train(training)
    x = torch.randn(E, B, i)
    y_ref, members = _loop_reference(model, x, training)
    y = model(x)
    assert y.shape == (E, B, o)
    torch.testing.assert_close(y, y_ref, **TOL)
    _assert_buffers_match(model, members)
    # a [B, in] input goes through every member
    x2 = torch.randn(B, i)
    y_ref2, _ = _loop_reference(model, x2, training)
    torch.testing.assert_close(model(x2), y_ref2, **TOL)


@needs_triton
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sn", ["hidden", "all"])
def test_forward_triton_matches_member_loop(sn, training):
    E, B, i, h, L, o = 3, 7, 5, 9, 2, 2
    model = EnsembleMLP(i, o, h, L, E, spectral_norm=sn, backend="triton")
    model.train(training)
    x = torch.randn(E, B, i)
    y_ref, members = _loop_reference(model, x, training)
    torch.testing.assert_close(model(x), y_ref, **TOL)
    _assert_buffers_match(model, members)


def test_structure_and_init():
    model = EnsembleMLP(11, 3, 200, 4, 7, spectral_norm="hidden")
    assert model.dims == (11, 200, 200, 200, 200, 3)
    assert [tuple(w.shape) for w in model.weights] == [(7, 11, 200)] + [(7, 200, 200)] * 3 + [(7, 200, 3)]
    assert [tuple(b.shape) for b in model.biases] == [(7, 200)] * 4 + [(7, 3)]
    assert model.sn_layers == (0, 1, 2, 3)
    assert EnsembleMLP(11, 3, 200, 4, 7, spectral_norm="all").sn_layers == (0, 1, 2, 3, 4)
    assert EnsembleMLP(11, 3, 200, 4, 7).sn_layers == ()
    names = {n for n, _ in model.named_buffers()}
    assert names == {f"sn_{k}_{l}" for k in "uv" for l in range(4)}
    for w, b in zip(model.weights, model.biases):
        bound = 1 / w.shape[1] ** 0.5
        assert w.abs().max() <= bound and b.abs().max() <= bound
    for l in model.sn_layers:
        torch.testing.assert_close(getattr(model, f"sn_v_{l}").norm(dim=-1), torch.ones(7))
        torch.testing.assert_close(getattr(model, f"sn_u_{l}").norm(dim=-1), torch.ones(7))


def test_vectors_update_only_in_training_mode():
    model = EnsembleMLP(5, 2, 16, 2, 3, spectral_norm="all")
    x = torch.randn(3, 8, 5)
    before = {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    model(x)
    model.spectral_norm_sigmas()
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    model.train()
    y = model(x)
    for k, v in model.named_buffers():
        assert not v.requires_grad
        assert not torch.equal(v, before[k]), k
    y.sum().backward()  # autograd unaffected by the in-place buffer update
    assert all(p.grad is not None for p in model.parameters())


def test_sigmas_for_logging():
    model = EnsembleMLP(5, 2, 16, 2, 3, spectral_norm="hidden")
    sigmas = model.spectral_norm_sigmas()
    assert sorted(sigmas) == [0, 1]
    for l, sigma in sigmas.items():
        u, v, w = getattr(model, f"sn_u_{l}"), getattr(model, f"sn_v_{l}"), model.weights[l].detach()
        torch.testing.assert_close(sigma, torch.einsum("eo,eio,ei->e", u, w, v))
        # after 15 warm-up iterations, close to the largest singular value
        torch.testing.assert_close(sigma, torch.linalg.matrix_norm(w, ord=2), rtol=1e-2, atol=0)
        assert not sigma.requires_grad
    assert EnsembleMLP(5, 2, 16, 2, 3).spectral_norm_sigmas() == {}


@pytest.mark.parametrize("sn", ["none", "hidden", "all"])
def test_state_dict_round_trip(sn):
    model = EnsembleMLP(5, 3, 16, 2, 4, spectral_norm=sn)
    model.train()
    model(torch.randn(4, 6, 5))
    state = model.state_dict()
    expected = {f"weights.{l}" for l in range(3)} | {f"biases.{l}" for l in range(3)}
    expected |= {f"sn_{k}_{l}" for k in "uv" for l in model.sn_layers}
    assert set(state) == expected
    torch.manual_seed(123)
    other = EnsembleMLP(5, 3, 16, 2, 4, spectral_norm=sn)
    other.load_state_dict(state)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(4, 6, 5)
    for training in (False, True):
        model.train(training)
        other.train(training)
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("sn", ["hidden", "all"])
def test_saved_in_training_loaded_in_eval(sn):
    """Saved after training-mode forwards and an optimizer step (so the stored u, v were computed
    from the previous weights), then first used in eval mode after loading: the loaded module
    uses sigma = u^T W v with the saved u, v and the current W, exactly as the saved module and
    torch's parametrization in eval mode do."""
    model = EnsembleMLP(5, 3, 16, 2, 4, spectral_norm=sn, n_power_iterations=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, 5)).square().mean().backward()
        opt.step()
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    loaded = EnsembleMLP(5, 3, 16, 2, 4, spectral_norm=sn, n_power_iterations=1)
    loaded.load_state_dict(state)
    loaded.eval()
    x = torch.randn(4, 6, 5)
    y_loaded = loaded(x)
    model.eval()
    torch.testing.assert_close(y_loaded, model(x), rtol=0, atol=0)
    y_ref, members = _loop_reference(loaded, x, training=False)
    torch.testing.assert_close(y_loaded, y_ref, **TOL)
    for l, sigma in loaded.spectral_norm_sigmas().items():
        u, v, w = state[f"sn_u_{l}"], state[f"sn_v_{l}"], state[f"weights.{l}"]
        torch.testing.assert_close(sigma, torch.einsum("eo,eio,ei->e", u, w, v))
    for k, v in loaded.named_buffers():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("sn", ["none", "hidden"])
def test_members_option(sn):
    E, B = 5, 37
    model = EnsembleMLP(4, 3, 16, 2, E, spectral_norm=sn)
    model.eval()
    x = torch.randn(B, 4)
    members = torch.randint(0, E, (B,))
    y = model(x, members=members)
    assert y.shape == (B, 3)
    y_all = model(x)
    torch.testing.assert_close(y, y_all[members, torch.arange(B)], **TOL)


@pytest.mark.parametrize("sn", ["none", "hidden", "all"])
def test_gradients_reach_all_parameters(sn):
    model = EnsembleMLP(4, 3, 16, 2, 5, spectral_norm=sn)
    model.train()
    x = torch.randn(5, 9, 4, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("sn", ["none", "hidden"])
def test_gradients_match_member_loop(sn):
    model = EnsembleMLP(4, 3, 16, 2, 5, spectral_norm=sn)
    model.train()
    x = torch.randn(5, 9, 4)
    g = torch.randn(5, 9, 3)
    y_ref, members = _loop_reference(model, x, training=True)
    (model(x) * g).sum().backward()
    (y_ref * g).sum().backward()
    for e, layers in enumerate(members):
        for l, lin in enumerate(layers):
            w_grad = lin.parametrizations.weight.original.grad if l in model.sn_layers else lin.weight.grad
            torch.testing.assert_close(model.weights[l].grad[e], w_grad.T, **TOL)
            torch.testing.assert_close(model.biases[l].grad[e], lin.bias.grad, **TOL)


@pytest.mark.parametrize("sn", ["none", "all"])
def test_forward_jvp(sn):
    E, B, K = 3, 6, 4
    model = EnsembleMLP(5, 2, 16, 2, E, spectral_norm=sn)
    model.eval()
    x = torch.randn(E, B, 5)
    t = torch.randn(E, B, K, 5)
    y, jy = model.forward_jvp(x, t)
    assert y.shape == (E, B, 2) and jy.shape == (E, B, K, 2)
    torch.testing.assert_close(y, model(x), **TOL)
    for e, layers in enumerate(_member_layers(model, e) for e in range(E)):
        layers.eval()
        for k in range(K):
            _, jref = torch.func.jvp(lambda inp: _run_member(layers, inp, model.activation), (x[e],), (t[e, :, k],))
            torch.testing.assert_close(jy[e, :, k], jref, **TOL)
    # broadcast form: x [B, in], tangents [B, K, in]
    y2, jy2 = model.forward_jvp(x[0], t[0])
    y3, jy3 = model.forward_jvp(x[0].expand(E, B, 5), t[0].expand(E, B, K, 5))
    torch.testing.assert_close(y2, y3)
    torch.testing.assert_close(jy2, jy3)


def test_forward_jvp_training_updates_like_forward():
    model = EnsembleMLP(5, 2, 16, 2, 3, spectral_norm="hidden")
    twin = copy.deepcopy(model)
    model.train()
    twin.train()
    x = torch.randn(3, 6, 5)
    y, _ = model.forward_jvp(x, torch.randn(3, 6, 2, 5))
    torch.testing.assert_close(y, twin(x), **TOL)
    for (k, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), k


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = EnsembleMLP(5, 2, 16, 2, 3, spectral_norm="hidden")
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6, 5)
    for training in (True, False):
        model.train(training)
        twin.train(training)
        y_c = compiled(x)
        y_e = twin(x)
        torch.testing.assert_close(y_c, y_e, **TOL)
        for (k, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
            torch.testing.assert_close(a, b, **TOL)


def test_bad_arguments():
    with pytest.raises(ValueError, match="spectral_norm must be one of"):
        EnsembleMLP(5, 2, 16, 2, 3, spectral_norm="last")
    with pytest.raises(ValueError, match="num_layers must be an int >= 0"):
        EnsembleMLP(5, 2, 16, -1, 3)
    with pytest.raises(ValueError, match="ensemble_size must be an int >= 1"):
        EnsembleMLP(5, 2, 16, 2, 0)
    with pytest.raises(ValueError, match="n_power_iterations must be an int >= 1"):
        EnsembleMLP(5, 2, 16, 2, 3, spectral_norm="all", n_power_iterations=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        EnsembleMLP(5, 2, 16, 2, 3, activation="gelu")
    model = EnsembleMLP(5, 2, 16, 2, 3)
    with pytest.raises(ValueError, match=r"x must be \[E, B, in\] or \[B, in\]"):
        model(torch.randn(3, 4, 6, 5))
    with pytest.raises(ValueError, match=r"tangents must be \[E, B, K, in\]"):
        model.forward_jvp(torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    with pytest.raises(ValueError):
        model(torch.randn(3, 4, 6))  # wrong input width, reported by ensemble_mlp


def test_zero_hidden_layers():
    model = EnsembleMLP(5, 2, 16, 0, 3, spectral_norm="all")
    assert model.dims == (5, 2) and model.sn_layers == (0,)
    x = torch.randn(3, 4, 5)
    model.train()
    y_ref, _ = _loop_reference(model, x, training=True)
    torch.testing.assert_close(model(x), y_ref, **TOL)
    assert EnsembleMLP(5, 2, 16, 0, 3, spectral_norm="hidden").sn_layers == ()


@pytest.mark.cuda
@pytest.mark.parametrize("sn", ["none", "hidden", "all"])
def test_cuda_matches_cpu(sn):
    model = EnsembleMLP(17, 3, 200, 4, 7, spectral_norm=sn)
    gpu = copy.deepcopy(model).cuda()
    x = torch.randn(7, 37, 17)
    xc = x.cuda()
    for training in (True, False):
        model.train(training)
        gpu.train(training)
        y = model(x)
        with no_host_sync():  # power iteration, buffer update, forward: no sync
            y_gpu = gpu(xc)
        torch.testing.assert_close(y_gpu.cpu(), y, rtol=1e-4, atol=1e-4)
        for (k, a), (_, b) in zip(model.named_buffers(), gpu.named_buffers()):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
        y.square().sum().backward()
        with no_host_sync():
            y_gpu.square().sum().backward()
    for (k, a), (_, b) in zip(model.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-4)
    members = torch.randint(0, 7, (37,))
    gpu.eval()
    model.eval()
    x0, mc, tc = x[0].cuda(), members.cuda(), torch.randn(7, 37, 3, 17).cuda()
    with no_host_sync():
        y_members = gpu(x0, members=mc)
        yj, jy = gpu.forward_jvp(xc, tc)
    torch.testing.assert_close(y_members.cpu(), model(x[0], members=members), rtol=1e-4, atol=1e-4)
    assert jy.shape == (7, 37, 3, 3)
