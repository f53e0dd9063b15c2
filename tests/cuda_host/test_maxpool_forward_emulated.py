"""The CUDA max-pool forward kernel (max and int8 window offset in one pass), emulated on the host:
outputs and offsets bit for bit those of the CPU form (itself bitwise equal to stock max pooling),
under every thread schedule."""

import pytest
import torch
import torch.nn.functional as F
from slimtune import reference

pytestmark = pytest.mark.cuda_host

CPU = torch.ops.slimtune
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}

# (input shape, kernel, stride, padding, dilation, ceil_mode); the spatial dims are the last
# len(kernel). Overlapping windows, padded borders, dilation and ceil_mode's partial last window;
# output counts that are not a multiple of the 256-thread block.
PLANAR = [
    ((2, 3, 17), [3], [1], [1], [1], False),
    ((2, 3, 19), [4], [2], [2], [2], True),
    ((3, 1, 40), [5], [3], [2], [1], True),
    ((2, 3, 9, 7), [3, 3], [2, 2], [1, 1], [1, 1], False),
    ((1, 2, 9, 10), [2, 3], [1, 2], [0, 0], [2, 1], True),
    ((2, 3, 33, 35), [3, 3], [2, 2], [1, 1], [1, 1], False),  # 1836 outputs: eight blocks, the last partial
    ((1, 1, 11, 12), [3, 2], [3, 2], [1, 1], [1, 3], True),
    ((1, 2, 4, 5, 3), [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], False),
    ((1, 2, 7, 6, 8), [3, 2, 3], [2, 1, 2], [1, 0, 1], [1, 2, 1], True),
    ((3, 9, 7), [3, 3], [2, 2], [1, 1], [1, 1], False),  # no batch dim
]
# Channels-last inputs (spatial 2-D or 3-D): 3 channels take the scalar path; 8, 16 and 24 split
# into 16-byte vectors for every dtype (8 for 16-bit types, 4 for float, 2 for double), 6 only
# for double.
CHANNELS_LAST = [
    ((2, 3, 9, 7), [3, 3], [2, 2], [1, 1], [1, 1], False),
    ((1, 3, 9, 10), [2, 3], [1, 2], [0, 1], [2, 1], True),
    ((2, 8, 7, 6), [3, 3], [1, 1], [1, 1], [1, 1], False),
    ((1, 16, 9, 9), [3, 3], [2, 2], [1, 1], [1, 1], True),
    ((3, 24, 5, 7), [2, 3], [2, 1], [1, 1], [1, 2], False),
    ((2, 6, 8, 5), [3, 2], [2, 2], [1, 1], [1, 1], True),
    ((1, 3, 4, 5, 3), [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], False),
    ((2, 8, 5, 4, 6), [3, 2, 3], [2, 1, 2], [1, 1, 1], [1, 1, 1], True),
]


def nd_of(case):
    return len(case[1])


def layout(nd):
    return torch.channels_last if nd == 2 else torch.channels_last_3d


