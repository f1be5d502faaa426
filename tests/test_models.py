"""Stacked building blocks and the three heads: shapes, chain teacher forcing, padding, joint == solo."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DIMS, VARIANTS, B, T, cfg_of, make_inputs, make_targets
from torch import nn

from heads.model.architectures import (
    HeadConfig,
    HeadConfigError,
    HeadInputs,
    MultiTaskHead,
    branch_groups,
    build_head,
)
from heads.model.layers import (
    StackedDropout,
    StackedLayerNorm,
    StackedLinear,
    StackedMultiheadAttention,
    make_generators,
)
from heads.tasks import AVB

torch.set_num_threads(1)


def run_slice(x: HeadInputs, r: int) -> HeadInputs:
    return HeadInputs(pooled={k: v[r:r + 1] for k, v in x.pooled.items()},
                      frames={k: v[r:r + 1] for k, v in x.frames.items()}, frame_mask=x.frame_mask[r:r + 1])


# ---------------------------------------------------------------- building blocks vs torch references

def test_stacked_linear_matches_per_run_linear_and_init_bounds():
    gens = make_generators([1, 2, 3])
    lin = StackedLinear(3, 24, 7, gens)
    x = torch.randn(3, 5, 2, 24)
    y = lin(x)
    assert y.shape == (3, 5, 2, 7)
    for r in range(3):
        ref = F.linear(x[r], lin.weight[r].T, lin.bias[r])
        torch.testing.assert_close(y[r], ref, rtol=1e-5, atol=1e-6)
    bound = 1 / 24 ** 0.5
    assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
    assert lin.weight.abs().max() > 0.8 * bound                 # uniform over the whole +-bound range
    assert not torch.equal(lin.weight[0], lin.weight[1])        # runs differ
    with pytest.raises(ValueError, match=r"expected leading run dim 3, got shape \(2, 5, 24\)"):
        lin(torch.randn(2, 5, 24))


def test_stacked_layernorm_matches_torch_with_per_run_affine():
    ln = StackedLayerNorm(2, 6)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(2, 6))
        ln.bias.copy_(torch.randn(2, 6))
    x = torch.randn(2, 4, 6)
    y = ln(x)
    for r in range(2):
        torch.testing.assert_close(y[r], F.layer_norm(x[r], (6,), ln.weight[r], ln.bias[r]))


def test_stacked_attention_matches_nn_multihead_attention_with_padding():
    r_, b, tq, tk, d, h = 2, 3, 4, 5, 8, 2
    mha = StackedMultiheadAttention(r_, d, h, generators=make_generators([0, 1]))
    q, kv = torch.randn(r_, b, tq, d), torch.randn(r_, b, tk, d)
    pad = torch.zeros(r_, b, tk, dtype=torch.bool)
    pad[:, 1, 3:] = True
    pad[1, 2, 1:] = True
    y = mha(q, kv, pad)
    for r in range(r_):
        ref = nn.MultiheadAttention(d, h, batch_first=True)
        with torch.no_grad():   # kv_proj holds the key projection in its first d outputs, the value one after
            ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight[r].T, mha.kv_proj.weight[r].T]))
            ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias[r], mha.kv_proj.bias[r]]))
            ref.out_proj.weight.copy_(mha.out_proj.weight[r].T)
            ref.out_proj.bias.copy_(mha.out_proj.bias[r])
        expected, _ = ref(q[r], kv[r], kv[r], key_padding_mask=pad[r])
        torch.testing.assert_close(y[r], expected, rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_row_gives_bias_not_nan():
    mha = StackedMultiheadAttention(1, 4, 2, generators=make_generators([0]))
    kv = torch.randn(1, 2, 3, 4)
    pad = torch.tensor([[[True] * 3, [False] * 3]])
    y = mha(torch.randn(1, 2, 2, 4), kv, pad)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0, 0], mha.out_proj.bias[0].expand(2, 4))


def test_dropout_per_run_masks_follow_their_generators():
    x = torch.ones(2, 400, 10)
    drop = StackedDropout(0.3, make_generators([11, 22]))
    y = drop(x)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs((y == 0).float().mean().item() - 0.3) < 0.03
    solo = StackedDropout(0.3, make_generators([22]))(torch.ones(1, 400, 10))
    assert torch.equal(y[1:], solo)
    drop.eval()
    assert torch.equal(drop(x), x)


# ---------------------------------------------------------------- heads: shapes, layers, config

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes_and_ranges(variant, training):
    head = build_head(cfg_of(variant), DIMS, [3, 7], AVB)
    head.train(training)
    out = head(make_inputs(2), make_targets(2))
    assert list(out) == list(AVB.names)
    for task in AVB.names:
        assert out[task].shape == (2, B, AVB[task].out_dim)
        assert torch.isfinite(out[task]).all()
        if task != "type":
            assert out[task].min() >= 0 and out[task].max() <= 1
    assert (out["type"] < 0).any()              # TYPE is logits, not probabilities


def test_required_layers_per_arch():
    assert build_head(cfg_of("vanilla"), DIMS, [0], AVB).required_layers == ["hidden_4"]
    assert build_head(cfg_of("chain", input_layer="hidden_2"), DIMS, [0], AVB).required_layers == ["hidden_2"]
    assert build_head(cfg_of("vanilla_weighted"), DIMS, [0], AVB).required_layers == [f"hidden_{i}" for i in range(5)]
    tok = build_head(cfg_of("branch"), DIMS, [0], AVB)
    assert tok.required_layers == ["cnn"] + [f"hidden_{i}" for i in range(5)] and tok.required_frame_layers == []
    fr = build_head(cfg_of("branch_frames", branch_blocks=2), DIMS, [0], AVB)
    assert fr.required_layers == [] and fr.required_frame_layers == ["cnn", "hidden_2", "hidden_4"]
    dims12 = {"cnn": 16, **{f"hidden_{i}": 24 for i in range(13)}}
    ref = build_head(cfg_of("branch_frames"), dims12, [0], AVB)   # the reference's layers 3, 6, 9, 12
    assert ref.required_frame_layers == ["cnn", "hidden_3", "hidden_6", "hidden_9", "hidden_12"]


def test_branch_groups():
    assert branch_groups(12, 4) == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert branch_groups(12, 4, min_group=2) == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert branch_groups(2, 4) == [[1], [2]]
    assert branch_groups(5, 2) == [[1, 2, 3], [4, 5]]
    assert branch_groups(4, 1) == [[1, 2, 3, 4]]
    # token mode: no single-token groups (a one-token key set makes attention constant)
    assert branch_groups(4, 4, min_group=2) == [[1, 2], [3, 4]]
    assert branch_groups(5, 4, min_group=2) == [[1, 2, 3], [4, 5]]
    assert branch_groups(1, 4, min_group=2) == [[1]]
    assert build_head(cfg_of("branch"), DIMS, [0], AVB).groups == [[1, 2], [3, 4]]
    assert build_head(cfg_of("branch_frames"), DIMS, [0], AVB).groups == [[1], [2], [3], [4]]


def test_weighted_input_is_softmax_sum_of_hidden_layers():
    head = build_head(cfg_of("vanilla_weighted"), DIMS, [0, 1], AVB)
    with torch.no_grad():
        head.featurizer.layer_logits.copy_(torch.tensor([[0.0, 1, 2, 3, 4], [4.0, -1, 0, 0, 2]]))
    x = make_inputs(2)
    w = torch.softmax(head.featurizer.layer_logits.detach().double(), -1)
    expected = sum(w[:, i, None, None] * x.pooled[f"hidden_{i}"].double() for i in range(5))
    torch.testing.assert_close(head._features(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_config_errors():
    with pytest.raises(HeadConfigError, match=r"^unknown head arch 'mlp'; expected one of vanilla, chain, branch$"):
        build_head(HeadConfig(arch="mlp"), DIMS, [0], AVB)
    with pytest.raises(HeadConfigError, match=r"^chain_order \['type', 'two', 'two', 'culture'\] must name each of "
                                              r"type, two, high, culture exactly once$"):
        build_head(HeadConfig(arch="chain", chain_order=("type", "two", "two", "culture")), DIMS, [0], AVB)
    with pytest.raises(HeadConfigError, match=r"^hidden 10 must be divisible by n_heads 4$"):
        build_head(HeadConfig(arch="branch", hidden=10, n_heads=4), DIMS, [0], AVB)
    with pytest.raises(HeadConfigError, match=r"^input_layer 'hidden_9' is not a cached layer"):
        build_head(HeadConfig(input_layer="hidden_9"), DIMS, [0], AVB)
    with pytest.raises(HeadConfigError, match=r"without gaps, got indices \[0, 2\]"):
        build_head(HeadConfig(), {"hidden_0": 4, "hidden_2": 4}, [0], AVB)
    head = build_head(cfg_of("branch"), DIMS, [0], AVB)
    x = make_inputs(1)
    del x.pooled["hidden_3"]
    with pytest.raises(HeadConfigError, match=r"^HeadInputs.pooled lacks layer 'hidden_3' \(has: cnn, hidden_0"):
        head(x)
    with pytest.raises(HeadConfigError, match=r"^pooled 'hidden_4' has 3 runs in its leading dim, head has 2$"):
        build_head(cfg_of("vanilla"), DIMS, [0, 1], AVB)(make_inputs(3))


# ---------------------------------------------------------------- CHAIN teacher forcing

def _task_layers(head: MultiTaskHead, i: int, task: str) -> tuple[torch.Tensor, ...]:
    """Task i's own first FC over [features, chained values] (weight [R, in, H], bias), LN affine, output FC."""
    nets = head.nets
    w1 = nets.fc1.weight[:, i]
    if task.upper() in nets.chain_in:
        w1 = torch.cat([w1, nets.chain_in[task.upper()].weight], dim=1)
    fc2 = nets.fc2[task.upper()]
    return w1, nets.fc1.bias[:, i], nets.norm.weight[:, i], nets.norm.bias[:, i], fc2.weight, fc2.bias


