"""How a stored weight is multiplied: one idea a file, re-exported here (`from qva.linear import Linear`).

    dtype_policy.py the dtype a product over bf16/fp16 weights runs in (measured per machine)
    measure.py      `fastest`: kernels chosen by timing them, remembered per machine (where a kernel is chosen)
    buffers.py      kept scratch buffers for cast and dequantized weights
    decode.py       decode-sized products (PyTorch's own kernel beside oneDNN's; the compiled `gemv`)
    dense.py        `matmul` (the autograd product that saves only the stored weight); `Linear`, `LayerNorm`, `Conv1d`
    lora.py         LoRA factors on any linear, merge / unmerge (where LoRA is applied)
    frozen.py       the small base of the frozen quantized layers (built empty, filled from a weight or a checkpoint)
    nf4.py          QLoRA's NF4 layer
    weight_only.py  int8 / int4 layers
    int8_activations.py  W8A8 decode: int8 weights × a one-row activation rounded to 8 bits (opt-in)

The model files (`qwen2.py`, `vision.py`, `whisper_encoder.py`) use `Linear` / `LayerNorm` / `Conv1d` and read
like the papers; which layers get quantized, and when, is `qva/quantize.py`'s.
"""

from .buffers import SCRATCH_MAX_BYTES, cast_weight, clear_scratch, kernel_copy, scratch
from .decode import LANES, MAX_ROWS, MIN_IN_FEATURES, few_rows_product, gemv, gemv_eligible, linear_without_onednn, measure_gemv, use_gemv
from .dense import Conv1d, LayerNorm, Linear, StoredWeightProduct, matmul, swap_linears
from .dtype_policy import HALF, POLICIES, cpu_has_fast_half_matmul, large_matmul_dtype, policy, set_policy
from .int8_activations import W8A8Linear, activation_levels, fbgemm_available, fbgemm_row, packed_weight, round_row
from .lora import LORA_TARGETS, add_lora, lora_delta, lora_linears, lora_weight, merge_lora, unmerge_lora, with_lora
from .measure import KERNEL_OVERRIDE, fastest, kernel_cache_file, known_choice, rows_bucket
from .nf4 import ABSMAX_BLOCK, NF4_BLOCK, NF4_LEVELS, NF4Linear, NF4Product, dynamic_map, nf4_dequantize, nf4_quantize, quantize_nf4_
from .weight_only import (
    INT4_GROUPS,
    INT4_ROW_BLOCK,
    QUANTIZE_ROWS,
    Int4Linear,
    Int8Linear,
    check_int4_shape,
    int4_dequantize,
    int4_kernel_available,
    int4_kernel_reads_stored_layout,
    int4_kernel_weight,
    int4_pack,
    int4_quantize,
    int4_unpack,
    int8_quantize,
    measure_quantized,
    quantized_forward,
)

QUANTIZED_LINEARS = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}  # the formats `qva.load(quantize=...)` offers

__all__ = [name for name in dir() if not name.startswith("_")]
