"""The CUDA kernels' dispatch on a machine without a GPU: nothing is built, the torch ops answer, the CLI says
so in one line, bad inputs get clear errors or the fallback's one warning. (The kernels themselves:
tests/test_gpu_kernels.py, on a GPU.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

import qjl.kernels as K
from qjl.ops import int_quantize, sign_bits, turbo_attention

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    K.reset()
    yield
    K.reset()


@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build fails the test."""
    def boom(*a, **k):
        raise AssertionError("a build was attempted")

    monkeypatch.setattr(K, "build", boom)
    monkeypatch.setattr(K, "_sources", boom)


def _app() -> typer.Typer:
    from qjl_cli import kernels as cli

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    cli.register(app)
    return app


# --- registration and the no-CUDA path -------------------------------------------------------------------------
def test_every_op_has_a_cuda_implementation_and_keeps_its_torch_one():
    names = {"qjl::turbo_attention", "qjl::sketch_attention", "qjl::turbo_encode", "qjl::scalar_quantize",
             "qjl::vq_nearest", "qjl::int_quantize", "qjl::sign_bits"}
    assert set(K.TORCH_IMPL) == names
    for name, (op, impl) in K._ops().items():
        assert "cuda" in op._backend_fns
        assert K.TORCH_IMPL[name] is op._init_fn
    K.register()  # idempotent
    assert set(K.TORCH_IMPL) == names


@needs_no_cuda
def test_no_cuda_builds_nothing_and_the_ops_run_torch(no_build):
    x = torch.randn(3, 16)
    assert torch.equal(sign_bits(x), K.TORCH_IMPL["qjl::sign_bits"](x))
    assert K.ensure_loaded() is None
    assert K.status()["status"] == "off" and "CUDA" in K.status()["reason"]
    assert "qjl_kernels" not in __import__("sys").modules


def test_switched_off_builds_nothing(monkeypatch, no_build):
    monkeypatch.setenv(K.ENV, "0")
    assert not K.enabled()
    assert K.ensure_loaded() is None
    assert K.status() == {"status": "off", "reason": f"{K.ENV}=0", "build": None}
    assert not K._ready()


@pytest.mark.parametrize("value,on", [("1", True), ("", True), ("0", False), ("off", False), ("False", False)])
def test_env_switch(monkeypatch, value, on):
    monkeypatch.setenv(K.ENV, value)
    assert K.enabled() is on


def test_wrappers_call_the_torch_op_when_the_kernels_are_not_ready(monkeypatch, no_build):
    """What the CUDA wrappers do when not ready (QJL_KERNELS=0, failed build): exactly the torch op."""
    monkeypatch.setenv(K.ENV, "0")
    case = K.turbo_case(64, 2, 2, 1, 64, 5, torch.float32, "cpu")
    ref = K.TORCH_IMPL[case.op](*case.args)
    assert torch.equal(K.turbo_attention_cuda(*case.args), ref)
    v = torch.randn(1, 2, 4, 64)
    for fit in (False, True):
        for got, want in zip(K.int_quantize_cuda(v, 2, 64, fit), int_quantize(v, 2, 64, fit)):
            assert torch.equal(got, want)


def test_a_failed_build_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(K.torch.cuda, "is_available", lambda: True)

    def fail(verbose=False):
        raise K.KernelError("building the CUDA kernels failed (nvcc: not found)")

    monkeypatch.setattr(K, "build", fail)
    with pytest.warns(RuntimeWarning, match="not used: building the CUDA kernels failed") as rec:
        assert K.ensure_loaded() is None
        assert K.ensure_loaded() is None
        assert not K._ready()
    assert len(rec) == 1
    assert K.status()["status"] == "failed"


