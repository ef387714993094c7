import pytest
import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.functional import linear_cross_entropy


def _problem(rows=50, hidden=16, classes=33, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen, dtype=dtype)
    w = torch.randn(classes, hidden, generator=gen, dtype=dtype) / 2
    b = torch.randn(classes, generator=gen, dtype=dtype) if bias else None
    target = torch.randint(classes, (rows,), generator=gen)
    return x, w, b, target


def _grads(fn, x, w, b, target, upstream=None):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    loss = fn(*leaves, target)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_every_gradient_equal_pytorchs(reduction, ignore, smoothing, bias):
    x, w, b, target = _problem(bias=bias)
    if ignore:
        target[::3] = 7  # a class index used as ignore_index
    ignore_index = 7 if ignore else -100
    kwargs = {"reduction": reduction, "label_smoothing": smoothing}
    upstream = torch.randn(50) if reduction == "none" else torch.tensor(1.7)

    def ours(x, w, b, t):
        return linear_cross_entropy(x, w, t, b, ignore_index=ignore_index, chunk_size=7, **kwargs)

    def ref(x, w, b, t):
        return F.cross_entropy(F.linear(x, w, b), t, ignore_index=ignore_index, **kwargs)

    loss, grads = _grads(ours, x, w, b, target, upstream)
    loss_ref, grads_ref = _grads(ref, x, w, b, target, upstream)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None
        else:
            torch.testing.assert_close(g, g_ref)
    if ignore:  # ignored rows get no input gradient
        assert (grads[0][::3] == 0).all() and (grads[0][1::3] != 0).any()


def test_batched_input_and_default_chunk():
    x, w, b, target = _problem(rows=24)
    x, target = x.view(2, 12, 16), target.view(2, 12)
    ours = linear_cross_entropy(x, w, target, b, reduction="none")
    ref = F.cross_entropy(F.linear(x, w, b).flatten(0, 1), target.flatten(), reduction="none")
    assert ours.shape == (2, 12)
    torch.testing.assert_close(ours.flatten(), ref)


def test_float64_and_int32_targets():
    x, w, b, target = _problem(dtype=torch.float64)
    ours = linear_cross_entropy(x, w, target.int(), b, chunk_size=9)
    ref = F.cross_entropy(F.linear(x, w, b), target)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_all_rows_ignored_gives_nan_as_pytorch():
    x, w, b, target = _problem(rows=4)
    target[:] = -100
    assert linear_cross_entropy(x, w, target, b).isnan()
    assert F.cross_entropy(F.linear(x, w, b), target).isnan()


def test_module_form_trains_the_lm_head():
    torch.manual_seed(0)
    head = nn.Linear(16, 33)
    loss_fn = rp.LinearCrossEntropy(head, ignore_index=-1)
    x, _, _, target = _problem()
    target[0] = -1
    loss = loss_fn(x, target)
    loss.backward()
    ref_head = nn.Linear(16, 33)
    ref_head.load_state_dict(head.state_dict())
    ref = F.cross_entropy(ref_head(x), target, ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad)
    torch.testing.assert_close(head.bias.grad, ref_head.bias.grad)
    assert list(loss_fn.parameters()) == list(head.parameters())
    with pytest.raises(TypeError, match="lm_head must be an nn.Linear"):
        rp.LinearCrossEntropy(nn.Conv1d(2, 2, 1))


def test_saves_rows_not_rows_times_vocabulary():
    """vocab 2048, 256 rows: PyTorch keeps the 2 MiB logits (and log-softmax) for backward; the
    fused loss keeps the input, the int64 target and one float32 per row."""
    rows, hidden, vocab = 256, 64, 2048
    head = nn.Linear(hidden, vocab)
    x = torch.randn(rows, hidden, requires_grad=True)
    target = torch.randint(vocab, (rows,))
    with rp.track_saved(head) as exact:
        F.cross_entropy(head(x), target)
    with rp.track_saved(head) as fused:
        loss = linear_cross_entropy(x, head.weight, target, head.bias)
    assert exact.bytes >= rows * vocab * 4
    assert fused.bytes == x.nbytes + target.nbytes + rows * 4
    loss.backward()


def test_under_autocast_the_loss_is_float32_as_pytorchs():
    x, w, b, target = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, grads = _grads(lambda x, w, b, t: linear_cross_entropy(x, w, t, b), x, w, b, target)
        ref, grads_ref = _grads(lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t), x, w,
                                b, target)  # fmt: skip
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"w": torch.randn(33, 15)}, ValueError, "in_features=16"),
        ({"b": torch.randn(32)}, ValueError, "bias must be None or of shape"),
        ({"target": torch.zeros(50)}, TypeError, "target must be a tensor of class indices"),
        ({"target": torch.zeros(49, dtype=torch.long)}, ValueError, "target must have shape"),
        ({"x": torch.randn(50, 16, dtype=torch.float64)}, TypeError, "weight must have input"),
        ({"x": torch.ones(50, 16, dtype=torch.long)}, TypeError, "input must be a floating"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of mean, sum, none"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ],
)
def test_bad_inputs_are_named(change, error, match):
    x, w, b, target = _problem()
    args = {"x": x, "w": w, "b": b, "target": target, **change}
    kwargs = {k: args.pop(k) for k in ("reduction", "label_smoothing", "chunk_size") if k in args}
    with pytest.raises(error, match=match):
        linear_cross_entropy(args["x"], args["w"], args["target"], args["b"], **kwargs)
