"""``precision=`` of the fused ops and modules ("ieee" | "tf32" | "tf32x3") and the trainer's
``--precision`` flag.

Tolerance rule of each mode. For every output and every gradient, ``err`` is the largest absolute
difference from the float64 torch reference:

* ``ieee``: ``err <= 2 x`` the error of the float32 torch reference (the suite's rule).
* ``tf32x3``: ``err <= 2 x`` the larger of the float32 reference's error and the error of the same
  reference with every matmul done as 3xTF32 (each operand split into a TF32 high part rounded to
  nearest and a TF32 low part truncated; low x low dropped), plus the ieee floor (1e-6 of the
  largest magnitude).
* ``tf32``: ``err <= 2 x`` the error of the reference with every matmul's operands truncated to
  TF32 (10 explicit mantissa bits, what the tensor cores read of a float32 register), plus one
  TF32 unit (2^-10) of the largest magnitude (the scale gradient is summed in a different order
  than the reference's, and with tf32 its error is a few TF32 units).

The emulated references run on the CPU in float32 (the same on every machine); backward matmuls
round the same way. Under the CPU interpreter ``tl.dot`` ignores ``input_precision``, so every
mode computes exactly the ``ieee`` result there (tested); the GPU tests check each mode's rule.
"""

import json

import pytest
import torch

from fastrp import train
from fastrp.config import PRECISIONS, RESUME_FIXED, CliError, Config, config_from_checkpoint, parse_args, validate
from fastrp.nn import EnsembleMLP, ProbabilisticEnsemble, TanhGaussianPolicy, TwinQ
from fastrp.ops import _common, ensemble_linear, ensemble_mlp, ensemble_mlp_jvp
from fastrp.ops._common import act
from utils import max_err, needs_triton, no_host_sync

MODES = ("ieee", "tf32", "tf32x3")


# ---------------------------------------------------------------------------------------------
# emulated tensor-core matmuls (float32 bit patterns)


def tf32_chop(x: torch.Tensor) -> torch.Tensor:
    """Drop the low 13 of float32's 23 mantissa bits."""
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """Round to 10 mantissa bits, to nearest with ties away from zero (``cvt.rna.tf32.f32``)."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def matmul_as(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    if a.dtype != torch.float32 or mode == "ieee":
        return torch.matmul(a, b)
    if mode == "tf32":
        return torch.matmul(tf32_chop(a), tf32_chop(b))
    a_hi, b_hi = tf32_round(a), tf32_round(b)
    a_lo, b_lo = tf32_chop(a - a_hi), tf32_chop(b - b_hi)
    return torch.matmul(a_lo, b_hi) + torch.matmul(a_hi, b_lo) + torch.matmul(a_hi, b_hi)


class _Matmul(torch.autograd.Function):
    """``a @ b`` in ``mode``; the backward's two matmuls in the same mode."""

    @staticmethod
    def forward(ctx, a, b, mode):
        ctx.save_for_backward(a, b)
        ctx.mode = mode
        return matmul_as(a, b, mode)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return matmul_as(g, b.transpose(-1, -2), ctx.mode), matmul_as(a.transpose(-1, -2), g, ctx.mode), None


def _layer(h, w, b, s, mode):
    z = _Matmul.apply(h, w, mode)
    if s is not None:
        z = z * s.reshape(-1, *([1] * (z.dim() - 1)))
    return z if b is None else z + b.reshape(b.shape[0], *([1] * (z.dim() - 2)), b.shape[1])


def mlp_as(x, ws, bs, ss, activation, mode, members=None):
    """The ensemble MLP with every matmul in ``mode`` (``members``: all members on all rows, then
    each row's own)."""
    if members is not None:
        y = mlp_as(x.unsqueeze(0).expand(ws[0].shape[0], -1, -1), ws, bs, ss, activation, mode)
        return y[members, torch.arange(x.shape[0])]
    h = x
    for l, w in enumerate(ws):
        h = _layer(h, w, bs[l], ss[l], mode)
        if l < len(ws) - 1:
            h = act(h, activation)
    return h


