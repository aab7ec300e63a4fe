import pytest
import torch
import torch.nn.functional as F

from unirec.config import LoaderConfig, ModelConfig
from unirec.data.batch import to_batch
from unirec.data.loader import MixedLoader
from unirec.losses import task_losses, total_loss
from unirec.model import MultiTaskRanker
from unirec.model.towers import TOWERS
from unirec.schema import FeatureSpec


def _setup(features, batch=64, tower="cross", dot_product=False, expert_dims=()):
    spec = FeatureSpec.load(features / "feature_spec.json")
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, hidden_dim=16, head_hidden=8, tower=tower, dot_product=dot_product,
                      expert_dims=list(expert_dims))  # fmt: skip
    model = MultiTaskRanker(spec, cfg)
    ld = MixedLoader(features, spec, LoaderConfig(batch_size=batch, prefetch=0, mix="uniform"), {}, 0)
    return spec, model, to_batch(ld.next_arrays(), spec).to(torch.device("cpu"))


def test_masked_loss_matches_reference_per_task():
    torch.manual_seed(0)
    logits, label = torch.randn(50), torch.randint(0, 2, (50,)).float()
    weight, head = torch.rand(50) + 0.5, torch.randint(0, 3, (50,))
    losses, counts = task_losses(logits, label, weight, head, 4)
    for k in range(3):
        m = head == k
        ref = (F.binary_cross_entropy_with_logits(logits[m], label[m], reduction="none") * weight[m]).sum()
        assert torch.allclose(losses[k], ref / weight[m].sum(), atol=1e-6)
        assert counts[k] == m.sum()
    assert losses[3] == 0 and counts[3] == 0


@pytest.mark.parametrize("tower", [*TOWERS, "mmoe-20-12"])
def test_shapes_and_every_parameter_learns(toy_features, tower):
    tower, *dims = tower.split("-")  # mmoe-20-12: experts of widths [20, 12] under heads that read 12
    spec, model, batch = _setup(toy_features, batch=512, tower=tower, expert_dims=[int(d) for d in dims])
    if dims:
        assert model.heads.heads["home"][0].in_features == 12
    logits = model(batch)
    assert logits.shape == (len(batch),)
    assert model.all_logits(batch).shape == (len(batch), len(spec.tasks))
    losses, _ = task_losses(
        logits, batch.label, batch.weight, model.head_index(batch.task_type), len(spec.tasks)
    )
    total_loss(losses, torch.ones(len(spec.tasks))).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == [], silent


def test_a_row_trains_only_its_own_head(toy_features):
    spec, model, batch = _setup(toy_features)
    home = spec.tasks["home"].id
    keep = batch.task_type == home
    logits = model(batch)
    losses, _ = task_losses(
        logits[keep],
        batch.label[keep],
        batch.weight[keep],
        model.head_index(batch.task_type[keep]),
        len(spec.tasks),
    )
    losses.sum().backward()
    for name in spec.tasks:
        grads = [p.grad for p in model.heads.heads[name].parameters()]
        touched = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert touched == (name == "home"), name


@pytest.mark.parametrize("dot_product", [False, True])
def test_context_encoded_once_matches_row_by_row_forward(toy_features, dot_product):
    spec, model, batch = _setup(toy_features, dot_product=dot_product)
    model.eval()
    i = 0
    n = 10
    ctx = {k: v[i : i + 1] for k, v in batch.context.items()}
    c = model.encode_context(ctx, batch.present[i : i + 1], batch.task_type[i : i + 1])
    cands = {k: v[:n] for k, v in batch.candidate.items()}
    with pytest.raises(ValueError, match="pass memory=model.context_memory"):  # the toy default attends
        model.score_candidates(c, cands, batch.task_type[i : i + 1])
    memory = model.context_memory(ctx, batch.present[i : i + 1])
    once = model.score_candidates(c, cands, batch.task_type[i : i + 1], memory)
    rows = type(batch)(
        {k: v[i : i + 1].expand(n, *v.shape[1:]) for k, v in batch.context.items()},
        batch.present[i : i + 1].expand(n, -1),
        cands,
        batch.task_type[i : i + 1].expand(n),
        batch.label[:n],
        batch.weight[:n],
        batch.request_id[:n],
    )
    assert torch.allclose(once, model(rows), atol=1e-6)


def test_ddp_normalisation_gives_the_global_mean_gradient():
    """Two ranks' losses (global weight sums, scaled by world), averaged as DDP averages gradients, equal
    the single-process gradient of the whole batch, even with a task absent from one rank."""
    torch.manual_seed(1)
    x = torch.randn(40, requires_grad=True)
    y = torch.randint(0, 2, (40,)).float()
    w = torch.rand(40) + 0.5
    h = torch.cat([torch.randint(0, 2, (20,)), torch.randint(0, 3, (20,))])  # task 2 only on rank 1
    lw = torch.tensor([1.0, 0.5, 2.0])
    ref = torch.autograd.grad(total_loss(task_losses(x, y, w, h, 3)[0], lw), x)[0]
    halves = [slice(0, 20), slice(20, 40)]

    def global_wsum(_):
        return sum(torch.zeros(3).index_add(0, h[s], w[s]) for s in halves)

    grads = [
        torch.autograd.grad(total_loss(task_losses(x[s], y[s], w[s], h[s], 3, global_wsum, 2)[0], lw), x)[0]
        for s in halves
    ]
    assert torch.allclose(sum(grads) / 2, ref, atol=1e-7)


def test_unknown_tower_is_named():
    with pytest.raises(ValueError, match="model.tower='moe'"):
        from unirec.model.towers import build_tower

        build_tower("moe", 8, 2, 2, 4, 0.0)
    with pytest.raises(ValueError, match="expert_dims"):
        build_tower("ple", 8, 2, 2, 4, 0.0, [16])


