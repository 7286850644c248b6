"""tests/cuda_emu/translate.py, the .cu -> C++ rewrite of the CUDA emulator: what it rewrites, what it
leaves alone (comments, strings), that every line stays on its line, and clear errors."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cuda_emu"))
from translate import translate  # noqa: E402


def test_launches_bounds_and_shared_are_rewritten_on_their_lines():
    src = """__global__ void __launch_bounds__(T > 4 ? T : 4, 2) k(const float* x) {
  __shared__ float tile[T / 32];
}
void f() {
  k<T, (3 > 2)><<<grid, dim3(16, 4), 0,
      stream>>>
      (x, n);
  other<<<1, 1>>>(y);
}
"""
    out = translate(src).split("\n")
    assert out[0].endswith("{ ::qwix_emu::check_launch_bounds((T > 4 ? T : 4));")
    assert out[1] == "  __shared__ float tile[T / 32]; ::qwix_emu::shared_garbage(&tile, sizeof(tile));"
    assert out[4] == "  ::qwix_emu::launch(::qwix_emu::Config(grid, dim3(16, 4), 0,"
    assert out[5].strip() == "stream), k<T, (3 > 2)>,"
    assert out[6].strip() == "x, n);"
    assert out[7] == "  ::qwix_emu::launch(::qwix_emu::Config(1, 1), other, y);"
    assert len(out) == len(src.split("\n"))


def test_comments_and_strings_are_left_alone():
    src = '// k<<<grid, block>>>(x)\n/* __shared__ int a; */\nconst char* s = "k<<<1, 1>>>(";\n'
    assert translate(src) == src


def test_registrations_become_emulated_ops():
    src = 'TORCH_LIBRARY_IMPL(qwix, CUDA, m) {\n  m.impl("fake_quant_forward", &f);  // not m.impl(\n}\n'
    assert translate(src) == ('TORCH_LIBRARY_FRAGMENT(qwix_cuda_emu, m) {\n  m.def("fake_quant_forward", &f);'
                              '  // not m.impl(\n}\n')


@pytest.mark.parametrize("src,message", [
    ("extern __shared__ float dyn[];", "dynamic\\) __shared__ memory is not emulated"),
    ("x = (1 >> 0); <<<1, 1>>>(y);", "no kernel name before the launch"),
    ("k<<<1, 1>>> + (y);", "expected `>>>\\(`"),
    ("__global__ void __launch_bounds__(64) k(int);\nvoid host() {}", "not on a kernel definition"),
    ("__shared__ float a[4], b[8];", "one variable per __shared__ declaration"),
])
def test_what_it_cannot_translate_is_a_clear_error(src, message):
    with pytest.raises(SystemExit, match=message):
        translate(src)
