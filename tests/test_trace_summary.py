"""scripts/trace_summary.py: a profiled step's GPU time by kernel category, and the busy/idle split."""

import json

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def trace_summary():
    return load_script("trace_summary")


@pytest.mark.parametrize("name, category", [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", "GEMMs"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "GEMMs"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("_cross_entropy_and_grad_kernel", "loss"),
    ("_adamw_bf16_kernel", "optimizer"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm, RoPE, activation"),
    ("_rotate_half_kernel", "norm, RoPE, activation"),
    ("_swiglu_backward_kernel", "norm, RoPE, activation"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other element-wise"),
])
def test_kernels_fall_into_their_categories(trace_summary, name, category):
    assert trace_summary.kernel_category(name) == category


def test_a_step_is_split_by_category_and_into_busy_and_idle_time(trace_summary, tmp_path, capsys):
    def kernel(name, ts, dur, cat="kernel"):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur)

    events = [kernel("nvjet_gemm", 0, 600), kernel("flash_fwd_kernel", 600, 200),  # step 1
              kernel("_adamw_bf16_kernel", 900, 100),  # after a 100 µs gap
              kernel("Memcpy HtoD", 950, 20, cat="gpu_memcpy"),  # overlaps the optimizer: not busy twice
              kernel("nvjet_gemm", 1000, 600), kernel("flash_fwd_kernel", 1600, 200),  # step 2
              kernel("_adamw_bf16_kernel", 1800, 200), dict(ph="X", cat="cpu_op", name="aten::mm", ts=0, dur=5000)]
    summary = trace_summary.summarize(dict(traceEvents=events), steps=2)
    assert summary["kernels_ms_per_step"] == pytest.approx(0.96)
    assert summary["categories"]["GEMMs"] == dict(ms=0.6, share=pytest.approx(0.625, abs=1e-3))
    assert summary["categories"]["attention"]["ms"] == 0.2
    assert summary["categories"]["optimizer"]["ms"] == 0.15
    assert summary["categories"]["copies"]["ms"] == 0.01
    assert (summary["span_ms"], summary["busy_ms"], summary["idle_ms"]) == (2.0, 1.9, 0.1)
    assert summary["largest_gaps_us"] == [100]

    path = tmp_path / "trace.json"
    path.write_text(json.dumps(dict(traceEvents=events)))
    assert trace_summary.main([str(path), "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["categories"]["GEMMs"]["ms"] == 0.6