def test_each_row_is_encoded_as_its_own_candidate_type(toy_features):
    """genre_rows rows rank genres, the other rows items: a row's score moves with its own type's fields
    and not with the other type's (which hold sentinels there), and the two types get distinct vectors."""
    spec, model, batch = _setup(toy_features, batch=512)
    assert sorted(model.candidate_types) == ["genre", "item"]
    genre_rows = batch.task_type == spec.tasks["genre_rows"].id
    assert 0 < int(genre_rows.sum()) < len(batch)
    model.eval()
    with torch.no_grad():
        base = model(batch)
        item_noise = {**batch.candidate, "item": torch.randint(2, 50, batch.candidate["item"].shape)}
        moved = model(type(batch)(**{**vars(batch), "candidate": item_noise}))
        assert torch.equal(moved[genre_rows], base[genre_rows])
        assert not torch.equal(moved[~genre_rows], base[~genre_rows])
        genre_noise = {**batch.candidate, "row_genre": (batch.candidate["row_genre"] + 1) % 14}
        moved = model(type(batch)(**{**vars(batch), "candidate": genre_noise}))
        assert torch.equal(moved[~genre_rows], base[~genre_rows])
        assert not torch.equal(moved[genre_rows], base[genre_rows])
    with pytest.raises(ValueError, match="name the candidate type"):
        model.encode_candidates({"item": torch.tensor([2])})


@pytest.mark.parametrize("tower", TOWERS)
def test_single_head_scores_equal_the_all_head_path(toy_features, tower):
    """Serving runs only the request's own head (TaskHeads.pick); its logits are the all-K-heads logits
    (``interact``, as training computes them) at each row's own head, bit for bit on the same rows."""
    spec, model, batch = _setup(toy_features, batch=256, tower=tower)
    model.eval()
    with torch.inference_mode():
        c = model.encode_context(batch.context, batch.present, batch.task_type)
        v = model.encode_rows(batch.candidate, batch.task_type)
        head = model.head_index(batch.task_type)
        every = model.interact(c, v, batch.task_type)  # [B, K]
        assert len(head.unique()) > 1  # rows of several tasks: pick runs each named head on its rows
        picked = model.head_logits(c, v, head)
        assert torch.allclose(picked, every.gather(1, head[:, None]).squeeze(1), atol=1e-6, rtol=0)
        for k, name in enumerate(model.task_names):  # one task's rows, as a request: exactly equal
            one = model.head_logits(c, v, torch.full_like(head, k))
            assert torch.equal(one, every[:, k]), name


def test_the_dot_product_term_is_in_every_path_and_the_catalogue_logits_are_it(toy_features):
    """model.dot_product adds <c, v> / sqrt(H) to every head's logit, the same in the all-heads (training)
    and one-head (serving) paths; catalogue_logits is that term against a whole catalogue, from the
    context before attention."""
    spec, plain, batch = _setup(toy_features, batch=128)
    _, dotted, _ = _setup(toy_features, batch=128, dot_product=True)
    dotted.load_state_dict(plain.state_dict())  # the same weights: the term is the only difference
    for m in (plain, dotted):
        m.eval()
    with torch.inference_mode():
        c = plain.encode_context(batch.context, batch.present, batch.task_type)
        v = plain.encode_rows(batch.candidate, batch.task_type)
        term = (c * v).sum(1) / 16**0.5
        head = plain.head_index(batch.task_type)
        torch.testing.assert_close(
            dotted.interact(c, v, batch.task_type), plain.interact(c, v, batch.task_type) + term[:, None]
        )
        torch.testing.assert_close(dotted.head_logits(c, v, head), plain.head_logits(c, v, head) + term)
        items = {
            k: t[:20] for k, t in batch.candidate.items() if k in dotted.candidate_embedding["item"].names
        }
        full = dotted.catalogue_logits(c[:5], items, "item")
        torch.testing.assert_close(full, c[:5] @ dotted.encode_candidates(items, "item").T / 16**0.5)


@pytest.mark.parametrize("tower,dot_product", [(t, False) for t in TOWERS] + [("cross", True)])
def test_the_pools_scored_in_training_equal_each_pool_scored_alone(toy_features, tower, dot_product):
    """Training scores every task's sampled-softmax pool (pools of several widths) from the batch encoded
    once (encode_request); each pool's logits equal score_matrix on that pool alone, the path full ranking
    and serving take, and the gradient reaches the model through every pool."""
    spec, model, batch = _setup(toy_features, batch=256, tower=tower, dot_product=dot_product)
    head = model.head_index(batch.task_type)
    pools = []
    for k in range(len(spec.tasks)):
        width = (7, 3, 5)[k % 3]
        mine = torch.nonzero(head == k).squeeze(1)
        pools.append((mine[: 4 + k], mine[-width:]))
    own, pairs = model(batch, pools)
    c, memory = model.encode_request(batch.context, batch.present, batch.task_type)
    assert torch.allclose(c, model.encode_context(batch.context, batch.present, batch.task_type), atol=1e-6)
    v = model.encode_rows(batch.candidate, batch.task_type)
    for (rows, pool), got in zip(pools, pairs):
        mem = {name: tuple(t[rows] for t in m) for name, m in memory.items()}
        want = model.score_matrix(c[rows], v[pool], batch.task_type[rows], mem)
        assert got.shape == (len(rows), len(pool))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sum(p.sum() for p in pairs).backward()
    assert model.tables["item"].weight.grad.abs().sum() > 0
    for name in spec.tasks:  # every pool's own head got its gradient
        g = model.heads.heads[name][0].weight.grad
        assert g is not None and g.abs().sum() > 0, name
