"""The numeric primitives every mode uses, each once, as torch custom ops (namespace `qjl`).

Their implementations here are plain torch, and they are the specification: CUDA (or CPU) kernels register
beneath the same ops (`torch.library.register_kernel("qjl::NAME", "cuda")`), so the codecs and the attention
function never branch on the device. docs/ARCHITECTURE.md lists the ops and the tensor layouts they read.

  codes      pack_codes, unpack_codes, pair_index             packing codes into bytes and back
  encode     sign_bits, scalar_quantize, vq_nearest,           turning floats into codes
             int_quantize, norm_codes
  scores     table_dots, lookup_weighted_sum                   key scores and value sums from packed codes
  attention  turbo_attention, sketch_attention                 a layer's attention over its compressed part
                                                               and its exact tokens, for a query chunk
"""

from .attention import sketch_attention, turbo_attention
from .codes import PACK_BITS, pack_codes, packed_bytes, pair_index, unpack_codes, unpack_codes_float
from .dense import causal_mask
from .encode import int_quantize, norm_codes, scalar_quantize, sign_bits, vq_nearest
from .scores import VALUE_BLOCK, lookup_weighted_sum, table_dots
from .tables import byte_codes, byte_sign_table, byte_table

__all__ = [
    "PACK_BITS", "VALUE_BLOCK", "byte_codes", "byte_sign_table", "byte_table", "causal_mask", "int_quantize",
    "lookup_weighted_sum", "norm_codes", "pack_codes", "packed_bytes", "pair_index", "scalar_quantize", "sign_bits",
    "sketch_attention", "table_dots", "turbo_attention", "unpack_codes", "unpack_codes_float", "vq_nearest",
]