def hard_input(shape, dtype, seed):
    """Few distinct values (ties in most windows) with NaNs and -infs sprinkled in: whole windows
    of -inf, NaN on first, middle and last taps, several NaNs in one window."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
    u = torch.rand(shape, generator=gen)
    x[u < 0.05] = float("nan")
    x[(u >= 0.05) & (u < 0.25)] = float("-inf")
    return x.to(dtype)


def bits(t):
    return t.view(BITS[t.dtype])


def check_against_cpu(emu, x, case, stock=True):
    _, kernel, stride, padding, dilation, ceil = case
    args = (kernel, stride, padding, dilation, ceil)
    out, offsets = emu.memsave_maxpool_forward(x, *args)
    want_out, want_offsets = CPU.memsave_maxpool_forward(x, *args)
    assert out.dtype == x.dtype and offsets.dtype == torch.int8
    assert out.shape == want_out.shape and out.stride() == want_out.stride()
    assert offsets.stride() == want_offsets.stride()
    assert torch.equal(bits(out), bits(want_out))
    assert torch.equal(offsets, want_offsets)
    if not stock:  # a shape stock pooling refuses
        return out, offsets
    # And against stock max pooling: the same maxima, the argmax of ATen's indices.
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    stock, idx = fn(x, kernel, stride, padding, dilation, ceil_mode=ceil, return_indices=True)
    torch.testing.assert_close(out, stock, rtol=0, atol=0, equal_nan=True)
    want = reference.memsave_maxpool_offsets(idx.contiguous(), list(x.shape), kernel, stride, padding, dilation)
    # Stock channels-last 3-D pooling in half/bfloat16 leaves an all -inf window's index outside the
    # window; everywhere else its argmax is ours.
    valid = (want >= 0) & (want < torch.tensor(kernel).prod())
    assert valid.sum() >= want.numel() - (stock == float("-inf")).sum()
    assert torch.equal(offsets.long()[valid], want[valid])
    return out, offsets


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", PLANAR, ids=str)
def test_planar(emu, schedule, dtype, case):
    x = hard_input(case[0], dtype, seed=len(case[0]) * 7 + case[1][0])
    out, offsets = check_against_cpu(emu, x, case)
    assert out.is_contiguous() and offsets.is_contiguous()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", CHANNELS_LAST, ids=str)
def test_channels_last(emu, schedule, dtype, case):
    x = hard_input(case[0], dtype, seed=case[0][1]).contiguous(memory_format=layout(nd_of(case)))
    out, offsets = check_against_cpu(emu, x, case)
    assert out.is_contiguous(memory_format=layout(nd_of(case)))
    assert offsets.is_contiguous(memory_format=layout(nd_of(case)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_channels_last_unaligned(emu, schedule, dtype):
    """A channels-last view one element into its storage cannot take 16-byte loads: the scalar path
    gives the same result."""
    case = CHANNELS_LAST[2]
    x = hard_input(case[0], dtype, seed=5).contiguous(memory_format=torch.channels_last)
    buf = torch.empty(x.numel() + 1, dtype=dtype)
    shifted = buf.as_strided(x.shape, x.stride(), 1)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    out, offsets = check_against_cpu(emu, shifted, case)
    assert torch.equal(bits(out), bits(emu.memsave_maxpool_forward(x, *case[1:])[0]))


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_windows(emu, schedule, dtype):
    """Hand-placed windows (k3 s3, no overlap): all -inf, NaN first, NaN last, two NaNs, a tie
    between the first and last tap, -0.0 against 0.0."""
    nan, inf = float("nan"), float("inf")
    windows = [
        [-inf, -inf, -inf],
        [nan, 5.0, 7.0],
        [1.0, 2.0, nan],
        [nan, 3.0, nan],
        [4.0, -1.0, 4.0],
        [-0.0, 0.0, -1.0],
        [0.0, -0.0, -inf],
        [-inf, 2.0, inf],
    ]
    x = torch.tensor(windows, dtype=torch.float64).view(1, 1, -1).to(dtype)
    out, offsets = check_against_cpu(emu, x, ((1, 1, 24), [3], [3], [0], [1], False))
    assert offsets.view(-1).tolist() == [0, 0, 2, 2, 0, 0, 0, 2]
    assert torch.equal(bits(out).view(-1)[5:7], bits(x).view(-1)[[15, 18]])  # the sign of the first zero


def test_empty_and_one(emu, schedule):
    for shape in ((0, 3, 6, 6), (2, 0, 6, 6), (1, 1, 1, 1)):
        x = torch.randn(shape)
        out, _ = check_against_cpu(emu, x, (shape, [1, 1], [1, 1], [0, 0], [1, 1], False), stock=shape[1] > 0)
        assert out.shape == shape
    x = torch.randn(0, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    check_against_cpu(emu, x, (x.shape, [2, 2], [2, 2], [0, 0], [1, 1], False))


def test_noncontiguous_input(emu, schedule):
    x = hard_input((2, 3, 10, 14), torch.float32, seed=3)[:, :, :, ::2]
    out, offsets = check_against_cpu(emu, x, (x.shape, [3, 3], [2, 2], [1, 1], [1, 1], True))
    assert out.is_contiguous()


BAD = [
    (torch.ones(1, 2, 5, 5, dtype=torch.int64), [2, 2], [2, 2], [0, 0], [1, 1]),  # x: not float
    (torch.randn(1, 2, 5, 5), [], [], [], []),  # kernel_size: empty
    (torch.randn(1, 2, 5, 5), [2, 2], [2], [0, 0], [1, 1]),  # stride: one entry short
    (torch.randn(1, 2, 8, 8), [2, 2], [2, 2], [2, 2], [1, 1]),  # padding: over half the window
    (torch.randn(1, 2, 8, 8), [2, 2], [0, 2], [0, 0], [1, 1]),  # stride: zero
    (torch.randn(2, 20, 20), [12, 12], [1, 1], [0, 0], [1, 1]),  # kernel_size: 144 taps > int8
    (torch.randn(1, 2, 3, 3), [2, 2], [1, 1], [0, 0], [3, 3]),  # kernel_size: wider than the input
    (torch.randn(5), [2, 2], [1, 1], [0, 0], [1, 1]),  # x: too few dims
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: f"{tuple(b[0].shape)}-{b[1]}-{b[2]}-{b[3]}-{b[4]}")
def test_bad_arguments_raise_as_on_cpu(emu, bad):
    """The one argument check of both forms: the same message, naming the argument."""
    messages = []
    for ops in (emu, CPU):
        with pytest.raises(RuntimeError, match="memsave_maxpool_forward: argument '") as err:
            ops.memsave_maxpool_forward(*bad, False)
        messages.append(str(err.value).splitlines()[0])
    assert messages[0] == messages[1]


NAN_PAYLOADS = {
    torch.float16: [0x7C01, 0x7E01, -512, 0x7FFF, -1],
    torch.bfloat16: [0x7F81, 0x7FC1, -1, -64],
    torch.float32: [0x7F800001, 0x7FC00001, -1],
    torch.float64: [0x7FF0000000000001, -1],
}


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_payloads(emu, schedule, dtype):
    """NaNs of any payload come out as the CPU form writes them (16-bit ones canonical)."""
    nans = torch.tensor(NAN_PAYLOADS[dtype], dtype=BITS[dtype]).view(dtype)
    x = torch.zeros(2, len(nans), 3, 3, dtype=dtype)
    x[:, :, 1, 1] = nans
    for xs in (x, x.contiguous(memory_format=torch.channels_last)):
        out, _ = check_against_cpu(emu, xs, (x.shape, [2, 2], [1, 1], [0, 0], [1, 1], False))
        assert out.isnan().sum() == out.numel()
