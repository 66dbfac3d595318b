"""Plain element types: one element per block."""
from . import WeightFormat


class F32(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "f32", 1, 4, 0, "float32"


class F16(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "f16", 1, 2, 1, "float16"


class BF16(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "bf16", 1, 2, 30, "bfloat16"


class F64(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "f64", 1, 8, 28, "float64"


class I8(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "i8", 1, 1, 24, "int8"


class I16(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "i16", 1, 2, 25, "int16"


class I32(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "i32", 1, 4, 26, "int32"


class I64(WeightFormat):
    name, block_size, type_size, gguf_type, numpy_dtype = "i64", 1, 8, 27, "int64"
