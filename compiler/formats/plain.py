"""Plain element types: one element per block, stored as numpy stores them."""
from . import WeightFormat

#: name, bytes per element, GGML type id, numpy dtype
TYPES = (("f32", 4, 0, "float32"), ("f16", 2, 1, "float16"), ("bf16", 2, 30, "bfloat16"),
         ("f64", 8, 28, "float64"), ("i8", 1, 24, "int8"), ("i16", 2, 25, "int16"),
         ("i32", 4, 26, "int32"), ("i64", 8, 27, "int64"),
         ("u8", 1, None, "uint8"))      # safetensors' U8: gpt-oss's MXFP4 bytes (no GGUF type)

# one class each (defining a class registers its format), named F32, F16, BF16, ...
for _name, _size, _gguf, _dtype in TYPES:
    globals()[_name.upper()] = type(_name.upper(), (WeightFormat,), {
        "name": _name, "block_size": 1, "type_size": _size, "gguf_type": _gguf, "numpy_dtype": _dtype,
        "__module__": __name__})