def _chain_manual(head: MultiTaskHead, feats: torch.Tensor, feed: dict[str, torch.Tensor] | None) -> dict:
    """Independent re-statement of the chain, run by run with torch's own layers: feed[task] replaces a task's
    fed value when given."""
    out, fed = {}, []
    for i, task in enumerate(head.order):
        w1, b1, ln_w, ln_b, w2, b2 = _task_layers(head, i, task)
        x = F.layer_norm(feats, (feats.shape[-1],))
        if fed:
            x = torch.cat([x] + fed, -1)
        raw = torch.stack([
            F.linear(F.gelu(F.layer_norm(F.linear(x[r], w1[r].T, b1[r]), (w1.shape[-1],), ln_w[r], ln_b[r])),
                     w2[r].T, b2[r])
            for r in range(x.shape[0])])
        out[task] = raw if task == "type" else torch.sigmoid(raw)
        own = torch.softmax(raw, -1) if task == "type" else out[task]
        fed.append(feed[task] if feed is not None else own)
    return out


def test_chain_eval_feeds_own_predictions_and_ignores_targets():
    head = build_head(cfg_of("chain"), DIMS, [3, 7], AVB).eval()
    x = make_inputs(2)
    a = head(x, make_targets(2, seed=1))
    b = head(x, make_targets(2, seed=2))
    c = head(x)
    manual = _chain_manual(head, x.pooled["hidden_4"], None)
    for t in AVB.names:
        assert torch.equal(a[t], b[t]) and torch.equal(a[t], c[t])
        torch.testing.assert_close(a[t], manual[t], rtol=1e-5, atol=1e-6)


