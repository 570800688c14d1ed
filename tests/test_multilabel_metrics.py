"""Multi-label scores (AP and mAP, F1 micro and macro, exact match, per-class thresholds) and
the multi-label loss, each against a computation by hand written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gluon_ft.deploy.metrics import (
    average_precision,
    choose_thresholds,
    mean_average_precision,
    multilabel_scores,
    precision_recall_curve,
    set_mistakes,
)

# 4 images, classes a, b, c.
PROBS = np.array(
    [
        [0.9, 0.2, 0.6],
        [0.4, 0.7, 0.1],
        [0.8, 0.6, 0.3],
        [0.3, 0.1, 0.2],
    ]
)
TARGETS = np.array(
    [
        [1, 0, 1],
        [1, 1, 0],
        [0, 1, 0],
        [0, 0, 0],
    ]
)


def test_average_precision_by_hand():
    # Ranked: + - + - +. Precision at the positives: 1/1, 2/3, 3/5.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert average_precision(scores, [1, 0, 1, 0, 1]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # Ties are one threshold: at 0.5 both tied images are taken (precision 1/3, half the
    # positives), at 0.1 all four (precision 2/4, the other half): 1/2 * 1/3 + 1/2 * 2/4.
    assert average_precision([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1]) == pytest.approx(5 / 12)
    assert average_precision([0.9, 0.5, 0.5, 0.1], [0, 0, 1, 1]) == pytest.approx(5 / 12)
    assert average_precision([0.3, 0.2], [0, 0]) is None


def test_precision_recall_curve_by_hand():
    # Ranked: + - + - +. At each score from the top: tp 1 1 2 2 3 of 1..5 predicted.
    recall, precision, thresholds = precision_recall_curve(
        [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1]
    )
    np.testing.assert_allclose(recall, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(precision, [1, 1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6, 0.5])
    # Tied scores are one point (0.5: 3 predicted, 1 positive); the curve stops at the first
    # full recall (0.1), and the 0.05 below it is not a point.
    recall, precision, thresholds = precision_recall_curve(
        [0.9, 0.5, 0.5, 0.1, 0.05], [0, 1, 0, 1, 0]
    )
    np.testing.assert_allclose(recall, [0, 0, 1 / 2, 1])
    np.testing.assert_allclose(precision, [1, 0, 1 / 3, 1 / 2])
    np.testing.assert_allclose(thresholds, [0.9, 0.5, 0.1])
    assert precision_recall_curve([0.3, 0.2], [0, 0]) is None


def test_the_area_under_the_curves_steps_is_the_average_precision():
    rng = np.random.default_rng(0)
    scores, positive = rng.random(40).round(1), rng.random(40) < 0.3  # rounded: ties
    recall, precision, _ = precision_recall_curve(scores, positive)
    area = np.sum(np.diff(recall) * precision[1:])  # each point's precision since the last
    assert area == pytest.approx(average_precision(scores, positive))


def test_set_mistakes_rank_wrong_sets_by_their_distance_from_the_truth():
    # At 0.5 images 1 (a missed) and 2 (a spurious) have wrong sets. Distance from the truth:
    # image 1 |0.4-1| + |0.7-1| + |0.1-0| = 1.0; image 2 0.8 + 0.4 + 0.3 = 1.5.
    assert set_mistakes(PROBS, TARGETS) == [2, 1]
    assert set_mistakes(PROBS, TARGETS, count=1) == [2]
    # a at 0.35 takes image 1's 0.4 (its set is right) and not image 3's 0.3.
    assert set_mistakes(PROBS, TARGETS, threshold=[0.35, 0.5, 0.5]) == [2]
    assert set_mistakes(PROBS[[0, 3]], TARGETS[[0, 3]]) == []


def test_mean_average_precision_leaves_out_a_class_without_positives():
    # a: ranked 0.9 (+), 0.8 (-), 0.4 (+): (1/1 + 2/3) / 2 = 5/6. b: 0.7 (+), 0.6 (+): 1.
    # c: 0.6 (+) first: 1. d: no positive, None, out of the mean.
    probs = np.c_[PROBS, [0.1, 0.9, 0.1, 0.1]]
    targets = np.c_[TARGETS, [0, 0, 0, 0]]
    mean_ap, per_class = mean_average_precision(probs, targets)
    assert per_class[:3] == pytest.approx([5 / 6, 1.0, 1.0]) and per_class[3] is None
    assert mean_ap == pytest.approx((5 / 6 + 1 + 1) / 3)
    assert math.isnan(mean_average_precision(probs[:, 3:], targets[:, 3:])[0])


def test_multilabel_scores_at_one_threshold_by_hand():
    # Predicted at 0.5: [1 0 1], [0 1 0], [1 1 0], [0 0 0].
    # a: predicted {0, 2}, true {0, 1}: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2.
    # b: predicted {1, 2}, true {1, 2}: P = R = F1 = 1.  c: predicted {0}, true {0}: 1.
    # micro: tp 4, fp 1, fn 1 -> 2*4 / (2*4 + 1 + 1) = 0.8; macro: (1/2 + 1 + 1) / 3.
    # exact sets: images 0 and 3 -> 2/4.
    scores = multilabel_scores(PROBS, TARGETS, ["a", "b", "c"], threshold=0.5)
    assert scores["f1_micro"] == pytest.approx(0.8)
    assert scores["f1_macro"] == pytest.approx(5 / 6)
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["map"] == pytest.approx((5 / 6 + 1 + 1) / 3)
    first = scores["per_class"][0]
    assert first == {
        "class": "a",
        "threshold": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
        "ap": pytest.approx(5 / 6),
    }
    assert [c["f1"] for c in scores["per_class"]] == [0.5, 1.0, 1.0]


def test_multilabel_scores_with_a_threshold_per_class():
    # a at 0.85: predicted {0}, true {0, 1}: P 1, R 1/2, F1 2/3. Exact sets: images 0, 2, 3.
    # micro: tp 4, fp 0, fn 1 -> 8/9.
    scores = multilabel_scores(PROBS, TARGETS, ["a", "b", "c"], threshold=[0.85, 0.5, 0.5])
    a = scores["per_class"][0]
    assert (a["threshold"], a["precision"], a["recall"]) == (0.85, 1.0, 0.5)
    assert a["f1"] == pytest.approx(2 / 3)
    assert scores["exact_match"] == pytest.approx(0.75)
    assert scores["f1_micro"] == pytest.approx(8 / 9)
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_a_class_with_no_positive_and_no_prediction_is_out_of_macro_f1():
    probs = np.c_[PROBS, [0.1, 0.1, 0.1, 0.1]]
    targets = np.c_[TARGETS, [0, 0, 0, 0]]
    scores = multilabel_scores(probs, targets, ["a", "b", "c", "d"])
    assert scores["f1_macro"] == pytest.approx(5 / 6)  # as without d
    assert scores["per_class"][3]["ap"] is None and scores["per_class"][3]["f1"] == 0.0
    # predicted once (a false positive), d counts, with F1 0
    probs[0, 3] = 0.9
    assert multilabel_scores(probs, targets, "abcd")["f1_macro"] == pytest.approx(2.5 / 4)


def test_choose_thresholds_by_hand():
    probs = np.array(
        [
            # class 0    1     2     3     4
            [0.9, 0.8, 0.9, 0.9, 0.7],
            [0.6, 0.7, 0.5, 0.8, 0.6],
            [0.4, 0.3, 0.4, 0.7, 0.5],
            [0.2, 0.1, 0.4, 0.6, 0.4],
        ]
    )
    targets = np.array(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [1, 0, 0, 1, 0],
        ]
    )
    # F1 = 2 tp / (positives + predicted) at each cut, from the highest:
    # 0: 0.9 -> 2/4, 0.6 -> 4/5, 0.4 -> 4/6, 0.2 -> 6/7: best at the lowest, 0.2 itself.
    # 1: 0.8 -> 2/3, 0.7 -> 4/4: best; halfway to the next, 0.3: 0.5.
    # 2: 0.9 -> 2/3, 0.5 -> 2/4, 0.4 (two tied) -> 4/6: 0.9 and 0.4 tie, the higher
    #    wins; halfway to 0.5: 0.7.
    # 3: 0.9 -> 2/3, 0.8 -> 2/4, 0.7 -> 2/5, 0.6 -> 4/6: a tie again -> (0.9 + 0.8) / 2.
    # 4: no positive: the default.
    chosen = choose_thresholds(probs, targets, default=0.5)
    np.testing.assert_allclose(chosen, [0.2, 0.5, 0.7, 0.85, 0.5])
    # The thresholds decide these data as the best cuts do.
    per_class = multilabel_scores(probs, targets, "abcde", chosen)["per_class"]
    assert [c["f1"] for c in per_class[:4]] == pytest.approx([6 / 7, 1.0, 2 / 3, 2 / 3])


def test_multilabel_loss_by_hand():
    import mxnet as mx

    from gluon_ft.train.multilabel_loss import MultiLabelLoss

    logits = [[2.0, -1.0, 0.5], [-3.0, 0.0, 40.0]]
    targets = [[1, 0, 1], [0, 1, 0]]
    eps, weights = 0.1, [2.0, 1.0, 0.5]

    def by_hand(smoothing: float, w) -> list[float]:
        losses = []
        for xs, ys in zip(logits, targets):
            terms = []
            for x, y, wc in zip(xs, ys, w):
                t = y * (1 - smoothing) + smoothing / 2
                log_p = -math.log1p(math.exp(-x))  # log sigmoid(x)
                log_not_p = -x - math.log1p(math.exp(-x))  # log (1 - sigmoid(x))
                terms.append(-(wc * t * log_p + (1 - t) * log_not_p))
            losses.append(sum(terms) / len(terms))
        return losses

    x, y = mx.nd.array(logits), mx.nd.array(targets)
    plain = MultiLabelLoss()(x, y).asnumpy()
    np.testing.assert_allclose(plain, by_hand(0.0, [1, 1, 1]), rtol=1e-5)
    smoothed = MultiLabelLoss(smoothing=eps, positive_weights=weights)(x, y).asnumpy()
    np.testing.assert_allclose(smoothed, by_hand(eps, weights), rtol=1e-5)
    assert np.isfinite(smoothed).all() and smoothed[1] > 1  # the 40.0 logit, wrong, is large
    with pytest.raises(ValueError, match="smoothing"):
        MultiLabelLoss(smoothing=1.0)
