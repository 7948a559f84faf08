"""The EMA's fused ``torch._foreach_lerp_`` update is bit-identical to the per-tensor lerp it replaced, and
the callback keeps its warm-up decay, NaN refusal, ``swapped_in`` and checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ldm.lit.ema import EMA, EMA_KEY, blend
from ldm.lit.guards import NonFiniteError


def reference_blend(shadow: dict[str, Tensor], state: dict[str, Tensor], weight: float) -> None:
    """The previous implementation, one tensor at a time."""
    for name, value in state.items():
        ema = shadow[name]
        if value.dtype.is_floating_point:
            ema.lerp_(value.detach().to(ema.dtype), weight)
        else:
            ema.copy_(value)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(5, 7))


def trainer_at(step: int) -> object:
    return type("T", (), {"global_step": step, "accumulate_grad_batches": 1})()


@pytest.mark.parametrize("weight", [0.5, 0.1, 1e-3, 0.75])
def test_blend_is_bit_identical_to_per_tensor_lerp(weight: float) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(17,), (3, 5), (64, 64, 3, 3), (1,), (1000,)]
    state = {f"f{i}": torch.randn(s, generator=g) * 10 for i, s in enumerate(shapes)}
    state["half"] = torch.randn(33, generator=g).to(torch.bfloat16)  # shadow fp32 of a bf16 weight
    state["fp16"] = torch.randn(9, generator=g).half()  # its own dtype group
    state["count"] = torch.tensor(7)
    shadow = {
        k: torch.randn(v.shape, generator=g).to(v.dtype if k != "half" else torch.float32)
        for k, v in state.items()
        if k != "count"
    }
    shadow["count"] = torch.tensor(0)
    expected = {k: v.clone() for k, v in shadow.items()}
    for _ in range(5):
        blend(shadow, state, weight)
        reference_blend(expected, state, weight)
        state = {k: (v + 1 if v.is_floating_point() else v + 1) for k, v in state.items()}
    for k in shadow:
        assert shadow[k].dtype == expected[k].dtype
        assert torch.equal(shadow[k], expected[k]), k


def test_callback_warmup_nan_swap_and_checkpoint_layout() -> None:
    torch.manual_seed(0)
    holder = Holder()
    ema = EMA(decay=0.99)
    ema.shadow = {k: v.detach().clone() for k, v in holder.net.state_dict().items()}
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    for n in range(1, 8):
        with torch.no_grad():
            for p in holder.net.parameters():
                p.add_(torch.randn_like(p))
            holder.net[1].num_batches_tracked += 1
        ema.on_train_batch_end(trainer_at(n), holder, None, None, 0)
        reference_blend(expected, holder.net.state_dict(), 1.0 - min(0.99, (1 + n) / (10 + n)))
    assert all(torch.equal(ema.shadow[k], expected[k]) for k in expected)
    assert int(ema.shadow["1.num_batches_tracked"]) == 7

    live = {k: v.clone() for k, v in holder.net.state_dict().items()}
    with ema.swapped_in(holder):
        assert torch.equal(holder.net[0].weight, ema.shadow["0.weight"])
    assert all(torch.equal(holder.net.state_dict()[k], v) for k, v in live.items())

    checkpoint: dict = {}
    ema.on_save_checkpoint(None, holder, checkpoint)
    assert set(checkpoint) == {EMA_KEY, "ema_num_updates"} and checkpoint["ema_num_updates"] == 7
    assert list(checkpoint[EMA_KEY]) == list(holder.net.state_dict())

    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        holder.net[2].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="EMA was not updated"):
        ema.on_train_batch_end(trainer_at(8), holder, None, None, 0)
    assert all(torch.equal(ema.shadow[k], before[k]) for k in before) and ema.num_updates == 7
