"""The item-transition prior (model.transitions) end to end: counted from the train split before training,
carried in the exported weights, and added alike by the training forward, full ranking and the scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_train
from tests.serve.conftest import assert_scores_match_forward
from unirec.baselines import transition_table
from unirec.config import ValidProtocol
from unirec.data.loader import eval_batches
from unirec.evaluate import load
from unirec.export import export
from unirec.ranking import full_ranking, model_matrix_scorer
from unirec.schema import FeatureSpec
from unirec.serve.scorer import Scorer
from unirec.validation import FULL_METRICS, PRIOR_GRID, Validation


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, toy_cfg, toy_features) -> Path:
    run = tmp_path_factory.mktemp("prior-run")
    args = [
        "debug=toy",
        f"data.cache_dir={toy_cfg.data.cache_dir}",
        f"hydra.run.dir={run}",
        "model.transitions=true",
    ]
    r = run_train(args, cwd=run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, prior_run) -> Scorer:
    return Scorer.load(export(prior_run, tmp_path_factory.mktemp("prior-registry")))


def _features(run: Path) -> Path:
    return Path(json.loads((run / "metrics.json").read_text())["features"])


def test_the_exported_counts_are_the_train_transitions_and_the_weights_moved(scorer, prior_run):
    prior = scorer.model.transitions
    spec = FeatureSpec.load(_features(prior_run) / "feature_spec.json")
    want = transition_table(_features(prior_run), spec, prior.id_field, prior.window)
    assert want.sum() > 100  # the toy canvases' histories do chain items
    np.testing.assert_array_equal(prior.counts.numpy(), want)
    uses = dict(zip(scorer.model.task_names, prior.uses.tolist()))
    assert uses["home"] == 1.0 and uses["search"] == 1.0 and uses["related"] == 0.0  # related: no history
    # transitions_fit=valid: every weight is a value of the grid, and some validation chose the prior.
    weights = dict(zip(scorer.model.task_names, prior.weight.tolist()))
    assert all(w in PRIOR_GRID for w in weights.values()), weights
    assert any(weights[t] > 0 for t in uses if uses[t]), weights
    assert "transition prior weights, fitted on valid" in (prior_run / "train.log").read_text()


@pytest.mark.parametrize("task", ["home", "search", "related"])
def test_served_scores_equal_the_training_forward(scorer, prior_run, task):
    assert assert_scores_match_forward(scorer, _features(prior_run), task, requests=30) > 50


def test_full_ranking_and_serving_add_the_same_prior(scorer, prior_run):
    """A valid home request with a history, scored over the whole catalogue by full ranking's scorer and by
    the service's scorer (alone and micro-batched beside another request): the same scores; and the prior
    moves them (the same request with its weight zeroed scores otherwise)."""
    raw = pq.read_table(_features(prior_run).parent / "labeled" / "split=valid" / "task=home")
    raw = raw.filter(pc.greater(pc.list_value_length(raw["history"]), 2)).slice(0, 1)
    context = {f: raw[f][0].as_py() for f in scorer.spec.context}
    cat = scorer.artifact.catalogues["item"]
    saved = scorer.model.transitions.weight.detach().clone()
    try:
        with torch.no_grad():
            scorer.model.transitions.weight.fill_(2.0)  # whatever valid chose, a prior that counts
        matrix = model_matrix_scorer(scorer.model, scorer.artifact.featurizer, {"item": cat})
        full = matrix("home", raw.select(list(scorer.spec.context)))[0].numpy()
        served = scorer.score("home", context, cat.to_pylist())
        np.testing.assert_allclose(served, full, rtol=0, atol=1e-6)
        other = scorer.prepare(
            "home", {"user": "4", "history": cat.slice(0, 2).to_pylist()}, cat.to_pylist()[:9]
        )
        batched = scorer.score_encoded(
            scorer.encode_prepared([other, scorer.prepare("home", context, cat.to_pylist())])
        )
        np.testing.assert_allclose(batched[1], served, rtol=0, atol=1e-6)
        with torch.no_grad():
            scorer.model.transitions.weight.zero_()
        assert np.abs(scorer.score("home", context, cat.to_pylist()) - served).max() > 1e-4
    finally:
        with torch.no_grad():
            scorer.model.transitions.weight.copy_(saved)  # the module's scorer, as loaded


def test_full_validation_reuses_the_calibration_s_ranking(prior_run):
    """Under the full protocol the prior's tasks take their metrics from the weight fit's own ranking: they
    equal a fresh full ranking of the calibrated model, and the tasks without a prior are ranked too."""
    loaded = load(prior_run, "best")
    model, featurizer = loaded.model, loaded.featurizer
    v = Validation(loaded.features, featurizer.spec, ValidProtocol.full, 1024)
    got = v.model(model, torch.device("cpu"))
    uses = dict(zip(model.task_names, model.transitions.uses.tolist()))
    assert set(got) == set(featurizer.spec.tasks) and not uses["related"]
    cats = {c: featurizer.catalogue_ids(c) for c in featurizer.spec.candidates}
    model.eval()
    want = full_ranking(
        {"m": model_matrix_scorer(model, featurizer, cats)},
        loaded.features.parent,
        featurizer.spec,
        "valid",
        cats,
    )["m"]
    for task, scores in got.items():
        assert set(scores) == set(FULL_METRICS), scores
        for key in FULL_METRICS:
            assert scores[key] == pytest.approx(want[task][key], abs=1e-9), (task, key)


@pytest.mark.parametrize("task", ["home", "related"])
def test_evaluation_encodes_a_request_once_and_scores_as_the_forward(prior_run, task):
    """The sampled protocol's scorer encodes each request's context once for its rows
    (``request_logits``): the same logits as the row-by-row forward, history attention and prior included."""
    loaded = load(prior_run, "best")
    model, spec = loaded.model.eval(), loaded.featurizer.spec
    batch = next(iter(eval_batches(loaded.features, spec, "valid", task, 512)))
    assert len(torch.unique(batch.request_id)) < len(batch) / 2  # many rows a request
    with torch.inference_mode():
        want, got = model(batch), model.request_logits(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