def test_a_failed_self_test_disables_the_kernels(monkeypatch):
    monkeypatch.setattr(K.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(K, "build", lambda verbose=False: object())
    bad = K.ParityRow("qjl::sign_bits", "4x16", "float32", 0.5, 0.0, False)
    monkeypatch.setattr(K, "parity", lambda *a, **k: [bad])
    monkeypatch.setattr(K, "cases", lambda *a, **k: [])
    with pytest.warns(RuntimeWarning, match=r"self-test failed \(1 case\(s\); first: qjl::sign_bits 4x16"):
        assert K.ensure_loaded() is None
    assert K.status()["status"] == "failed" and not K._ready()


# --- the fallback warning ---------------------------------------------------------------------------------------
def test_fallback_warns_once_per_op_and_reason():
    with pytest.warns(RuntimeWarning) as rec:
        for _ in range(3):
            K.fallback("qjl::turbo_attention", "head_dim 96 (kernels: 64, 128)")
        K.fallback("qjl::turbo_attention", "2-bit keys (kernels: 3)")
        K.fallback("qjl::sketch_attention", "head_dim 96 (kernels: 64, 128)")
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 3
    assert msgs[0] == ("qjl kernels: no CUDA kernel for qjl::turbo_attention with head_dim 96 (kernels: 64, 128); "
                       "using the torch op")


def test_unsupported_errors_from_the_extension_become_a_reason():
    e = RuntimeError("qjl-unsupported: the attention kernel needs 300000 bytes of shared memory\nException raised from")
    assert K._unsupported(e) == "the attention kernel needs 300000 bytes of shared memory"
    assert K._unsupported(RuntimeError("CUDA error: an illegal memory access")) is None


# --- build cache key ----------------------------------------------------------------------------------------------
def test_build_key_is_deterministic_and_names_torch_and_arch():
    a, b = K.build_key("9.0", "2.14.1+cu130"), K.build_key("9.0", "2.14.1+cu130")
    assert a == b
    assert "torch2_14_1_cu130" in a and a.endswith("sm90")
    assert K.build_key("8.0", "2.14.1+cu130") != a
    assert K.build_key("9.0", "2.13.0") != a


def test_build_key_follows_the_sources_and_flags(monkeypatch):
    src = K._sources()
    before = src.source_hash()
    monkeypatch.setattr(src, "NVCC_FLAGS", src.NVCC_FLAGS + ["-DQJL_TEST"])
    assert src.source_hash() != before
    assert all((src.CSRC / s).is_file() for s in src.SOURCES + src.HEADERS)


def test_build_root_under_qjl_home(qjl_home):
    assert K.build_root() == qjl_home / "kernels"


@needs_no_cuda
def test_build_without_cuda_is_a_user_error():
    with pytest.raises(K.KernelError, match="no CUDA device"):
        K.build()
    with pytest.raises(K.KernelError, match="no CUDA device"):
        K.check()
    from qjl.errors import QJLError

    assert issubclass(K.KernelError, QJLError)


# --- the CLI --------------------------------------------------------------------------------------------------------
@needs_no_cuda
@pytest.mark.parametrize("cmd", ["check", "build"])
def test_cli_without_cuda_says_so_in_one_line(cmd, no_build):
    result = CliRunner().invoke(_app(), ["kernels", cmd])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_cli_switched_off_says_so(monkeypatch, no_build):
    monkeypatch.setenv(K.ENV, "0")
    result = CliRunner().invoke(_app(), ["kernels", "check"])
    assert result.exit_code == 0 and "switched off" in result.output


def test_cli_help_lists_both_commands():
    result = CliRunner().invoke(_app(), ["kernels", "--help"])
    assert result.exit_code == 0
    assert "build" in result.output and "check" in result.output


# --- input checks of the dispatch wrappers (called directly; device_type "cpu" tests the other rules) -----------
TURBO_ARGS = ["q", "exact_k", "exact_v", "key_codes", "key_bits", "key_centroids", "key_norms", "key_norm_steps",
              "key_rotation", "channels", "rest", "outlier_values", "outlier_scales", "outlier_mins", "outlier_bits",
              "group_size", "residual_signs", "residual_norms", "residual_projection", "residual_scale",
              "value_codes", "value_bits", "value_tables", "value_norms", "value_norm_steps", "value_rotation",
              "scaling"]


def _turbo(old_layout: bool = False, **change):
    """The op's arguments by name: the default layout (pair-codebook keys, 9-bit values, 8-bit norms), or the one
    before it (Lloyd-Max keys, vq4 bytes, fp16 norms)."""
    layout = dict(value_bits=2, norm_bits=16, key_codebook="scalar") if old_layout else {}
    case = K.turbo_case(64, 2, 2, 1, 64, 5, torch.bfloat16, "cpu", seed=3, **layout)
    return dict(zip(TURBO_ARGS, case.args)) | change


def test_turbo_argument_names_follow_the_op():
    import inspect

    assert list(inspect.signature(turbo_attention._init_fn).parameters) == TURBO_ARGS
    assert list(inspect.signature(K.turbo_attention_cuda).parameters) == TURBO_ARGS
    assert list(inspect.signature(K.check_turbo_attention).parameters)[:-1] == TURBO_ARGS


def test_the_parity_cases_are_valid_op_arguments_and_supported():
    layouts, keys = set(), set()
    for c in K.cases("self-test", device="cpu"):
        if c.op == "qjl::turbo_attention":
            assert K.check_turbo_attention(*c.args, device_type="cpu") is None, c.shape
            a = dict(zip(TURBO_ARGS, c.args))
            layouts.add((a["value_bits"][0], a["key_norm_steps"] is not None, a["value_norm_steps"] is not None))
            keys.add((K._TURBO_KEYS[tuple(a["key_centroids"][0].shape)], a["value_bits"][0]))
        elif c.op == "qjl::sketch_attention":
            assert K.check_sketch_attention(*c.args, device_type="cpu") is None, c.shape
    # the default layout (9-bit values, 8-bit norms), the one before it (vq4 bytes, fp16 norms), the others
    assert {(9, True, True), (9, False, False), (2, False, False), (2, True, True), (3, False, False),
            (4, True, True)} <= layouts
    # the default keys (pair codebook) and Lloyd-Max keys, each with the default values; format 4's scalar keys
    assert {("pair", 9), ("scalar", 9), ("scalar", 2), ("pair", 2)} <= keys
    encode = {c.shape for c in K.cases("self-test", device="cpu") if c.op in ("qjl::turbo_encode", "qjl::vq_nearest")}
    assert {"64x64 vq4/512", "64x128 vq4/256", "64x64 512", "64x128 256", "64x64 vq2/64", "64x128 vq2/64",
            "64x64 64x2", "64x128 64x2"} <= encode
    rows = K.parity(K.cases("self-test", device="cpu")[:4], timing=True, kernels=dict(K.TORCH_IMPL))
    assert all(r.ok and r.max_err == 0 for r in rows)
    assert all(r.kernel_ms is not None and r.speedup is not None for r in rows)
    table = K.format_table(rows)
    assert table.splitlines()[0].split()[:6] == ["op", "shape", "dtype", "max", "err", "tol"]
    assert table.splitlines()[-1] == "4 of 4 pass"


def test_cpu_tensors_to_the_cuda_path_are_a_clear_error():
    with pytest.raises(ValueError, match=r"q is on cpu, but this is the cuda implementation"):
        K.check_turbo_attention(**_turbo())
    with pytest.raises(ValueError, match=r"y is on cpu"):
        K.check_codes(torch.randn(4, 8), [3], [8], None)


def test_wrong_dtypes_are_a_clear_error():
    old = _turbo(old_layout=True)
    with pytest.raises(TypeError, match="key_norms must be float16, not float32"):
        K.check_turbo_attention(**(old | {"key_norms": old["key_norms"].float()}), device_type="cpu")
    with pytest.raises(TypeError, match=r"key_codes\[0\] must be uint8, not int32"):
        K.check_turbo_attention(**(old | {"key_codes": [old["key_codes"][0].int()]}), device_type="cpu")
    args = _turbo()  # 8-bit norms: uint8 codes with fp16 steps
    with pytest.raises(TypeError, match=r"key_norms \(8-bit codes, with key_norm_steps\) must be uint8, not float16"):
        K.check_turbo_attention(**(args | {"key_norms": args["key_norms"].half()}), device_type="cpu")
    with pytest.raises(TypeError, match="value_norm_steps must be float16, not float32"):
        K.check_turbo_attention(**(args | {"value_norm_steps": args["value_norm_steps"].float()}), device_type="cpu")
    with pytest.raises(TypeError, match="value_norms must be float16, not uint8"):  # codes without their steps
        K.check_turbo_attention(**(args | {"value_norm_steps": None}), device_type="cpu")


def test_norm_steps_must_cover_whole_groups():
    args = _turbo()
    steps = args["key_norm_steps"]
    assert args["key_norms"].shape == (1, 2, 64) and steps.shape == (1, 2, 2)  # 32 tokens a step
    for bad in (steps[:, :, :1].repeat(1, 1, 3), steps[:, :1], steps[0], steps[:, :, :0]):
        with pytest.raises(ValueError, match="want codes \\[B, H, T\\] and steps \\[B, H, T/G\\]"):
            K.check_turbo_attention(**(args | {"key_norm_steps": bad}), device_type="cpu")
    # no compressed tokens: empty codes and steps are fine
    empty = {"key_norms": args["key_norms"][:, :, :0], "key_norm_steps": steps[:, :, :0]}
    from qjl.kernel_checks import _norms

    _norms(empty["key_norms"], empty["key_norm_steps"], "key_norms")
    strided = torch.cat([steps, steps], dim=-1)[..., ::2]
    assert K.check_turbo_attention(**(args | {"key_norm_steps": strided}), device_type="cpu") == \
        "a non-contiguous key_norm_steps"


def test_both_key_codebooks_are_covered():
    """3-bit keys of the [64, 2] pair codebook (the default) and of 8 Lloyd-Max centroids: the same packed codes
    and op, the kernel's pair table filled from either; other centroid shapes fall back."""
    new, old = _turbo(), _turbo(old_layout=True)
    assert tuple(new["key_centroids"][0].shape) == (64, 2) and tuple(old["key_centroids"][0].shape) == (8,)
    assert new["key_codes"][0].shape == old["key_codes"][0].shape and new["key_bits"] == old["key_bits"] == [3]
    check = lambda **c: K.check_turbo_attention(**(new | c), device_type="cpu")  # noqa: E731
    assert check() is None and check(key_centroids=old["key_centroids"]) is None
    want = "(kernels: [8] Lloyd-Max centroids or a [64, 2] pair codebook)"
    assert check(key_centroids=[torch.randn(16, 2)]) == f"3-bit key centroids of shape (16, 2) {want}"
    assert check(key_centroids=[torch.randn(64, 4)]) == f"3-bit key centroids of shape (64, 4) {want}"
    assert check(key_centroids=[torch.randn(8, 1)]) == f"3-bit key centroids of shape (8, 1) {want}"


def test_pair_codes_are_the_kernels_3_byte_words():
    """What csrc/encode.cu writes for a pair codebook (VQ_PACK3): per 8 coordinates the 4 pair indices w_j as
    one little-endian 24-bit word sum_j w_j << 6j, is turbo_encode's pack_codes((w & 7, w >> 3), 3); and the
    attention kernel's pair table row w, (c[w, 0], c[w, 1]), is what the torch scoring reads for index w."""
    from qjl.codebooks import pair_codebook_on, rotation
    from qjl.ops import pair_index, vq_nearest
    from qjl.turbo import turbo_encode

    D = 64
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    rot, book = rotation(D, 2), pair_codebook_on(D, "cpu")
    (packed,), _ = turbo_encode(x, rot, [3], [D], [], [], book)
    y = (x / x.norm(dim=-1, keepdim=True)) @ rot.T
    w = vq_nearest(y, book).to(torch.int64)  # [5, D/2]
    assert w.dtype == torch.int64 and int(w.max()) < 64
    word = (w.view(5, D // 8, 4) << torch.tensor([0, 6, 12, 18])).sum(-1)
    kernel = torch.stack([(word >> s) & 255 for s in (0, 8, 16)], dim=-1).reshape(5, 3 * D // 8).to(torch.uint8)
    assert torch.equal(packed, kernel)
    assert torch.equal(pair_index(packed).long(), w)
    # the 64 float2 entries of the attention kernel's table: row w of the contiguous [64, 2] tensor
    flat = book.contiguous().reshape(-1)
    assert torch.equal(torch.stack([flat[2 * w], flat[2 * w + 1]], -1), book[w])


def test_both_value_and_norm_layouts_are_covered():
    new, old = _turbo(), _turbo(old_layout=True)
    assert new["value_bits"] == [9] and tuple(new["value_tables"][0].shape) == (512, 4)
    assert new["value_codes"][0].shape[-1] == 64 // 4 + 64 // 32  # 16 low bytes, 2 bytes of ninth bits
    assert new["key_norms"].dtype == new["value_norms"].dtype == torch.uint8
    assert new["key_norm_steps"].dtype == new["value_norm_steps"].dtype == torch.float16
    assert old["value_bits"] == [2] and tuple(old["value_tables"][0].shape) == (256, 4)
    assert old["key_norm_steps"] is None and old["value_norms"].dtype == torch.float16
    for args in (new, old, new | {"value_norm_steps": None, "value_norms": old["value_norms"]},
                 old | {k: new[k] for k in ("key_norms", "key_norm_steps")}):
        assert K.check_turbo_attention(**args, device_type="cpu") is None
    assert K._TURBO_VALUES[(9, (512, 4))] == 4  # csrc/attention.cu VAL_TAB9


def test_unsupported_configurations_name_what_is_missing():
    args = _turbo()
    check = lambda **c: K.check_turbo_attention(**(args | c), device_type="cpu")  # noqa: E731
    assert check() is None
    q = args["q"]
    assert check(q=torch.randn(1, 4, 1, 96, dtype=torch.bfloat16)) == "head_dim 96 (kernels: 64, 128)"
    assert check(q=q.to(torch.float64)) == "queries of dtype torch.float64"
    assert check(key_bits=[2]) == "2-bit keys (kernels: 3)"
    assert check(value_bits=[2, 3], value_tables=args["value_tables"] * 2) == \
        "2+3-bit values (kernels: one part of 2, 3, 4 or 9 bits)"
    assert check(value_tables=[torch.randn(256, 4)]).startswith("9-bit values with a (256, 4) table (kernels: ")
    assert check(value_bits=[2]).startswith("2-bit values with a (512, 4) table")
    assert check(residual_projection=torch.randn(64, 56)) == "a residual sketch (turbo_residual_ratio > 0)"
    assert check(outlier_bits=4, group_size=8).startswith("4-bit outliers over 8-token groups")
    n = 4 * len(args["exact_k"])
    assert check(exact_k=args["exact_k"] * 4, exact_v=args["exact_v"] * 4) == f"{n} exact parts (kernels: 1 to 3)"
    codes = args["key_codes"][0]
    strided = torch.cat([codes, codes], dim=-1)[..., ::2]
    assert check(key_codes=[strided]) == "a non-contiguous key_codes"


def test_sketch_checks():
    c = K.sketch_case(64, 2, 2, 1, 64, 5, torch.float16, "cpu")
    assert K.check_sketch_attention(*c.args, device_type="cpu") is None
    a = list(c.args)
    a[19] = 8  # value_bits
    assert K.check_sketch_attention(*a, device_type="cpu") == "8-bit values (kernels: 2, 4)"
    a = list(c.args)
    a[11] = torch.zeros(1, 2, 2, 8, dtype=torch.uint8)  # outlier_index: per-group outliers
    assert K.check_sketch_attention(*a, device_type="cpu") == "per-group outliers (outlier_scope='group')"


def test_code_checks():
    y = torch.randn(4, 64)
    assert K.check_codes(y, [3], [64], None, device_type="cpu") is None
    assert K.check_codes(y, [2, 3], [48, 16], None, device_type="cpu") is None
    assert K.check_codes(y.double(), [3], [64], None, device_type="cpu") == "torch.float64 input (kernels: float32)"
    assert K.check_codes(torch.randn(4, 12), [3], [12], None, device_type="cpu").startswith("12 coordinates")
    assert K.check_codes(y, [8], [64], None, device_type="cpu").startswith("8-bit codes")
    assert K.check_codes(y, [], [], torch.randn(256, 4), device_type="cpu") is None
    # 2-D (pair) codebooks of up to 64 points: uint8 indices (vq_nearest) or 3-bit packed codes (turbo_encode)
    for pair in (torch.randn(64, 2), torch.randn(16, 2)):
        assert K.check_codes(y, [], [], pair, device_type="cpu") is None
        assert K.check_codes(y, [], [], pair, device_type="cpu", packed=True) is None
        assert K.check_codes(torch.randn(4, 40), [], [], pair, device_type="cpu", packed=True) is None
    assert K.check_codes(y, [], [], torch.randn(65, 2), device_type="cpu") == \
        "a codebook of shape (65, 2) (kernels: [K <= 512, 4] or [K <= 64, 2])"
    assert K.check_codes(y, [], [], torch.randn(16, 3), device_type="cpu").startswith("a codebook of shape (16, 3)")
    assert K.check_codes(y, [], [], torch.randn(64), device_type="cpu").startswith("a codebook of shape (64,)")
    assert K.check_codes(torch.randn(4, 12), [], [], torch.randn(64, 2), device_type="cpu") == \
        "12 coordinates (kernels: a multiple of 8)"
    # 512 points: int16 codes (vq_nearest) for any multiple of 8; 9-bit packed (turbo_encode) in whole bytes
    book = torch.randn(512, 4)
    assert K.check_codes(y, [], [], book, device_type="cpu") is None
    assert K.check_codes(y, [], [], book, device_type="cpu", packed=True) is None
    y40 = torch.randn(4, 40)
    assert K.check_codes(y40, [], [], book, device_type="cpu") is None
    assert K.check_codes(y40, [], [], book, device_type="cpu", packed=True) == \
        "9-bit codes of 40 coordinates (kernels: a multiple of 32)"
    assert K.check_codes(y40, [], [], torch.randn(256, 4), device_type="cpu", packed=True) is None
    assert K.check_codes(y, [], [], torch.randn(513, 4), device_type="cpu") == \
        "a codebook of shape (513, 4) (kernels: [K <= 512, 4] or [K <= 64, 2])"


def test_exact_parts_are_made_kernel_ready():
    q = torch.randn(1, 2, 1, 64, dtype=torch.bfloat16)
    strided = torch.randn(1, 5, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
    half = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    rows_not_contiguous = torch.randn(1, 2, 64, 3, dtype=torch.bfloat16).transpose(2, 3)
    a, b, c = K._exact_parts(q, [strided, half, rows_not_contiguous])
    assert a is strided  # a strided view with contiguous rows is read in place
    assert b.dtype == torch.bfloat16 and torch.equal(b, half.to(torch.bfloat16))
    assert c.is_contiguous() and torch.equal(c, rows_not_contiguous)


def test_torch_only_is_scoped():
    assert not getattr(K._local, "torch_only", False)
    with K.torch_only():
        assert K._local.torch_only and not K._ready()
    assert not K._local.torch_only


def test_turbo_attention_on_cpu_is_untouched(no_build):
    """The CPU path never reaches a CUDA wrapper (no warning, no build): the torch code or the CPU kernels of
    qjl/native answer, which agree with the torch implementation to float rounding."""
    case = K.turbo_case(64, 2, 2, 1, 64, 5, torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = turbo_attention(*case.args)
    torch.testing.assert_close(out, K.TORCH_IMPL["qjl::turbo_attention"](*case.args), rtol=1e-5, atol=1e-5)


def test_cli_build_failure_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(K.torch.cuda, "is_available", lambda: True)

    def fail(verbose=False):
        raise K.KernelError("building the CUDA kernels failed (nvcc fatal: Unsupported gpu architecture)")

    monkeypatch.setattr(K, "build", fail)
    result = CliRunner().invoke(_app(), ["kernels", "build"])
    text = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 2, text
    assert "building the CUDA kernels failed (nvcc fatal: Unsupported gpu architecture)" in text
    assert "Traceback" not in text
