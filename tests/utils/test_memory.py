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


def test_a_storage_released_inside_the_block_is_not_mistaken_for_a_later_one():
    """Each graph below is dropped before the next is built, so the allocator may hand the next saved tensor the
    freed address; the meter holds what it saw until the block ends, so every one of the 8 storages counts."""
    with SavedTensorMeter() as meter:
        for _ in range(8):
            y = torch.randn(64, requires_grad=True).exp()  # exp saves its output (256 bytes)
            del y
    assert meter.total_bytes == 8 * 256 and len(meter.saved) == 8
    assert meter._held == []  # released at the end of the block


def test_nothing_saved_without_grad():
    x = torch.randn(16)
    assert saved_tensor_bytes(torch.sin, x) == 0


def test_peak_meter_counts_live_tensors_at_once():
    from fastft.utils.memory import PeakMemoryMeter

    x = torch.randn(1000)
    with PeakMemoryMeter() as meter:
        a = x * 2  # 4000 bytes
        b = a + 1  # 8000 alive
        del a  # 4000
        c = torch.empty(1500)  # 10000 alive: the peak
        del b, c
    assert meter.peak_bytes == 10000
    assert meter.end_bytes == 0
    assert sorted(live.nbytes for live in meter.at_peak) == [4000, 6000]
    assert any("aten::add" in live.ops for live in meter.at_peak)


def test_peak_meter_counts_only_the_blocks_allocations():
    from fastft.utils.memory import PeakMemoryMeter

    x = [torch.randn(1000)]
    with PeakMemoryMeter() as meter:
        x.pop()  # a tensor from before the block, freed inside it: not seen
        y = torch.empty(2000)
    assert meter.peak_bytes == 8000
    assert meter.end_bytes == 8000
    del y


def test_peak_meter_sees_a_backward_transient():
    from fastft.utils.memory import PeakMemoryMeter

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)
    with PeakMemoryMeter() as meter:
        (x @ w).sum().backward()  # the product (256 x 64) and the gradient of w (64 x 64) at least
    assert meter.peak_bytes >= 256 * 64 * 4 + 64 * 64 * 4
