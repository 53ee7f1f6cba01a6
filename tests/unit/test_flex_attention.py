"""FlexAttention (modeling.flex) and SDPA's kernel arrangement (parallel.sdpa), checked on the CPU.

FlexAttention's forward runs on the CPU in torch 2.13 (uncompiled, its reference implementation), its backward
does not; so the numbers are compared without gradients: FlexAttention, SDPA with the explicit mask and a plain
softmax over the mask written out (the independent reference) agree for documents, windows and grouped heads.
The block mask is compared block by block with torch's create_block_mask (the uncompiled reference ignores the
block structure, so the outputs alone would not catch a wrong block). The model's flex path is checked to build no
(T, T) mask (spies on the mask builders) and to give SDPA's logits.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import modeling.llama as llama
import parallel.sdpa as sdpa_mod
from configs.sections import ConfigError, TrainSection
from modeling import flex
from modeling.config import ModelConfig
from modeling.llama import LlamaForCausalLM, document_causal_mask

B, HQ, HKV, T, HD = 2, 4, 2, 40, 16
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
DOCS = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [5] * 18 + [6] * 22])  # (B, T) packed documents


def _reference(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v with kv head g serving query heads g r .. g r + r - 1, in float64."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, dim=1).double(), v.repeat_interleave(r, dim=1).double()
    scores = q.double() @ k.transpose(-1, -2) / HD**0.5  # (B, Hq, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).float()


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, T, HD, generator=g), torch.randn(B, HKV, T, HD, generator=g),
            torch.randn(B, HKV, T, HD, generator=g))  # fmt: skip


@pytest.mark.parametrize("docs", [None, DOCS])
@pytest.mark.parametrize("window", [None, 6])
def test_flex_and_sdpa_equal_the_reference(docs, window):
    q, k, v = _qkv()
    mask = document_causal_mask(DOCS if docs is None else docs, window)  # (B, 1, T, T)
    if docs is None:
        idx = torch.arange(T)
        mask = llama.causal_mask(idx, idx, window)[None, None].expand(B, 1, T, T)
    want = _reference(q, k, v, mask)
    with torch.no_grad():
        got_flex = flex.flex_mask(T, q.device, docs, window).attend(q, k, v)
    got_sdpa = sdpa_mod.sdpa(q, k, v, mask)
    assert (got_flex - want).abs().max() < 1e-5
    assert (got_sdpa - want).abs().max() < 1e-5


def _dense(num: torch.Tensor, idx: torch.Tensor, nk: int) -> torch.Tensor:
    """BlockMask's (count, indices) rows -> (B, H, nq, nk) bool map of the listed blocks."""
    cols = torch.arange(idx.shape[-1])
    listed = cols < num[..., None].long()  # (B, H, nq, nk): the first `num` indices of each row count
    out = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool)
    return out.scatter(-1, idx.long(), listed)