def test_chain_training_feeds_ground_truth():
    head = build_head(cfg_of("chain", dropout=0.0), DIMS, [3, 7], AVB).train()
    x = make_inputs(2)
    t1, t2 = make_targets(2, seed=1), make_targets(2, seed=2)
    a, b = head(x, t1), head(x, t2)
    assert torch.equal(a["type"], b["type"])                     # first in the chain sees no targets
    for t in ("two", "high", "culture"):
        assert not torch.allclose(a[t], b[t])
    feed = {t: t1[t] for t in AVB.names}
    feed["type"] = F.one_hot(t1["type"][..., 0].long(), 8).float()
    manual = _chain_manual(head, x.pooled["hidden_4"], feed)
    for t in AVB.names:
        torch.testing.assert_close(a[t], manual[t], rtol=1e-5, atol=1e-6)
    # training without targets falls back to predictions (same as eval when dropout is 0)
    no_t = head(x)
    ev = head.eval()(x)
    for t in AVB.names:
        torch.testing.assert_close(no_t[t], ev[t])


def test_chain_unknown_labels_keep_predictions():
    head = build_head(cfg_of("chain", dropout=0.0), DIMS, [5], AVB).train()
    x = make_inputs(1)
    tg = make_targets(1)
    tg["type"][0, 2, 0] = float("nan")
    tg["two"][0, 3, 1] = float("nan")
    out = head(x, tg)
    assert all(torch.isfinite(v).all() for v in out.values())
    with torch.no_grad():
        preds = head.eval()(x)
    feed = {t: tg[t].clone() for t in AVB.names}
    onehot = F.one_hot(torch.nan_to_num(tg["type"][..., 0]).long(), 8).float()
    onehot[0, 2] = torch.softmax(preds["type"][0, 2], -1)
    feed["type"] = onehot
    feed["two"][0, 3, 1] = out["two"][0, 3, 1]     # TWO's own (teacher-forced) training prediction
    manual = _chain_manual(head, x.pooled["hidden_4"], feed)
    torch.testing.assert_close(out["high"], manual["high"], rtol=1e-5, atol=1e-6)


