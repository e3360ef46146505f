//! GGUF reader (versions 2 and 3) over a memory map or any byte slice.
//!
//! ```text
//! "GGUF" | version u32 | tensor_count u64 | kv_count u64          (v1's u32 counts are refused)
//! kv_count x  { key: string | type u32 | value }                   string = len u64 | bytes (UTF-8)
//! tensor_count x { name: string | n_dims u32 | dims u64 x n_dims | type u32 | offset u64 }
//! padding to `general.alignment` (default 32)
//! tensor data: each tensor at data_start + offset (offset aligned), ne[0] fastest
//! ```
//!
//! The input is hostile: every count and length is capped and checked against the bytes that remain before
//! anything is allocated, ranks above 4 and unknown tensor types are refused by name, and every tensor's
//! `offset + size` is checked against the file before use. Errors name the tensor and the numbers.
//!
//! Metadata arrays are stored as their element type gives them ([`Array`]: a `u8` array takes a byte per
//! element), and only those kvq reads ([`decoded_array`]: the tokenizer's and the layer pattern) are
//! decoded at all; the others are walked, checked and kept as their type and length. What is decoded is
//! counted against [`MAX_DECODED`], so no file makes the reader allocate much more than its own size.

use std::collections::HashMap;
use std::fmt;

/// Longest string (key, value or tensor name) accepted: chat templates run to tens of KiB.
pub const MAX_STRING: u64 = 1 << 24;
/// Most entries in one metadata array (vocabularies run to a few hundred thousand tokens).
pub const MAX_ARRAY: u64 = 1 << 24;
/// Most metadata entries and most tensors.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Highest tensor rank (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in metadata.
const MAX_DEPTH: u32 = 3;
/// Most bytes of decoded metadata arrays (elements and string bytes) one file may ask for; real
/// vocabularies take a few tens of MiB.
pub const MAX_DECODED: u64 = 256 << 20;

/// Whether kvq reads the metadata array under `key` (the tokenizer's vocabulary, types, scores and merges,
/// and Gemma's per-layer window pattern): others are skipped.
pub fn decoded_array(key: &str) -> bool {
    matches!(
        key,
        "tokenizer.ggml.tokens"
            | "tokenizer.ggml.token_type"
            | "tokenizer.ggml.scores"
            | "tokenizer.ggml.merges"
    ) || key.ends_with(".attention.sliding_window_pattern")
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    /// The file ends before a field.
    #[error("truncated GGUF: {what} needs {need} bytes at offset {at}, file has {len}")]
    Truncated {
        /// The field being read.
        what: String,
        /// Bytes it needs.
        need: u64,
        /// Where it starts.
        at: u64,
        /// File length.
        len: u64,
    },
    /// Not a GGUF file.
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    /// A version this reader does not take.
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// A count or length above its cap.
    #[error("{what}: {got} exceeds the limit {limit}")]
    TooLarge {
        /// The field.
        what: String,
        /// Its value.
        got: u64,
        /// The cap.
        limit: u64,
    },
    /// Malformed content.
    #[error("{0}")]
    Invalid(String),
    /// A tensor type this reader does not know.
    #[error("tensor {name}: unsupported tensor type {ty} ({label})")]
    UnknownType {
        /// Tensor name.
        name: String,
        /// ggml type id.
        ty: u32,
        /// Its ggml name where known.
        label: &'static str,
    },
    /// A tensor's data lies outside the file.
    #[error("tensor {name}: offset {offset} + size {size} exceeds the data section ({avail} bytes)")]
    OutOfBounds {
        /// Tensor name.
        name: String,
        /// Offset within the data section.
        offset: u64,
        /// Byte size.
        size: u64,
        /// Data section length.
        avail: u64,
    },
}

type Result<T> = std::result::Result<T, GgufError>;

/// `got` if it is at most `limit`, else [`GgufError::TooLarge`] naming the field.
fn cap(got: u64, limit: u64, what: impl FnOnce() -> String) -> Result<u64> {
    if got > limit {
        return Err(GgufError::TooLarge { what: what(), got, limit });
    }
    Ok(got)
}

