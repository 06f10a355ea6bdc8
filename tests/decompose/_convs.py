"""Shared hypothesis strategy of Conv2d hyper-parameters for the catalogue layer tests."""
from __future__ import annotations

from hypothesis import strategies as st
from torch import nn


@st.composite
def conv_layers(draw, min_k: int = 1, max_c: int = 5, square: bool = False, allow_same: bool = True) -> nn.Conv2d:
    """A random ``nn.Conv2d`` (groups=1) over kernel size, stride, padding (incl. 'same'), dilation, bias, padding_mode."""
    cin, cout = draw(st.integers(1, max_c)), draw(st.integers(1, max_c))
    kh = draw(st.integers(min_k, 3))
    kw = kh if square else draw(st.integers(min_k, 3))
    stride = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    dilation = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    padding = draw(st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("same") if allow_same
                             else st.just((1, 1)), st.just("valid")))
    if padding == "same":
        stride = (1, 1)  # PyTorch refuses padding='same' with strides
    bias = draw(st.booleans())
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    return nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias,
                     padding_mode=mode)
