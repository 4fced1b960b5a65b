import torch

from fastft.utils.memory import SavedTensorMeter, saved_tensor_bytes


def test_counts_each_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    # x * x saves x twice (once per operand); the meter counts its storage once.
    with SavedTensorMeter() as meter:
        (x * x).sum()
    assert len(meter.saved) == 2
    assert meter.total_bytes == 4 * 8 * 4


def test_sums_distinct_storages():
    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert saved_tensor_bytes(lambda: a @ b.float()) == 3 * 5 * 4 + 5 * 7 * 4


def test_nothing_saved_without_grad():
    x = torch.randn(16)
    assert saved_tensor_bytes(torch.sin, x) == 0