/// Tensor element types this runtime reads (ggml ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale, 32 x i8.
    Q8_0,
    /// Blocks of 32: f16 scale, 32 x 4-bit, value (q - 8) * d.
    Q4_0,
    /// Blocks of 32: f16 scale and min, 32 x 4-bit, value q * d + m.
    Q4_1,
    /// Blocks of 32: f16 scale, 32 high bits, 32 x 4-bit, value (q - 16) * d.
    Q5_0,
    /// Super-blocks of 256: 8 sub-blocks with 6-bit scales and mins, 4-bit codes.
    Q4K,
    /// Super-blocks of 256: 16 sub-blocks with i8 scales, 6-bit codes.
    Q6K,
}

impl TensorType {
    /// From a ggml type id.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// ggml's name for a type id (for error messages).
    pub fn id_label(id: u32) -> &'static str {
        const NAMES: [&str; 42] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
            "NVFP4",
            "?",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// Name as ggml prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q4K => "Q4_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub const fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 => 32,
            Self::Q4K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of a row of `n` elements (`n` a multiple of the block length).
    pub const fn row_bytes(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// array.
    Array(Array),
}

/// A metadata array, stored by element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f64` elements.
    F64(Vec<f64>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// Strings.
    Str(Vec<String>),
    /// Arrays.
    Nested(Vec<Array>),
    /// An array kvq does not read ([`decoded_array`]): checked and skipped, its GGUF element type and
    /// length kept.
    Skipped {
        /// GGUF element type.
        ty: u32,
        /// Elements.
        len: u64,
    },
}

/// `match $a` with one arm `$f` over the vector `$v` of every numeric variant, then `$arms`.
macro_rules! numeric {
    ($a:expr, |$v:ident| $f:expr, $($arms:tt)*) => {
        match $a {
            Array::U8($v) => $f,
            Array::U16($v) => $f,
            Array::U32($v) => $f,
            Array::U64($v) => $f,
            Array::I8($v) => $f,
            Array::I16($v) => $f,
            Array::I32($v) => $f,
            Array::I64($v) => $f,
            Array::F32($v) => $f,
            Array::F64($v) => $f,
            $($arms)*
        }
    };
}

impl Array {
    /// Elements.
    pub fn len(&self) -> usize {
        numeric!(self, |v| v.len(),
            Self::Bool(v) => v.len(),
            Self::Str(v) => v.len(),
            Self::Nested(v) => v.len(),
            Self::Skipped { len, .. } => usize::try_from(*len).unwrap_or(usize::MAX),
        )
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as floats (any numeric type; `None` for strings, bools, arrays, skipped arrays).
    // One arm for every numeric type, f64 included (its cast is a no-op).
    #[allow(clippy::unnecessary_cast)]
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        numeric!(self, |v| Some(v.iter().map(|&x| x as f64).collect()), _ => None)
    }

    /// The elements as strings.
    pub fn as_strs(&self) -> Option<&[String]> {
        match self {
            Self::Str(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as bools.
    pub fn as_bools(&self) -> Option<&[bool]> {
        match self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }
}

impl Value {
    /// As an unsigned integer (non-negative signed values too).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(v) => Some(v),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// As a float (integers too).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F64(v) => Some(v),
            Self::U64(v) => Some(v as f64),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description; its bytes are at `offset..offset + size` of the data section.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name (`blk.3.attn_q.weight`).
    pub name: String,
    /// Dimensions, `dims[0]` fastest (ggml's `ne`).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: TensorType,
    /// Offset within the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed file: metadata, tensor descriptions, and where the data section starts.
#[derive(Debug)]
pub struct Gguf {
    /// Format version.
    pub version: u32,
    /// Metadata in file order of keys.
    pub metadata: HashMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_start: u64,
    /// File length.
    pub file_len: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of metadata arrays decoded so far.
    decoded: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let avail = (self.buf.len() - self.pos) as u64;
        if n > avail {
            return Err(GgufError::Truncated {
                what: what(),
                need: n,
                at: self.pos as u64,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// A string, checked, borrowed from the buffer.
    fn str_ref(&mut self, what: &dyn Fn() -> String) -> Result<&'a str> {
        let n = self.u64(&|| format!("{} (length)", what()))?;
        let n = cap(n, MAX_STRING, || format!("{} (string length)", what()))?;
        let b = self.take(n, what)?;
        std::str::from_utf8(b).map_err(|e| GgufError::Invalid(format!("{}: invalid UTF-8 ({e})", what())))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        self.str_ref(what).map(str::to_owned)
    }

    /// `n` bool bytes, each checked to be 0 or 1.
    fn bools(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let b = self.take(n, what)?;
        if let Some(i) = b.iter().position(|&x| x > 1) {
            return Err(GgufError::Invalid(format!("{}[{i}]: bool byte {}", what(), b[i])));
        }
        Ok(b)
    }

    /// A value of GGUF type `ty`; an array is decoded only when `decode` ([`Reader::array`]).
    fn value(&mut self, ty: u32, decode: bool, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.arr::<1>(what)?[0])),
            1 => Value::I64(i64::from(self.arr::<1>(what)?[0] as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.arr(what)?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.arr(what)?))),
            4 => Value::U64(u64::from(self.u32(what)?)),
            5 => Value::I64(i64::from(i32::from_le_bytes(self.arr(what)?))),
            6 => Value::F64(f64::from(f32::from_le_bytes(self.arr(what)?))),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Invalid(format!("{}: bool byte {b}", what()))),
            },
            8 => Value::Str(self.string(what)?),
            9 => Value::Array(self.array(0, decode, what)?),
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(GgufError::Invalid(format!("{}: unknown value type {t}", what()))),
        })
    }
}

