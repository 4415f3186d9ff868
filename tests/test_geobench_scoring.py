"""GEO-Bench scoring: IQM, normalisation, stratified bootstrap (parity with the official algorithm), test metrics."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
from scipy.stats import trim_mean
from sklearn.metrics import average_precision_score, f1_score

from eo_dinov3.evaluation import scoring

# Hand-made per-seed table: two tasks, four seeds, with a normalizer.
NORMALIZER = {"m-eurosat": (0.5, 1.0), "m-chesapeake": (0.2, 0.6)}
TABLE = {"m-eurosat": [0.90, 0.80, 0.70, 1.00], "m-chesapeake": [0.40, 0.50, 0.30, 0.60]}
# normalised: eurosat [0.8, 0.6, 0.4, 1.0], chesapeake [0.5, 0.75, 0.25, 1.0]
# pooled sorted [0.25, 0.4, 0.5, 0.6, 0.75, 0.8, 1.0, 1.0]; int(0.25*8)=2 cut each end -> mean(0.5, 0.6, 0.75, 0.8)
HAND_IQM = 0.6625
HAND_TASK_IQM = {"m-eurosat": 0.7, "m-chesapeake": 0.625}


def test_iqm_equals_scipy_trim_mean():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 7, 10, 13, 100):
        a = rng.random(n)
        assert scoring.iqm(a) == pytest.approx(trim_mean(a, 0.25))
    assert scoring.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)


def test_hand_table_normalised_iqm():
    s = scoring.aggregate_suite(TABLE, NORMALIZER, repeat=500)
    n = s["normalized"]
    assert n["iqm"] == pytest.approx(HAND_IQM)
    for t, v in HAND_TASK_IQM.items():
        assert n["per_task"][t]["iqm"] == pytest.approx(v)
    assert n["ci_low"] <= HAND_IQM <= n["ci_high"]
    assert s["mean"] == pytest.approx((0.85 + 0.45) / 2)
    assert scoring.aggregate_suite(TABLE, {"m-eurosat": (0, 1)})["normalized"] is None  # missing task -> raw only


def _frame(table: dict, normalizer: dict) -> pd.DataFrame:
    rows = []
    for task, vals in table.items():
        for seed, v in enumerate(vals):
            rows.append({"model": "ours", "dataset": task, "partition name": "default", "seed": seed,
                         "test metric": v})  # fmt: skip
    df = pd.DataFrame(rows)
    df["normalized test metric"] = [(v - normalizer[d][0]) / (normalizer[d][1] - normalizer[d][0])
                                    for d, v in zip(df["dataset"], df["test metric"])]  # fmt: skip
    return df


def _official_algorithm_pandas(df: pd.DataFrame, repeat: int, seed: int):
    """The official plot_tools.bootstrap_iqm_aggregate / bootstrap_iqm steps, written with pandas and the global
    numpy RNG exactly as the official code calls them."""
    metric = "normalized test metric"
    np.random.seed(seed)
    group = df.groupby(["model", "dataset", "partition name"])
    agg = []
    for _ in range(repeat):
        new = group.sample(frac=1, replace=True)
        agg.append(new.groupby(["model", "partition name"])[metric].apply(lambda s: trim_mean(s, 0.25)).iloc[0])
    np.random.seed(seed + 1)
    per = {t: [] for t in sorted(df["dataset"].unique())}
    for _ in range(repeat):
        series = df.groupby(["model", "dataset", "partition name"])[metric].apply(
            lambda s: trim_mean(np.random.choice(s, size=len(s), replace=True), 0.25))
        for (_, t, _), v in series.items():
            per[t].append(v)
    return np.array(agg), {t: np.array(v) for t, v in per.items()}


def test_bootstrap_draws_match_official_algorithm():
    df = _frame(TABLE, NORMALIZER)
    norm = {t: list(g["normalized test metric"]) for t, g in df.groupby("dataset", sort=False)}
    ref_agg, ref_per = _official_algorithm_pandas(df, repeat=50, seed=3)
    np.testing.assert_allclose(scoring.bootstrap_iqm_aggregate(norm, repeat=50, seed=3), ref_agg)
    ours_per = scoring.bootstrap_iqm_per_task(norm, repeat=50, seed=4)
    for t in ref_per:
        np.testing.assert_allclose(ours_per[t], ref_per[t])


def test_bootstrap_matches_official_plot_tools_when_installed(monkeypatch):
    for mod in [m for m in sys.modules if m == "geobench" or m.startswith("geobench.")]:
        monkeypatch.delitem(sys.modules, mod)
    gb = pytest.importorskip("geobench")
    if not hasattr(gb, "task_iterator"):
        pytest.skip("the official geobench package is not installed")
    if "seaborn" not in sys.modules:  # plot_tools imports seaborn only for plotting styles
        fake = types.ModuleType("seaborn")
        fake.set_style = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, "seaborn", fake)
    from geobench import plot_tools

    df = _frame(TABLE, NORMALIZER)
    norm_obj = plot_tools.Normalizer({k: list(v) for k, v in NORMALIZER.items()})
    col = norm_obj.normalize_data_frame(df, "test metric")
    np.random.seed(11)
    official = plot_tools.bootstrap_iqm_aggregate(df, metric=col, repeat=40)[col].to_numpy()
    norm = {t: list(g[col]) for t, g in df.groupby("dataset", sort=False)}
    np.testing.assert_allclose(scoring.bootstrap_iqm_aggregate(norm, repeat=40, seed=11), official)
    np.random.seed(12)
    off_per = plot_tools.bootstrap_iqm(df, metric=col, repeat=40)
    ours = scoring.bootstrap_iqm_per_task(norm, repeat=40, seed=12)
    for t in NORMALIZER:
        np.testing.assert_allclose(ours[t], off_per[off_per["dataset"] == t][col].to_numpy())
    assert plot_tools.iqm(df[col]) == pytest.approx(HAND_IQM)


def test_stratified_bootstrap_never_mixes_tasks():
    # task a all 0, task b all 1, same seed count: every stratified resample pools 4 zeros + 4 ones -> IQM 0.5
    boot = scoring.bootstrap_iqm_aggregate({"a": [0.0] * 4, "b": [1.0] * 4}, repeat=200, seed=0)
    assert np.all(boot == 0.5)


def test_classification_metrics_and_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    scores = np.eye(3)[np.where(rng.random(200) < 0.8, y, (y + 1) % 3)]
    m = scoring.classification_metrics(scores, y, multilabel=False, n_boot=500)
    v, lo, hi = m["accuracy"]
    assert v == pytest.approx((scores.argmax(1) == y).mean()) and lo < v < hi and hi - lo < 0.15
    yl = (rng.random((60, 5)) < 0.3).astype(int)
    prob = np.clip(yl * 0.6 + rng.random((60, 5)) * 0.5, 0, 1)
    ml = scoring.classification_metrics(prob, yl, multilabel=True, n_boot=100)
    assert ml["micro_f1"][0] == pytest.approx(f1_score(yl, prob >= 0.5, average="micro"))
    assert ml["micro_map"][0] == pytest.approx(average_precision_score(yl, prob, average="micro"))


def test_miou_conventions():
    y = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 2, 2, 2]])
    cm = scoring.confusion(pred, y, 4)  # classes 0 and 3 absent from GT and prediction -> ignored
    assert scoring.miou_from_confusion(cm) == pytest.approx((1 / 2 + 2 / 3) / 2)
    y0 = np.array([[0, 1, 1, 1]])
    p0 = np.array([[1, 1, 1, 0]])
    cm0 = scoring.confusion(p0, y0, 2)
    assert scoring.miou_from_confusion(cm0) == pytest.approx((0 + 2 / 4) / 2)
    assert scoring.miou_from_confusion(cm0, exclude=(0,)) == pytest.approx(2 / 4)
    seg = scoring.segmentation_metrics(np.stack([cm0, cm0]), with_excl0=True, n_boot=50)
    assert set(seg) == {"miou", "miou_excl0"}