def jvp_as(x, t, ws, bs, ss, activation, mode):
    """``(y, J t)`` of the ensemble MLP, forward-mode recurrence with every matmul in ``mode``."""
    E, B, K, d = t.shape
    h, t = x, t.reshape(E, B * K, d)
    for l, w in enumerate(ws):
        z = _layer(h, w, bs[l], ss[l], mode)
        v = _layer(t, w, None, ss[l], mode)
        if l == len(ws) - 1:
            return z, v.reshape(E, B, K, -1)
        h = act(z, activation)
        sg = torch.sigmoid(z)
        d1 = sg * (1 + z * (1 - sg)) if activation == "silu" else 1 - h * h  # silu / tanh only
        t = (d1.unsqueeze(2) * v.reshape(E, B, K, -1)).reshape(E, B * K, -1)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# the rule


def bound(mode: str, ref64: torch.Tensor, ref32: torch.Tensor, emulated: torch.Tensor) -> float:
    """The largest error ``mode``'s rule allows for one output (see the module docstring)."""
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    if mode == "ieee":
        return 2 * max_err(ref32, ref64) + 1e-6 * scale
    if mode == "tf32x3":
        return 2 * max(max_err(ref32, ref64), max_err(emulated, ref64)) + 1e-6 * scale
    return 2 * max_err(emulated, ref64) + 2.0 ** -10 * scale


def _problem(kind, E, B, dims, K=5, seed=0):
    """float64 leaves (x, [tangents], weights, biases, scales) and the int64 members (or None)."""
    g = torch.Generator().manual_seed(seed)
    L = len(dims) - 1
    ws = [torch.randn(E, dims[l], dims[l + 1], generator=g, dtype=torch.float64) / dims[l] ** 0.5 for l in range(L)]
    bs = [0.3 * torch.randn(E, dims[l + 1], generator=g, dtype=torch.float64) for l in range(L)]
    ss = [0.5 + torch.rand(E, generator=g, dtype=torch.float64) for _ in range(L)]
    members = torch.randint(0, E, (B,), generator=g) if kind == "grouped" else None
    x = torch.randn(*(() if members is not None else (E,)), B, dims[0], generator=g, dtype=torch.float64)
    lead = [x, torch.randn(E, B, K, dims[0], generator=g, dtype=torch.float64)] if kind == "jvp" else [x]
    return lead, ws, bs, ss, members


def _split(leaves, kind, L):
    n = 2 if kind == "jvp" else 1
    lead, rest = leaves[:n], leaves[n:]
    return lead, rest[:L], rest[L:2 * L], rest[2 * L:]


def _run(kind, leaves64, members, L, fn, dtype, device, cotangents, guard=False):
    """Outputs and gradients (w.r.t. every leaf) of ``fn`` on ``dtype`` / ``device`` copies of the
    leaves, as float64 CPU tensors. ``guard``: the op's calls under :func:`no_host_sync`."""
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in leaves64]
    mem = None if members is None else members.to(device)
    cots = [c.to(device=device, dtype=dtype) for c in cotangents]
    with no_host_sync(device) if guard else _nothing():
        outs = fn(*_split(leaves, kind, L), mem)
        grads = torch.autograd.grad(outs, leaves, cots)
    return [t.detach().to("cpu", torch.float64) for t in list(outs) + list(grads)]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _op(kind, backend, precision, activation):
    if kind == "jvp":
        return lambda lead, ws, bs, ss, m: ensemble_mlp_jvp(*lead, ws, bs, ss, activation, backend=backend,
                                                             precision=precision)
    if kind == "linear":
        return lambda lead, ws, bs, ss, m: (ensemble_linear(lead[0], ws[0], bs[0], ss[0], backend=backend,
                                                            precision=precision),)
    return lambda lead, ws, bs, ss, m: (ensemble_mlp(lead[0], ws, bs, ss, activation, members=m, backend=backend,
                                                     precision=precision),)


def _emulated(kind, mode, activation):
    if kind == "jvp":
        return lambda lead, ws, bs, ss, m: jvp_as(*lead, ws, bs, ss, activation, mode)
    return lambda lead, ws, bs, ss, m: (mlp_as(lead[0], ws, bs, ss, activation, mode, members=m),)