impl Reader<'_> {
    /// Counts `bytes` more of decoded metadata against [`MAX_DECODED`].
    fn spend(&mut self, bytes: u64, what: &dyn Fn() -> String) -> Result<()> {
        self.decoded = self.decoded.saturating_add(bytes);
        cap(self.decoded, MAX_DECODED, || format!("{} (decoded metadata bytes)", what()))?;
        Ok(())
    }

    /// An array value (after its type tag): decoded by element type when `decode`, else walked and skipped.
    fn array(&mut self, depth: u32, decode: bool, what: &dyn Fn() -> String) -> Result<Array> {
        cap(u64::from(depth + 1), u64::from(MAX_DEPTH), || format!("{} (array nesting)", what()))?;
        let ety = self.u32(&|| format!("{} (array type)", what()))?;
        let n = self.u64(&|| format!("{} (array length)", what()))?;
        let n = cap(n, MAX_ARRAY, || format!("{} (array length)", what()))?;
        // Every element takes at least its size (strings their length, arrays their header): a count
        // beyond the bytes left is a lie.
        let (min, size) = match ety {
            0 | 1 | 7 => (1, 1),
            2 | 3 => (2, 2),
            4..=6 => (4, 4),
            10..=12 => (8, 8),
            8 => (8, std::mem::size_of::<String>() as u64),
            9 => (12, std::mem::size_of::<Array>() as u64),
            _ => {
                return Err(GgufError::Invalid(format!("{}: unknown array element type {ety}", what())));
            }
        };
        if n.saturating_mul(min) > self.remaining() {
            return Err(GgufError::Truncated {
                what: format!("{} ({n} array elements)", what()),
                need: n.saturating_mul(min),
                at: self.pos as u64,
                len: self.buf.len() as u64,
            });
        }
        if !decode {
            match ety {
                8 => {
                    for i in 0..n {
                        self.str_ref(&|| format!("{}[{i}]", what()))?;
                    }
                }
                9 => {
                    for i in 0..n {
                        self.array(depth + 1, false, &|| format!("{}[{i}]", what()))?;
                    }
                }
                7 => {
                    self.bools(n, what)?;
                }
                _ => {
                    self.take(n * min, what)?;
                }
            }
            return Ok(Array::Skipped { ty: ety, len: n });
        }
        self.spend(n * size, what)?;
        let n = n as usize;
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let b = self.take((n * std::mem::size_of::<$t>()) as u64, what)?;
                Array::$variant(
                    b.chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }};
        }
        Ok(match ety {
            0 => Array::U8(self.take(n as u64, what)?.to_vec()),
            1 => fixed!(I8, i8),
            2 => fixed!(U16, u16),
            3 => fixed!(I16, i16),
            4 => fixed!(U32, u32),
            5 => fixed!(I32, i32),
            6 => fixed!(F32, f32),
            10 => fixed!(U64, u64),
            11 => fixed!(I64, i64),
            12 => fixed!(F64, f64),
            7 => Array::Bool(self.bools(n as u64, what)?.iter().map(|&x| x == 1).collect()),
            8 => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    let s = self.string(&|| format!("{}[{i}]", what()))?;
                    self.spend(s.len() as u64, what)?;
                    v.push(s);
                }
                Array::Str(v)
            }
            _ => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array(depth + 1, true, &|| format!("{}[{i}]", what()))?);
                }
                Array::Nested(v)
            }
        })
    }
}