def test_chain_order_sets_input_widths():
    head = build_head(cfg_of("chain", chain_order=("culture", "high", "two", "type")), DIMS, [0], AVB)
    assert head.nets.tasks == ("culture", "high", "two", "type")
    widths = {t: _task_layers(head, i, t)[0].shape for i, t in enumerate(head.nets.tasks)}
    assert widths == {"culture": (1, 24, 8), "high": (1, 24 + 40, 8), "two": (1, 24 + 40 + 10, 8),
                      "type": (1, 24 + 40 + 10 + 2, 8)}
    vanilla = build_head(cfg_of("vanilla"), DIMS, [0], AVB)
    assert len(vanilla.nets.chain_in) == 0 and vanilla.nets.fc1.weight.shape == (1, 4, 24, 8)


def test_chain_first_layer_is_initialised_like_one_linear_over_features_and_chained_values():
    """nn.Linear(in + e, h) draws uniform(+-1/sqrt(in + e)) for every weight and bias: the split layer does too."""
    dims = {"cnn": 16, **{f"hidden_{i}": 300 for i in range(2)}}
    head = build_head(HeadConfig(arch="chain", hidden=256), dims, [0], AVB)
    for i, task in enumerate(head.nets.tasks):
        w1, b1, *_ = _task_layers(head, i, task)
        bound = 1 / w1.shape[1] ** 0.5
        for values in (w1, b1):
            assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound, task


# ---------------------------------------------------------------- BRANCH frame mode padding

def test_branch_frames_ignore_padding():
    head = build_head(cfg_of("branch_frames"), DIMS, [3, 7], AVB).eval()
    x = make_inputs(2)
    base = head(x)
    noisy = make_inputs(2)
    for k, f in noisy.frames.items():
        f.copy_(torch.where(x.frame_mask[..., None], x.frames[k], torch.full_like(f, 1e3)))
    noisy.frames["hidden_2"][~x.frame_mask] = float("nan")
    changed = head(noisy)
    for t in AVB.names:
        torch.testing.assert_close(changed[t], base[t], rtol=0, atol=1e-6)
    # truncating the padding away gives the same output for a clip with 4 valid frames
    short = HeadInputs(pooled={}, frames={k: v[:, 1:2, :4] for k, v in x.frames.items()},
                       frame_mask=x.frame_mask[:, 1:2, :4])
    cut = head(short)
    for t in AVB.names:
        torch.testing.assert_close(cut[t], base[t][:, 1:2], rtol=1e-5, atol=1e-6)
    # a valid frame does matter
    x.frames["cnn"][:, 1, 0] += 1.0
    moved = head(x)
    assert not torch.allclose(moved["two"][:, 1], base["two"][:, 1])
    torch.testing.assert_close(moved["two"][:, 0], base["two"][:, 0])