def check_modes(kind, E, B, dims, device, backend, modes=MODES, activation="silu"):
    """Each mode's outputs and gradients within its rule; returns them per mode."""
    lead, ws, bs, ss, members = _problem(kind, E, B, dims)
    leaves64, L = lead + ws + bs + ss, len(ws)
    y64 = _emulated(kind, "ieee", activation)(*_split(leaves64, kind, L), members)
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in y64]
    args = (kind, leaves64, members, L)
    ref64 = _run(*args, _emulated(kind, "ieee", activation), torch.float64, "cpu", cots)
    ref32 = _run(*args, _emulated(kind, "ieee", activation), torch.float32, "cpu", cots)
    names = ["y", "jy"][:len(y64)] + ["x", "tangents"][:len(lead)] + [f"{p}[{l}]" for p in "wbs" for l in range(L)]
    got = {}
    for mode in modes:
        emulated = ref32 if mode == "ieee" else _run(*args, _emulated(kind, mode, activation), torch.float32, "cpu",
                                                      cots)
        out = _run(*args, _op(kind, backend, mode, activation), torch.float32, device, cots, guard=True)
        for name, o, r64, r32, em in zip(names, out, ref64, ref32, emulated):
            err, allowed = max_err(o, r64), bound(mode, r64, r32, em)
            assert err <= allowed, f"{kind} {mode} {name}: error {err:.3e} vs float64 exceeds the rule's {allowed:.3e}"
        got[mode] = out
    return got


# ---------------------------------------------------------------------------------------------
# CPU: the argument, the interpreter computes like ieee, the rules tell the modes apart

SMALL = {"dense": (3, 37, [5, 40, 33, 3]), "grouped": (3, 37, [5, 40, 33, 3]), "linear": (3, 37, [33, 20]),
         "jvp": (3, 9, [5, 40, 33, 3])}


@needs_triton
@pytest.mark.parametrize("kind", list(SMALL))
def test_modes_on_the_interpreter_compute_the_ieee_result(kind):
    """Each mode within its rule on the Triton interpreter, and tf32 / tf32x3 bit for bit the
    ieee result there (the interpreter's tl.dot ignores input_precision)."""
    got = check_modes(kind, *SMALL[kind], "cpu", "triton")
    for mode in ("tf32", "tf32x3"):
        for a, b in zip(got[mode], got["ieee"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dense", "jvp"])
def test_torch_backend_ignores_precision(kind):
    got = check_modes(kind, *SMALL[kind], "cpu", "torch")
    for mode in ("tf32", "tf32x3"):
        for a, b in zip(got[mode], got["ieee"]):
            assert torch.equal(a, b)


def test_tf32_emulation_bits():
    one = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11, 1 + 2 ** -11 + 2 ** -20, -(1 + 2 ** -11), 3.0])
    assert tf32_chop(one).tolist() == [1 + 2 ** -10, 1.0, 1.0, -1.0, 3.0]
    assert tf32_round(one).tolist() == [1 + 2 ** -10, 1 + 2 ** -10, 1 + 2 ** -10, -(1 + 2 ** -10), 3.0]
    a = torch.randn(1000)
    hi = tf32_round(a)
    assert ((a - hi).abs() <= a.abs() * 2.0 ** -11).all()
    assert ((hi + tf32_chop(a - hi) - a).abs() <= a.abs() * 2.0 ** -21).all()


def test_rules_tell_the_modes_apart():
    """The GPU tests can fail: float32 with TF32 operands breaks the ieee and tf32x3 rules at the
    model's shape (so a kernel that silently used plain TF32 is caught), while 3xTF32 does not
    break the tf32 rule."""
    lead, ws, bs, ss, _ = _problem("dense", 7, 64, [23, 200, 200, 36])
    leaves64, L = lead + ws + bs + ss, len(ws)
    cots = [torch.randn(7, 64, 36, dtype=torch.float64)]
    args = ("dense", leaves64, None, L)
    ref64, ref32, tf32, tf32x3 = (_run(*args, _emulated("dense", m, "silu"), dt, "cpu", cots)
                                  for m, dt in (("ieee", torch.float64), ("ieee", torch.float32),
                                                ("tf32", torch.float32), ("tf32x3", torch.float32)))
    y = 0
    assert max_err(tf32[y], ref64[y]) > bound("ieee", ref64[y], ref32[y], ref32[y])
    assert max_err(tf32[y], ref64[y]) > bound("tf32x3", ref64[y], ref32[y], tf32x3[y])
    for o, r64, r32, em in zip(tf32x3, ref64, ref32, tf32):
        assert max_err(o, r64) <= bound("tf32", r64, r32, em)