impl Gguf {
    /// Parses the header, metadata and tensor descriptions of `buf` (a whole file).
    ///
    /// # Errors
    /// [`GgufError`] for anything malformed, truncated, unsupported or out of bounds.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let mut r = Reader { buf, pos: 0, decoded: 0 };
        let magic = r.arr::<4>(&|| "magic".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = cap(r.u64(&|| "tensor count".into())?, MAX_ENTRIES, || "tensor count".into())?;
        let n_kv = cap(r.u64(&|| "metadata count".into())?, MAX_ENTRIES, || "metadata count".into())?;
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let ty = r.u32(&|| format!("metadata {key} (type)"))?;
            let v = r.value(ty, decoded_array(&key), &|| format!("metadata {key}"))?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(GgufError::Invalid(format!("metadata key {key} appears twice")));
            }
        }
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("tensor #{i} name"))?;
            let nd = r.u32(&|| format!("tensor {name} rank"))?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(GgufError::Invalid(format!(
                    "tensor {name}: rank {nd} (1..={MAX_DIMS} supported)"
                )));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for k in 0..nd {
                dims.push(r.u64(&|| format!("tensor {name} dim {k}"))?);
            }
            let id = r.u32(&|| format!("tensor {name} type"))?;
            let offset = r.u64(&|| format!("tensor {name} offset"))?;
            let ty = TensorType::from_id(id).ok_or_else(|| GgufError::UnknownType {
                name: name.clone(),
                ty: id,
                label: TensorType::id_label(id),
            })?;
            let mut n: u64 = 1;
            for &d in &dims {
                n = n.checked_mul(d).filter(|&n| n < (1 << 40)).ok_or_else(|| {
                    GgufError::Invalid(format!("tensor {name}: dims {dims:?} overflow the element count"))
                })?;
            }
            if n == 0 {
                return Err(GgufError::Invalid(format!("tensor {name}: dims {dims:?} hold no element")));
            }
            let bl = ty.block_len() as u64;
            if dims[0] % bl != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name}: row length {} is not a multiple of {ty}'s block of {bl}",
                    dims[0]
                )));
            }
            let size = n / bl * ty.block_bytes() as u64;
            tensors.push(TensorInfo { name, dims, ty, offset, size });
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(GgufError::Invalid(format!("general.alignment {v:?} is not a power of two")));
                }
            },
        };
        let data_start = (r.pos as u64).div_ceil(align) * align;
        let file_len = buf.len() as u64;
        let avail = file_len.saturating_sub(data_start);
        let mut names = std::collections::HashSet::new();
        for t in &tensors {
            if !names.insert(t.name.as_str()) {
                return Err(GgufError::Invalid(format!("tensor {} appears twice", t.name)));
            }
            if t.offset % align != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {}: offset {} is not aligned to {align}",
                    t.name, t.offset
                )));
            }
            if t.offset.checked_add(t.size).is_none_or(|end| end > avail) {
                return Err(GgufError::OutOfBounds {
                    name: t.name.clone(),
                    offset: t.offset,
                    size: t.size,
                    avail,
                });
            }
        }
        Ok(Self { version, metadata, tensors, data_start, file_len })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of tensor `t` within `file` (the buffer this was parsed from).
    ///
    /// # Errors
    /// [`GgufError::OutOfBounds`] if `file` is not that buffer (shorter than the parse saw).
    pub fn tensor_bytes<'f>(&self, file: &'f [u8], t: &TensorInfo) -> Result<&'f [u8]> {
        let start = self.data_start + t.offset;
        let end = start + t.size;
        file.get(start as usize..end as usize).ok_or_else(|| GgufError::OutOfBounds {
            name: t.name.clone(),
            offset: t.offset,
            size: t.size,
            avail: (file.len() as u64).saturating_sub(self.data_start),
        })
    }
}

