"""Server-side merges, checked against hand-computed numbers."""
import numpy as np
import pytest

from fednnunet.strategies import FedAvg, NoAggregation, SiteUpdate, pooled_dice, weighted_mean


def test_fedavg_is_the_hand_computed_weighted_mean():
    a = {'w': np.array([1.0, 2.0], dtype=np.float32), 'b': np.array([[0.5]], dtype=np.float32)}
    b = {'w': np.array([3.0, -2.0], dtype=np.float32), 'b': np.array([[1.5]], dtype=np.float32)}
    c = {'w': np.array([0.0, 4.0], dtype=np.float32), 'b': np.array([[-1.0]], dtype=np.float32)}
    updates = [SiteUpdate('A', a, 2), SiteUpdate('B', b, 1), SiteUpdate('C', c, 1)]
    merged = FedAvg().aggregate(0, updates, {})
    # weights 2/4, 1/4, 1/4
    np.testing.assert_allclose(merged['w'], [(2 * 1 + 3 + 0) / 4, (2 * 2 - 2 + 4) / 4], rtol=0, atol=1e-7)
    np.testing.assert_allclose(merged['b'], [[(2 * 0.5 + 1.5 - 1.0) / 4]], rtol=0, atol=1e-7)
    assert merged['w'].dtype == np.float32 and merged['b'].shape == (1, 1)
    uniform = FedAvg('uniform').aggregate(0, updates, {})
    np.testing.assert_allclose(uniform['w'], [4 / 3, 4 / 3], rtol=1e-6)


def test_a_key_is_averaged_over_the_sites_that_sent_it():
    """Per-modality encoders: a key only some sites have is averaged over those sites; others keep theirs."""
    updates = [SiteUpdate('A', {'shared': np.array([1.0]), 'enc_t1': np.array([10.0])}, 1),
               SiteUpdate('B', {'shared': np.array([3.0]), 'enc_t1': np.array([20.0]), 'enc_t2': np.array([7.0])}, 3),
               SiteUpdate('C', {'shared': np.array([5.0])}, 1)]
    previous = {'shared': np.array([0.0]), 'enc_t1': np.array([0.0]), 'enc_t2': np.array([0.0]),
                'enc_flair': np.array([-1.0])}
    merged = FedAvg().aggregate(0, updates, previous)
    np.testing.assert_allclose(merged['shared'], [(1 + 9 + 5) / 5])
    np.testing.assert_allclose(merged['enc_t1'], [(10 + 60) / 4])
    np.testing.assert_allclose(merged['enc_t2'], [7.0])
    np.testing.assert_allclose(merged['enc_flair'], [-1.0])


def test_integer_arrays_must_agree_and_shapes_must_match():
    ok = FedAvg().aggregate(0, [SiteUpdate('A', {'n': np.array([4])}, 1), SiteUpdate('B', {'n': np.array([4])}, 2)],
                            {})
    assert ok['n'].tolist() == [4]
    with pytest.raises(ValueError, match='disagree'):
        FedAvg().aggregate(0, [SiteUpdate('A', {'n': np.array([4])}, 1), SiteUpdate('B', {'n': np.array([5])}, 1)], {})
    with pytest.raises(ValueError, match='different shapes'):
        FedAvg().aggregate(0, [SiteUpdate('A', {'w': np.zeros(2)}, 1), SiteUpdate('B', {'w': np.zeros(3)}, 1)], {})
    with pytest.raises(ValueError, match='weighting'):
        FedAvg('by_size')


def test_weighted_mean_accumulates_in_float64():
    big = np.float32(1e8)
    arrays = [np.array([big], dtype=np.float32), np.array([1.0], dtype=np.float32)]
    assert weighted_mean(arrays, [1, 1])[0] == np.float32((1e8 + 1) / 2)


def test_local_strategy_sends_and_merges_nothing():
    s = NoAggregation()
    assert s.initial_state({'w': np.zeros(1)}, []) == {}
    assert s.configure_fit(0, 'A', {}) == {}
    assert s.aggregate(0, [SiteUpdate('A', {}, 1)], {}) == {}


def test_pooled_dice_from_summed_counts():
    metrics = {'A': {'tp': [10, 0], 'fp': [2, 1], 'fn': [0, 1]}, 'B': {'tp': [5, 4], 'fp': [0, 0], 'fn': [3, 0]}}
    np.testing.assert_allclose(pooled_dice(metrics), [2 * 15 / (30 + 2 + 3), 2 * 4 / (8 + 1 + 1)])


def test_the_sites_plot_keeps_its_labels_inside_the_figure():
    import matplotlib.pyplot as plt
    import seaborn as sns
    from fednnunet.progress import sites_figure
    sns.set(font_scale=2.5)  # what nnU-Net's progress plot sets for the whole process
    fig = sites_figure([0.5, 0.6, 0.7], {'A': [0.4, 0.5, 0.6], 'B': [0.6, 0.7, 0.8]})
    fig.canvas.draw()
    frame = fig.bbox
    ax = fig.axes[0]
    for text in (ax.yaxis.label, ax.xaxis.label, ax.title):
        box = text.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
            text.get_text()
    plt.close(fig)