def test_bad_precision_is_a_value_error():
    x, w = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    for call in (lambda: ensemble_mlp(x, [w], None, precision="fp16"),
                 lambda: ensemble_linear(x, w, precision="TF32"),
                 lambda: ensemble_mlp_jvp(x, torch.randn(2, 3, 1, 4), [w], None, precision=None),
                 lambda: EnsembleMLP(4, 5, 8, 1, 2, precision="bf16"),
                 lambda: TanhGaussianPolicy(4, 2, 8, 1, precision="half"),
                 lambda: TwinQ(4, 2, 8, 1, precision=""),
                 lambda: ProbabilisticEnsemble(4, 2, 8, 1, 3, 2, precision="x3")):
        with pytest.raises(ValueError, match=r"precision must be one of \('ieee', 'tf32', 'tf32x3'\)"):
            call()
    ensemble_mlp(x, [w], None)  # a cached signature does not skip the check of a new precision
    with pytest.raises(ValueError, match="precision must be one of"):
        ensemble_mlp(x, [w], None, precision="fp16")


def test_modules_pass_precision_to_every_op_call(monkeypatch):
    import fastrp.nn.ensemble as ensemble

    seen = []

    def spy(op):
        def call(*args, **kwargs):
            seen.append(kwargs["precision"])
            return op(*args, **kwargs)
        return call

    monkeypatch.setattr(ensemble, "ensemble_mlp", spy(ensemble.ensemble_mlp))
    monkeypatch.setattr(ensemble, "ensemble_mlp_jvp", spy(ensemble.ensemble_mlp_jvp))
    policy = TanhGaussianPolicy(4, 2, 8, 1, spectral_norm=True, precision="tf32")
    critic = TwinQ(4, 2, 8, 1, precision="tf32x3")
    model = ProbabilisticEnsemble(4, 2, 8, 1, 3, 2, precision="tf32")
    obs, a = torch.randn(5, 4), torch.randn(5, 2)
    policy(obs)
    critic(obs, a)
    model.predict(obs, a, members="random")
    model.net.forward_jvp(torch.randn(3, 5, 6), torch.randn(3, 5, 2, 6))
    assert seen == ["tf32", "tf32x3", "tf32", "tf32"]
    assert "precision='tf32'" in repr(model.net)
    assert EnsembleMLP(4, 5, 8, 1, 2).precision == "ieee"


# ---------------------------------------------------------------------------------------------
# the trainer's flag


def test_precision_flag_and_config():
    assert PRECISIONS == _common.PRECISIONS
    assert parse_args([]).precision == "ieee"
    assert parse_args(["--precision", "tf32x3"]).precision == "tf32x3"
    with pytest.raises(CliError, match=r"^--precision: choose from ieee, tf32, tf32x3, got 'fp16'$"):
        validate(Config(precision="fp16"))
    # configs written before the field existed resume in full precision; the mode may change on resume
    old = {k: v for k, v in vars(Config()).items() if k != "precision"}
    assert config_from_checkpoint(old).precision == "ieee"
    assert "precision" not in RESUME_FIXED


def test_bad_precision_flag_is_one_line(tmp_path, capsys):
    assert train.main(["--precision", "fp16", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--precision: invalid choice: 'fp16'" in err and err.count("\n") == 1


def test_agent_networks_get_the_precision():
    from fastrp import algos

    cfg = parse_args(["--env", "InvertedPendulum", "--algo", "ddppo-sn", "--preset", "tiny", "--device", "cpu",
                      "--precision", "tf32"])
    agent = algos.get("ddppo-sn")(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"))
    nets = [agent.policy.net, agent.critic.net, agent.critic_target.net, agent.model.net, agent.grad_model.net]
    assert [n.precision for n in nets] == ["tf32"] * 5


def test_resume_may_change_the_precision(tmp_path):
    tiny = ["--env", "InvertedPendulum", "--preset", "tiny", "--progress", "false", "--algo", "sac"]
    assert train.main([*tiny, "--steps", "100", "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "150", "--precision", "tf32",
                       "--progress", "false"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["precision"] == "tf32"


# ---------------------------------------------------------------------------------------------
# GPU: each mode within its rule at the trainer's shapes

MODEL = [23, 200, 200, 200, 200, 36]
GPU_CASES = {"dense": (7, 256, MODEL), "grouped": (7, 256, MODEL), "linear": (7, 256, [200, 200]),
             "jvp": (7, 64, MODEL)}


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(GPU_CASES))
def test_cuda_modes_within_their_rule(kind):
    got = check_modes(kind, *GPU_CASES[kind], "cuda", "triton")
    assert not torch.equal(got["tf32"][0], got["ieee"][0])  # tensor cores did run