/// Writes GGUF v3 files: test fixtures and fuzz seeds.
#[derive(Default)]
pub struct Writer {
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Writer {
    /// Adds a metadata entry.
    pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
        self.kv.push((key.into(), v));
        self
    }

    /// Adds a tensor of ggml type id `ty` with raw bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_of(v: &Value) -> u32 {
        match v {
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::Str(s) => Self::put_str(out, s),
            Value::Array(a) => Self::put_array(out, a),
        }
    }

    fn put_array(out: &mut Vec<u8>, a: &Array) {
        fn all<const N: usize, T: Copy>(out: &mut Vec<u8>, ty: u32, v: &[T], le: fn(T) -> [u8; N]) {
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for &x in v {
                out.extend_from_slice(&le(x));
            }
        }
        match a {
            Array::U8(v) => all(out, 0, v, u8::to_le_bytes),
            Array::I8(v) => all(out, 1, v, i8::to_le_bytes),
            Array::U16(v) => all(out, 2, v, u16::to_le_bytes),
            Array::I16(v) => all(out, 3, v, i16::to_le_bytes),
            Array::U32(v) => all(out, 4, v, u32::to_le_bytes),
            Array::I32(v) => all(out, 5, v, i32::to_le_bytes),
            Array::F32(v) => all(out, 6, v, f32::to_le_bytes),
            Array::Bool(v) => all(out, 7, v, |b| [u8::from(b)]),
            Array::U64(v) => all(out, 10, v, u64::to_le_bytes),
            Array::I64(v) => all(out, 11, v, i64::to_le_bytes),
            Array::F64(v) => all(out, 12, v, f64::to_le_bytes),
            Array::Str(v) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    Self::put_str(out, x);
                }
            }
            Array::Nested(v) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    Self::put_array(out, x);
                }
            }
            // Written as the empty array of its type: the elements were never read.
            Array::Skipped { ty, .. } => {
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&0u64.to_le_bytes());
            }
        }
    }

    /// The file's bytes.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Self::put_str(&mut out, k);
            out.extend_from_slice(&Self::type_of(v).to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut off = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            offsets.push(off);
            off = (off + data.len() as u64).div_ceil(32) * 32;
        }
        let start = out.len().div_ceil(32) * 32;
        out.resize(start, 0);
        for ((_, _, _, data), o) in self.tensors.iter().zip(offsets) {
            out.resize(start + o as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::default();
        w.kv("general.architecture", Value::Str("llama".into()))
            .kv("llama.block_count", Value::U64(2))
            .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(vec!["a".into(), "b".into()])))
            .kv("tokenizer.ggml.scores", Value::Array(Array::F32(vec![0.5, -1.0])))
            .kv("general.tags", Value::Array(Array::Str(vec!["x".into()])))
            .tensor("w", &[32, 2], 8, vec![7; 68])
            .tensor("n", &[4], 0, vec![1; 16]);
        w.finish()
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let g = Gguf::parse(&f).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(2));
        assert_eq!(g.tensors.len(), 2);
        let w = g.tensor("w").unwrap();
        assert_eq!((w.ty, w.size, w.elements()), (TensorType::Q8_0, 68, 64));
        assert_eq!(g.tensor_bytes(&f, w).unwrap(), &[7; 68][..]);
        assert_eq!(g.tensor_bytes(&f, g.tensor("n").unwrap()).unwrap(), &[1; 16][..]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let f = sample();
        for n in 0..f.len() {
            // The last tensor's bytes are the file's tail: any cut there is out of bounds.
            assert!(Gguf::parse(&f[..n]).is_err(), "prefix of {n} bytes parsed");
        }
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        let mut f = b"GGUF".to_vec();
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.push(b'k');
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&10u32.to_le_bytes());
        f.extend_from_slice(&(1u64 << 23).to_le_bytes());
        let e = Gguf::parse(&f).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { need, .. } if need == 8 << 23), "{e}");
        // A huge string length.
        let mut g = f[..24].to_vec();
        g.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&g).unwrap_err(), GgufError::TooLarge { .. }));
    }

    #[test]
    fn bad_tensors_are_named() {
        let mut w = Writer::default();
        w.tensor("blk.0.x", &[32], 23, vec![0; 17]);
        let e = Gguf::parse(&w.finish()).unwrap_err();
        assert_eq!(e.to_string(), "tensor blk.0.x: unsupported tensor type 23 (IQ4_XS)");
        let mut w = Writer::default();
        w.tensor("t", &[33], 8, vec![0; 34]);
        assert!(Gguf::parse(&w.finish()).unwrap_err().to_string().contains("not a multiple"));
        // Data cut short: the tensor names itself and the numbers.
        let mut w = Writer::default();
        w.tensor("big", &[64], 0, vec![0; 256]);
        let f = w.finish();
        let e = Gguf::parse(&f[..f.len() - 4]).unwrap_err();
        assert!(matches!(e, GgufError::OutOfBounds { ref name, size: 256, .. } if name == "big"), "{e}");
    }

    proptest::proptest! {
        /// Any corruption of a valid file is parsed or refused, never a panic, and whatever parses keeps
        /// every tensor inside the file.
        #[test]
        fn corrupted_files_never_panic(edits in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 1..8)) {
            let mut f = sample();
            for (at, b) in edits {
                let n = f.len();
                f[at % n] = b;
            }
            if let Ok(g) = Gguf::parse(&f) {
                for t in &g.tensors {
                    proptest::prop_assert!(g.tensor_bytes(&f, t).is_ok());
                }
            }
        }
    }

    /// Arrays are stored by element type, a byte per `u8`; arrays kvq does not read are skipped (checked,
    /// not kept); the decoded bytes are capped.
    #[test]
    fn arrays_are_typed_skipped_and_capped() {
        let n = 1 << 20;
        let mut w = Writer::default();
        w.kv("general.junk", Value::Array(Array::U8(vec![7; n])))
            .kv("tokenizer.ggml.token_type", Value::Array(Array::U8(vec![1; n])))
            .kv("tokenizer.ggml.scores", Value::Array(Array::F32(vec![0.25; 3])))
            .kv("gemma3.attention.sliding_window_pattern", Value::Array(Array::Bool(vec![true, false])))
            .kv("general.nested", Value::Array(Array::Nested(vec![Array::Str(vec!["a".into()])])));
        let f = w.finish();
        let g = Gguf::parse(&f).unwrap();
        assert_eq!(g.get("general.junk"), Some(&Value::Array(Array::Skipped { ty: 0, len: n as u64 })));
        assert_eq!(g.get("general.nested"), Some(&Value::Array(Array::Skipped { ty: 9, len: 1 })));
        let Some(Value::Array(Array::U8(t))) = g.get("tokenizer.ggml.token_type") else { panic!() };
        assert_eq!((t.len(), t.capacity()), (n, n));
        assert_eq!(
            g.get("tokenizer.ggml.scores").and_then(Value::as_array).unwrap().to_f64(),
            Some(vec![0.25; 3])
        );
        let p = g.get("gemma3.attention.sliding_window_pattern").and_then(Value::as_array).unwrap();
        assert_eq!(p.as_bools(), Some(&[true, false][..]));
        // A skipped array is still checked: a bad bool or UTF-8 inside it is an error.
        let mut w = Writer::default();
        w.kv("general.flags", Value::Array(Array::Bool(vec![true; 4])));
        let mut f = w.finish();
        let at = f.windows(4).position(|w| w == [1, 1, 1, 1]).unwrap() + 2;
        f[at] = 2;
        assert!(Gguf::parse(&f).unwrap_err().to_string().contains("bool byte 2"));
        // The decoded-bytes budget.
        let mut r = Reader { buf: &[], pos: 0, decoded: 0 };
        assert!(r.spend(MAX_DECODED, &|| "x".into()).is_ok());
        assert!(matches!(r.spend(1, &|| "x".into()), Err(GgufError::TooLarge { .. })));
    }

    #[test]
    fn version_and_magic() {
        let mut f = sample();
        f[4] = 1;
        assert_eq!(Gguf::parse(&f).unwrap_err(), GgufError::Version(1));
        f[0] = b'X';
        assert!(matches!(Gguf::parse(&f).unwrap_err(), GgufError::BadMagic(_)));
    }
}