def test_branch_frames_fully_padded_clip_is_finite_with_finite_grads():
    head = build_head(cfg_of("branch_frames"), DIMS, [3], AVB).train()
    x = make_inputs(1, n_valid=[0, 0, 2, 0, T])
    x.frames["cnn"][0, 0] = float("nan")
    out = head(x)
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


# ---------------------------------------------------------------- stacked == solo, state dicts, grads

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_joint_run_equals_solo_run(variant):
    joint = build_head(cfg_of(variant), DIMS, [3, 7], AVB)
    solo = build_head(cfg_of(variant), DIMS, [7], AVB)
    j_state, s_state = joint.run_state_dict(1), solo.run_state_dict(0)
    assert list(j_state) == list(s_state)
    for k in j_state:
        assert torch.equal(j_state[k], s_state[k]), k
    other = joint.run_state_dict(0)
    assert any(not torch.equal(other[k], j_state[k]) for k in j_state)    # the two runs differ
    x, tg = make_inputs(2), make_targets(2)
    xs, tgs = run_slice(x, 1), {k: v[1:2] for k, v in tg.items()}
    joint.eval(), solo.eval()
    je, se = joint(x, tg), solo(xs, tgs)
    joint.train(), solo.train()
    joint.set_run_generators(make_generators([100, 200]))
    solo.set_run_generators(make_generators([200]))
    jt, st = joint(x, tg), solo(xs, tgs)
    for t in AVB.names:
        torch.testing.assert_close(je[t][1:2], se[t], rtol=0, atol=1e-6)
        torch.testing.assert_close(jt[t][1:2], st[t], rtol=0, atol=1e-6)
    assert not torch.allclose(jt["high"][1:2], je["high"][1:2])   # dropout really was active


def test_default_dropout_generators_follow_seeds():
    joint = build_head(cfg_of("vanilla"), DIMS, [3, 7], AVB).train()
    solo = build_head(cfg_of("vanilla"), DIMS, [7], AVB).train()
    x = make_inputs(2)
    torch.testing.assert_close(joint(x)["high"][1:2], solo(run_slice(x, 1))["high"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["chain", "branch"])
def test_run_state_dict_round_trip(variant):
    src = build_head(cfg_of(variant), DIMS, [1], AVB).eval()
    dst = build_head(cfg_of(variant), DIMS, [5, 6], AVB).eval()
    x = make_inputs(2)
    before = dst(x)
    state = src.run_state_dict(0)
    dst.load_run_state_dict(1, state)
    after = dst(x)
    ref = src(run_slice(x, 1))
    for t in AVB.names:
        torch.testing.assert_close(after[t][1:2], ref[t], rtol=0, atol=1e-6)
        assert torch.equal(after[t][0], before[t][0])
    for v in state.values():                 # a real copy: editing it leaves the head alone
        v.add_(1.0)
    assert torch.equal(dst(x)["two"], after["two"])
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(HeadConfigError, match=r"^run state mismatch: missing \["):
        dst.load_run_state_dict(0, bad)
    with pytest.raises(HeadConfigError, match=r"^run index 2 out of range for 2 runs$"):
        dst.run_state_dict(2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_of_every_run_gets_gradient(variant):
    head = build_head(cfg_of(variant), DIMS, [3, 7], AVB).train()
    out = head(make_inputs(2), make_targets(2))
    sum((v * torch.linspace(-1, 1, v.shape[-1])).sum() for v in out.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.shape[0] == 2, name
        for r in range(2):
            assert p.grad[r].abs().sum() > 0, f"{name} run {r}"
    for name, t in head.state_dict().items():
        assert t.shape[0] == 2, name


@pytest.mark.parametrize("variant", ["chain", "branch_frames"])
def test_single_run_inputs_broadcast_to_all_runs(variant):
    head = build_head(cfg_of(variant), DIMS, [3, 7], AVB).eval()
    one = make_inputs(1)
    two = HeadInputs(pooled={k: v.repeat(2, 1, 1) for k, v in one.pooled.items()},
                     frames={k: v.repeat(2, 1, 1, 1) for k, v in one.frames.items()},
                     frame_mask=one.frame_mask.repeat(2, 1, 1))
    a, b = head(one), head(two)
    for t in AVB.names:
        assert a[t].shape == (2, B, AVB[t].out_dim)
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=1e-6)
