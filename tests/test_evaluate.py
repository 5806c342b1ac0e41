"""Detection statistics and estimators against brute force."""

import torch

from ppl_models.evaluate import batch_test, cluster_purity, iwae_bound, roc_auc


def test_roc_auc_is_the_fraction_of_correctly_ordered_pairs_with_ties_counting_half():
    generator = torch.Generator().manual_seed(0)
    higher = torch.randint(0, 6, (40,), generator=generator).float()
    lower = torch.randint(0, 5, (30,), generator=generator).float()
    pairs = (higher[:, None] > lower[None, :]).double() + 0.5 * (higher[:, None] == lower[None, :]).double()
    assert abs(roc_auc(higher, lower) - pairs.mean().item()) < 1e-12


def test_batch_test_holds_its_false_alarm_rate_and_gains_power_with_batch_size():
    generator = torch.Generator().manual_seed(0)
    calibration, natural = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    suspect = torch.randn(1000, generator=generator) - 1.0  # one sd lower: power ~0.26 alone, ~0.997 in 20s
    results = batch_test(calibration, natural, suspect, (1, 5, 20), trials=2000)
    for n in (1, 5, 20):
        assert abs(results[n]["false_alarm"] - 0.05) < 0.02, results[n]
    powers = [results[n]["power"] for n in (1, 5, 20)]
    assert powers == sorted(powers) and powers[0] < 0.3 and powers[-1] > 0.9


def test_cluster_purity_counts_the_majority_class_of_each_cluster():
    assignments = torch.tensor([0, 0, 0, 1, 1, 2])
    labels = torch.tensor([3, 3, 1, 2, 2, 5])
    assert cluster_purity(assignments, labels) == 5 / 6


def test_iwae_bound_lies_between_the_elbo_and_the_log_mean_weight():
    log_w = torch.randn(50, 7)
    bound = iwae_bound(log_w)
    assert torch.allclose(bound, torch.log(log_w.exp().mean(0)), atol=1e-6)
    assert (bound >= log_w.mean(0)).all()  # Jensen: IWAE-k >= ELBO


def test_iwae_bound_over_chunks_of_samples_is_the_bound_over_all_of_them(monkeypatch):
    """Drawn in chunks (any k fits in memory), the log-mean-exp is accumulated exactly."""
    import ppl_models.evaluate as evaluate

    all_weights = torch.randn(23, 4, generator=torch.Generator().manual_seed(0)) * 30
    drawn = []

    def next_weights(x, num_samples, observed):
        start = sum(drawn)
        drawn.append(num_samples)
        return all_weights[start:start + num_samples]

    chunked = evaluate.chunked_iwae_bound(next_weights, torch.zeros(4, 2), 23, memory_floats=40)  # 5 at a time
    assert drawn == [5, 5, 5, 5, 3]
    assert torch.allclose(chunked, iwae_bound(all_weights), atol=1e-4)