def _maps(mask, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A BlockMask's (partial, full) block maps, (B, H, nq, nk) bool each."""
    return (
        _dense(mask.kv_num_blocks, mask.kv_indices, nk),
        _dense(mask.full_kv_num_blocks, mask.full_kv_indices, nk),
    )


@pytest.mark.parametrize("window", [None, 1, 5, 20, 31])  # 31: a full block pair up to i - j = 31
@pytest.mark.parametrize("docs", ["none", "packed", "unsorted"])
def test_block_mask_matches_torch(window, docs):
    T_, block = 72, 16  # 5 blocks, the last one padded
    ids = {
        "none": None,
        "packed": torch.tensor([[0] * 16 + [1] * 40 + [2] * 16, [3] * 5 + [4] * 30 + [7] * 37]),
        "unsorted": torch.tensor([[1, 0] * 36, [2] * 30 + [0] * 20 + [2] * 22]),
    }[docs]
    ours = flex.block_mask(T_, "cpu", document_ids=ids, window=window, block=block)
    n_batch = 1 if ids is None else 2
    ref = create_block_mask(flex.mask_mod(ids, window), n_batch, None, T_, T_, device="cpu", BLOCK_SIZE=block)
    nk = ref.kv_indices.shape[-1]
    ref_partial, ref_full = _maps(ref, nk)
    our_partial, our_full = _maps(ours, nk)
    assert torch.equal(our_full, ref_full)  # a full block skips the mask: it must be exact
    if docs == "unsorted":  # correct, possibly conservative: every visible block listed, never a full one missed
        assert not (ref_partial & ~our_partial).any()
        assert not (our_partial & our_full).any()
    else:
        assert torch.equal(our_partial, ref_partial)
    assert torch.equal(ours.kv_num_blocks, our_partial.sum(-1).int())


def test_choose_backend():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def choose(setting, device, masked=True, head_dim=64):
        return flex.choose_backend(setting, device, masked=masked, head_dim=head_dim)

    assert choose("auto", cuda) == "flex"
    assert choose("auto", cuda, masked=False) == "sdpa"  # plain causal: SDPA's flash kernel
    assert choose("auto", cuda, head_dim=8) == "sdpa"  # below the CUDA flex kernel's smallest head
    assert choose("auto", cpu) == "sdpa"  # no CPU backward for FlexAttention
    assert choose("sdpa", cuda) == "sdpa"
    assert choose("flex", cuda, masked=False) == "flex"
    with pytest.raises(ValueError, match="train.attention=flex with head_dim=8"):
        choose("flex", cuda, head_dim=8)
    with pytest.raises(ValueError, match="train.attention=flex on cpu"):
        choose("flex", cpu)
    with torch.no_grad():
        assert choose("flex", cpu, head_dim=8) == "flex"
    with pytest.raises(ValueError, match="train.attention='bogus'"):
        choose("bogus", cuda)
    with pytest.raises(ConfigError, match="train.attention='bogus'"):
        TrainSection(attention="bogus").validate()


def test_sdpa_repeats_kv_where_cuda_flash_is_out(monkeypatch):
    """The CUDA arrangement (run on the CPU by spoofing the device test): k, v reach SDPA with the query heads."""
    cuda, cpu, bf16, fp32 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16, torch.float32
    gpu = SimpleNamespace(major=9)  # sm90, an H100: flash kernels
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    assert sdpa_mod.expands_kv(cuda, bf16, HQ, HKV, masked=True)
    assert not sdpa_mod.expands_kv(cuda, bf16, HQ, HKV, masked=False)  # flash takes enable_gqa
    assert not sdpa_mod.expands_kv(cuda, torch.float16, HQ, HKV, masked=False)
    assert sdpa_mod.expands_kv(cuda, fp32, HQ, HKV, masked=False)  # flash takes no fp32: memory-efficient then
    assert not sdpa_mod.expands_kv(cpu, bf16, HQ, HKV, masked=True)
    assert not sdpa_mod.expands_kv(cpu, fp32, HQ, HKV, masked=False)
    assert not sdpa_mod.expands_kv(cuda, bf16, HQ, HQ, masked=True)
    assert not sdpa_mod.expands_kv(cuda, fp32, HQ, HQ, masked=False)
    gpu.major = 7  # sm70/sm75 (V100, T4): no flash kernel, so even causal bf16 attention would run the math kernel
    assert sdpa_mod.expands_kv(cuda, bf16, HQ, HKV, masked=False)
    assert sdpa_mod.expands_kv(cuda, torch.float16, HQ, HKV, masked=False)
    assert not sdpa_mod.expands_kv(cuda, bf16, HQ, HQ, masked=False)
    asked = []  # sdpa asks about the dtype SDPA computes in: autocast's where it applies
    monkeypatch.setattr(sdpa_mod, "expands_kv", lambda device, dtype, *a: asked.append(dtype) or False)
    q, k, v = _qkv(1)
    sdpa_mod.sdpa(q, k, v, None)
    with torch.autocast("cpu", torch.bfloat16):
        sdpa_mod.sdpa(q, k, v, None)
    assert q.dtype == fp32 and asked == [fp32, bf16]
    calls = []
    real = sdpa_mod.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.shape[1], v.shape[1], kw["enable_gqa"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(sdpa_mod.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(sdpa_mod, "expands_kv", lambda device, dtype, nh, nkv, masked: masked and nh != nkv)
    q, k, v = _qkv(1)
    mask = document_causal_mask(DOCS, 6)
    got = sdpa_mod.sdpa(q, k, v, mask)
    assert calls == [(HQ, HQ, False)]
    assert (got - _reference(q, k, v, mask)).abs().max() < 1e-5


def _model() -> LlamaForCausalLM:
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=12,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_model_flex_path_builds_no_dense_mask(monkeypatch):
    model = _model()
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.attention_backend = "sdpa"
        want = model(ids, document_ids=DOCS).logits
        dense, built, seen = [], [], []
        for name in ("document_causal_mask", "causal_mask"):
            real = getattr(llama, name)
            monkeypatch.setattr(llama, name, lambda *a, _real=real, **kw: dense.append(1) or _real(*a, **kw))
        real_flex_mask = flex.flex_mask
        monkeypatch.setattr(flex, "flex_mask", lambda *a: built.append(1) or real_flex_mask(*a))
        real_attend = flex.FlexMask.attend
        monkeypatch.setattr(flex.FlexMask, "attend", lambda self, *a: seen.append(id(self)) or real_attend(self, *a))
        model.attention_backend = "auto"  # on the CPU: SDPA
        model(ids, document_ids=DOCS)
        assert dense and not built  # the spies see the SDPA path's (B, 1, T, T) mask
        dense.clear()
        model.attention_backend = "flex"
        got = model(ids, document_ids=DOCS).logits
    assert not dense and built == [1]  # one block mask for the batch, no (T, T) mask
    assert len(seen) == 2 and len(set(seen)) == 1  # both layers attend through the same mask
    assert (got - want).abs().max() < 1e-4
