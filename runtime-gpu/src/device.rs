//! The device: a CUDA context with kvq's kernels loaded, and a layer cache in its memory.
//!
//! Every kernel has one typed wrapper here (`launch_*`) that checks the lengths and shapes it is given
//! against the layout and holds the single `unsafe` launch.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use kvq_core::cache::{CacheConfig, Counts, Layout};

use crate::abi::{self, KvqAppend, KvqCounts, KvqLayout, MAX_HEAD_DIM, MAX_RATIO, Splits};
use crate::error::{GpuError, Result};
use crate::nvrtc;

// SAFETY: `#[repr(C)]` structs of `u32` fields, the same fields in the same order as kvq.cuh declares
// (checked by tests/header.rs), so the kernels read them as passed by value.
unsafe impl DeviceRepr for KvqLayout {}
// SAFETY: as above.
unsafe impl DeviceRepr for KvqCounts {}
// SAFETY: as above.
unsafe impl DeviceRepr for KvqAppend {}

/// Whether a CUDA driver library can be loaded (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: probing loads the library and runs its initializers, which have no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn image(m: &nvrtc::Module) -> cudarc::nvrtc::Ptx {
    if m.cubin {
        cudarc::nvrtc::Ptx::from_binary(m.image.clone())
    } else {
        cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(&m.image).trim_end_matches('\0').to_string())
    }
}

/// A GPU with kvq's kernels compiled for it and loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    name: String,
    functions: HashMap<&'static str, CudaFunction>,
    sms: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).field("arch", &self.arch).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, compiles (or reads from the cache) every kernel for its architecture and
    /// loads them.
    ///
    /// # Errors
    /// [`GpuError::NoDriver`], [`GpuError::NoDevice`] when there is nothing to run on (never a panic: the
    /// driver library's own panics are caught); [`GpuError::NoNvrtc`] when a kernel is neither in the
    /// module cache nor compilable here; [`GpuError::Compile`].
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| GpuError::NoDevice("the driver library panicked while starting".into()))?
            .map_err(|e| GpuError::NoDevice(format!("{e:?}")))?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name()?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as usize;
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        for src in &nvrtc::SOURCES {
            let m = nvrtc::compile_cached(src, &arch)?;
            let module = match ctx.load_module(image(&m)) {
                Ok(module) => module,
                // A damaged or stale cached module: compile afresh and replace it.
                Err(_) if m.cached => {
                    let m = nvrtc::compile(src, &arch, false)?;
                    nvrtc::store(src, &m);
                    ctx.load_module(image(&m))?
                }
                Err(e) => return Err(e.into()),
            };
            for &k in src.kernels {
                functions.insert(k, module.load_function(k)?);
            }
        }
        Ok(Self { ctx, stream, arch, name, functions, sms })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its architecture (`sm_87`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Its multiprocessors.
    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn function(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or(GpuError::Unsupported { what: "kernel not loaded", value: 0 })
    }

    /// Copies `src` to `dst` with the copy kernel (the bandwidth baseline): `n16` 16-byte words.
    ///
    /// # Errors
    /// [`GpuError::Unsupported`] if either buffer is shorter than `n16` 16-byte words; driver errors.
    pub fn launch_copy(&self, src: &CudaSlice<u32>, dst: &mut CudaSlice<u32>, n16: usize) -> Result<()> {
        let words = n16.checked_mul(4).ok_or(GpuError::Unsupported { what: "copy length", value: n16 })?;
        if src.len() < words || dst.len() < words {
            return Err(GpuError::Unsupported { what: "copy length", value: n16 });
        }
        let f = self.function("kvq_copy")?;
        let cfg = LaunchConfig {
            grid_dim: ((self.sms * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = n16 as u64;
        let mut b = self.stream.launch_builder(f);
        b.arg(src).arg(dst).arg(&n);
        // SAFETY: kvq_copy(const uint4*, uint4*, unsigned long long): both buffers hold at least n 16-byte
        // words (checked above) and the grid-stride loop stays below n.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

fn grid_for(items: u64) -> Result<LaunchConfig> {
    let blocks = items.div_ceil(256);
    let blocks = u32::try_from(blocks)
        .map_err(|_| GpuError::Unsupported { what: "append items", value: items as usize })?;
    Ok(LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
}

/// The buffers of one attention shape: the splits' partial outputs and softmax states.
pub struct AttendWork {
    splits: Splits,
    queries: usize,
    q_heads: usize,
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
}

impl std::fmt::Debug for AttendWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttendWork").field("splits", &self.splits).field("queries", &self.queries).finish()
    }
}

impl AttendWork {
    /// How the tokens are split.
    pub fn splits(&self) -> Splits {
        self.splits
    }
}

/// One layer's cache in device memory, in kvq-core's layout.
pub struct DeviceCache {
    gpu: Arc<Gpu>,
    cfg: CacheConfig,
    layout: Layout,
    abi: KvqLayout,
    arena: CudaSlice<u32>,
    counts: Counts,
}

impl std::fmt::Debug for DeviceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCache").field("cfg", &self.cfg).field("counts", &self.counts).finish()
    }
}

impl DeviceCache {
    /// An empty cache of `cfg` on `gpu` (arena zeroed).
    ///
    /// # Errors
    /// The configuration's layout errors; [`GpuError::Unsupported`] for formats the kernels do not read;
    /// driver errors (out of device memory).
    pub fn new(gpu: Arc<Gpu>, cfg: CacheConfig) -> Result<Self> {
        let layout = cfg.layout()?;
        let abi = KvqLayout::new(&cfg, &layout)?;
        let arena = gpu.stream.alloc_zeros::<u32>(layout.total_words.max(1))?;
        Ok(Self { gpu, cfg, layout, abi, arena, counts: Counts::default() })
    }

    /// A cache of `cfg` holding `words` (a kvq-core arena) at `counts`.
    ///
    /// # Errors
    /// As [`DeviceCache::new`]; [`kvq_core::Error::ArenaTooSmall`] for a short arena;
    /// [`kvq_core::Error::InvalidConfig`] for counts no cache of `cfg` reaches ([`abi::check_counts`]).
    pub fn upload(gpu: Arc<Gpu>, cfg: CacheConfig, words: &[u32], counts: Counts) -> Result<Self> {
        let layout = cfg.layout()?;
        abi::check_counts(&cfg, counts)?;
        if words.len() < layout.total_words {
            return Err(
                kvq_core::Error::ArenaTooSmall { needed: layout.total_bytes, got: words.len() * 4 }.into()
            );
        }
        let abi = KvqLayout::new(&cfg, &layout)?;
        let arena = gpu.stream.clone_htod(&words[..layout.total_words.max(1).min(words.len())])?;
        Ok(Self { gpu, cfg, layout, abi, arena, counts })
    }

    /// Whether [`DeviceCache::append`] takes this cache's format (fp16 and KIVI's plain formats); the
    /// calibrated ones are appended on the host and uploaded.
    pub fn appends_on_device(&self) -> bool {
        self.abi.device_append()
    }

    /// The arena's words, read back.
    ///
    /// # Errors
    /// Driver errors.
    pub fn download(&self) -> Result<Vec<u32>> {
        let mut w = self.gpu.stream.clone_dtoh(&self.arena)?;
        w.truncate(self.layout.total_words);
        Ok(w)
    }

    /// The counts.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Bytes of the arena.
    pub fn bytes(&self) -> usize {
        self.layout.total_bytes
    }

    /// Appends `[tokens][kv_heads][head_dim]` keys and values, with `Cache::append`'s rules and bits:
    /// either all tokens are appended or, on an input error, none (the input is checked on the host
    /// before anything is launched).
    ///
    /// # Errors
    /// The errors `Cache::append` gives for the same input; driver errors, after which the device cache
    /// may hold part of the append and should be rebuilt.
    ///
    /// Only fp16 and KIVI's plain formats are appended on the device; a calibrated format is refused with
    /// [`GpuError::Unsupported`] (append to a `kvq-core` cache on the host and [`DeviceCache::upload`] it).
    pub fn append(&mut self, keys: &[f32], values: &[f32]) -> Result<()> {
        if !self.abi.device_append() {
            return Err(GpuError::Unsupported {
                what: "appending a calibrated format on the device (append on the host, then `upload`)",
                value: 0,
            });
        }
        let tokens = abi::check_append(&self.cfg, self.counts, keys, values)?;
        let hd = self.cfg.kv_heads * self.cfg.head_dim;
        let piece = abi::max_piece(&self.cfg, &self.layout);
        let mut done = 0;
        while done < tokens {
            let n = piece.min(tokens - done);
            let k = self.gpu.stream.clone_htod(&keys[done * hd..(done + n) * hd])?;
            let v = self.gpu.stream.clone_htod(&values[done * hd..(done + n) * hd])?;
            let plan = abi::plan_append(&self.cfg, self.counts, n);
            self.launch_append(&plan, &k, &v, n)?;
            self.counts = abi::counts_after(&self.cfg, self.counts, n)?;
            done += n;
        }
        Ok(())
    }

    /// Both passes of one append piece.
    fn launch_append(
        &mut self,
        a: &KvqAppend,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<()> {
        let hd = self.cfg.kv_heads * self.cfg.head_dim;
        if k.len() != rows * hd || v.len() != rows * hd || (a.sink_new + a.tokens) as usize != rows {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "append rows",
                expected: rows * hd,
                got: k.len(),
            }
            .into());
        }
        for (name, items) in [
            ("kvq_append_quantize", abi::quantize_items(&self.abi, a)),
            ("kvq_append_store", abi::store_items(&self.abi, a)),
        ] {
            if items == 0 {
                continue;
            }
            let f = self.gpu.function(name)?;
            let cfg = grid_for(items)?;
            let mut b = self.gpu.stream.launch_builder(f);
            b.arg(&mut self.arena).arg(&self.abi).arg(a).arg(k).arg(v);
            // SAFETY: kvq_append_*(unsigned*, KvqLayout, KvqAppend, const float*, const float*): the arena
            // holds the layout's words (allocated from it), the inputs hold the plan's rows of
            // kv_heads*head_dim floats (checked above), and every item index the kernel acts on is below
            // the item count the header computes from the same structs.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// Decode attention of one position over what the cache holds (the position's key and value
    /// appended first): `q` is `[q_heads][head_dim]`, the result `[q_heads][head_dim]`.
    ///
    /// # Errors
    /// As kvq-core's `attention::decode`; [`GpuError::Unsupported`] past 8 query heads a KV head or
    /// head_dim 256 (or one not a multiple of 32).
    pub fn decode(&self, q: &[f32], q_heads: usize, scale: f32) -> Result<Vec<f32>> {
        self.attend(q, None, q_heads, scale)
    }

    /// Prefill attention of a chunk of positions after what the cache holds: `q` `[n][q_heads][d]`, `k`
    /// and `v` the chunk's `[n][kv_heads][d]` in f32; position i sees the cache and chunk positions 0..=i.
    /// Append the chunk afterwards.
    ///
    /// # Errors
    /// As [`DeviceCache::decode`], and shape errors for `k`, `v`.
    pub fn prefill(&self, q: &[f32], k: &[f32], v: &[f32], q_heads: usize, scale: f32) -> Result<Vec<f32>> {
        self.attend(q, Some((k, v)), q_heads, scale)
    }

    fn attend(
        &self,
        q: &[f32],
        chunk: Option<(&[f32], &[f32])>,
        q_heads: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let (heads, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        self.check_heads(q_heads)?;
        let n = q.len() / (q_heads * d);
        if n == 0 || q.len() != n * q_heads * d || (chunk.is_none() && n != 1) {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "query length",
                expected: q_heads * d,
                got: q.len(),
            }
            .into());
        }
        if let Some(i) = q.iter().position(|x| !x.is_finite()) {
            return Err(kvq_core::Error::NonFinite { index: i }.into());
        }
        if let Some((k, v)) = chunk {
            if k.len() != n * heads * d || v.len() != k.len() {
                return Err(kvq_core::Error::ShapeMismatch {
                    what: "chunk key/value length",
                    expected: n * heads * d,
                    got: k.len(),
                }
                .into());
            }
            // As kvq-core: the index within the buffer that holds it, keys checked first.
            for x in [k, v] {
                if let Some(i) = x.iter().position(|x| !x.is_finite()) {
                    return Err(kvq_core::Error::NonFinite { index: i }.into());
                }
            }
        }
        let stream = &self.gpu.stream;
        let qd = stream.clone_htod(q)?;
        let (kd, vd) = match chunk {
            Some((k, v)) => (Some(stream.clone_htod(k)?), Some(stream.clone_htod(v)?)),
            None => (None, None),
        };
        let mut work = self.work(q_heads, n)?;
        let mut out = stream.alloc_zeros::<f32>(n * q_heads * d)?;
        self.attend_device(&qd, kd.as_ref().zip(vd.as_ref()), q_heads, scale, &mut work, &mut out)?;
        Ok(stream.clone_dtoh(&out)?)
    }

    fn check_heads(&self, q_heads: usize) -> Result<usize> {
        let (heads, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        if q_heads == 0 || !q_heads.is_multiple_of(heads) {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "q_heads (a multiple of kv_heads)",
                expected: heads,
                got: q_heads,
            }
            .into());
        }
        let ratio = q_heads / heads;
        if ratio > MAX_RATIO || d > MAX_HEAD_DIM || !d.is_multiple_of(32) {
            return Err(GpuError::Unsupported {
                what: "query heads per KV head (at most 8) or head_dim (32 to 256, a multiple of 32)",
                value: ratio.max(d),
            });
        }
        Ok(ratio)
    }

    /// The buffers of an attention over what the cache holds now (plus `queries` chunk positions for a
    /// prefill; 1 for a decode), split as the device's multiprocessors suit.
    ///
    /// # Errors
    /// Shape errors as [`DeviceCache::decode`]; driver errors.
    pub fn work(&self, q_heads: usize, queries: usize) -> Result<AttendWork> {
        self.check_heads(q_heads)?;
        let queries = queries.max(1);
        let tokens = self.counts.held() + queries;
        let sp = Splits::new(tokens, self.cfg.kv_heads, queries, self.gpu.sms * 4);
        let rows = queries * q_heads;
        let d = self.cfg.head_dim;
        Ok(AttendWork {
            splits: sp,
            queries,
            q_heads,
            part_o: self.gpu.stream.alloc_zeros::<f32>(rows * sp.splits * d)?,
            part_ml: self.gpu.stream.alloc_zeros::<f32>(rows * sp.splits * 2)?,
        })
    }

    /// Attention with everything on the device and nothing synchronized: a decode (`chunk` `None`, `q`
    /// one position) or a prefill (`chunk` the positions' f32 keys and values), into `out`
    /// `[queries][q_heads][d]`. `work` comes from [`DeviceCache::work`] for the same shape. The device
    /// buffers are not read back, so their contents are not checked for NaN here as the host entry
    /// points check theirs.
    ///
    /// # Errors
    /// Shape errors (buffers that do not match `work`, a cache that grew past the work's splits, an empty
    /// cache for a decode); driver errors.
    pub fn attend_device(
        &self,
        q: &CudaSlice<f32>,
        chunk: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
        q_heads: usize,
        scale: f32,
        work: &mut AttendWork,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let ratio = self.check_heads(q_heads)?;
        let n = work.queries;
        let held = self.counts.held();
        let tokens = held + if chunk.is_some() { n } else { 0 };
        let covered = work.splits.split * work.splits.splits;
        if work.q_heads != q_heads || tokens > covered || (chunk.is_none() && n != 1) {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "attention work (made for another shape or a shorter cache)",
                expected: tokens,
                got: covered,
            }
            .into());
        }
        if tokens == 0 {
            return Err(kvq_core::Error::EmptyInput { what: "cache" }.into());
        }
        if !scale.is_finite() {
            return Err(kvq_core::Error::NonFinite { index: 0 }.into());
        }
        let counts = KvqCounts::new(&self.cfg, self.counts);
        let sp = work.splits;
        self.launch_attend(q, chunk, n, ratio, scale, sp, counts, &mut work.part_o, &mut work.part_ml)?;
        self.launch_merge(&work.part_o, &work.part_ml, n, q_heads, sp.splits, out)
    }

    /// A copy of the cache on the same device (device to device).
    ///
    /// # Errors
    /// Driver errors.
    pub fn try_clone(&self) -> Result<Self> {
        let mut arena = self.gpu.stream.alloc_zeros::<u32>(self.arena.len())?;
        self.gpu.stream.memcpy_dtod(&self.arena, &mut arena)?;
        Ok(Self {
            gpu: self.gpu.clone(),
            cfg: self.cfg,
            layout: self.layout,
            abi: self.abi,
            arena,
            counts: self.counts,
        })
    }

    /// Bytes held per region now (kvq-core's accounting).
    pub fn usage(&self) -> kvq_core::cache::Usage {
        self.cfg.usage(self.counts)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_attend(
        &self,
        q: &CudaSlice<f32>,
        chunk: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
        n: usize,
        ratio: usize,
        scale: f32,
        sp: Splits,
        counts: KvqCounts,
        part_o: &mut CudaSlice<f32>,
        part_ml: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (heads, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        let rows = n * heads * ratio;
        if q.len() != rows * d
            || part_o.len() != rows * sp.splits * d
            || part_ml.len() != rows * sp.splits * 2
        {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "attention buffers",
                expected: rows * d,
                got: q.len(),
            }
            .into());
        }
        if let Some((k, v)) = chunk
            && (k.len() != n * heads * d || v.len() != n * heads * d)
        {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "chunk length",
                expected: n * heads * d,
                got: k.len(),
            }
            .into());
        }
        let generic = self.abi.keys.generic != 0 || self.abi.values.generic != 0;
        let f = self.gpu.function(if generic { nvrtc::ATTEND_GENERIC } else { nvrtc::ATTEND }[ratio - 1])?;
        let too_many = |v: usize| GpuError::Unsupported { what: "attention grid", value: v };
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(sp.splits).map_err(|_| too_many(sp.splits))?,
                u32::try_from(heads).ok().filter(|&y| y <= 65535).ok_or(too_many(heads))?,
                u32::try_from(n).ok().filter(|&z| z <= 65535).ok_or(too_many(n))?,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let split = sp.split as u32;
        let null = 0u64;
        let mut b = self.gpu.stream.launch_builder(f);
        b.arg(&self.arena).arg(&self.abi).arg(&counts).arg(q);
        match chunk {
            Some((k, v)) => b.arg(k).arg(v),
            None => b.arg(&null).arg(&null),
        };
        b.arg(&scale).arg(&split).arg(part_o).arg(part_ml);
        // SAFETY: kvq_attend_gG(const unsigned*, KvqLayout, KvqCounts, const float*, const float*,
        // const float*, float, unsigned, float*, float*): the arena holds the layout's words and the counts
        // are the cache's own, so every token the kernel resolves lies in its region; q holds n*q_heads*d
        // floats; the chunk (or two null pointers, which the kernel does not read without a chunk) holds
        // n*kv_heads*d; the partial buffers hold splits rows per query head (all checked above); G = ratio
        // and head_dim <= 256 fit the kernel's shared arrays (checked by `attend`).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn launch_merge(
        &self,
        part_o: &CudaSlice<f32>,
        part_ml: &CudaSlice<f32>,
        n: usize,
        q_heads: usize,
        splits: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = self.cfg.head_dim;
        let rows = n * q_heads;
        if part_o.len() != rows * splits * d || part_ml.len() != rows * splits * 2 || out.len() != rows * d {
            return Err(kvq_core::Error::ShapeMismatch {
                what: "merge buffers",
                expected: rows * d,
                got: out.len(),
            }
            .into());
        }
        let f = self.gpu.function("kvq_merge")?;
        let cfg = LaunchConfig {
            grid_dim: (q_heads as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (splits, d32) = (splits as u32, d as u32);
        let mut b = self.gpu.stream.launch_builder(f);
        b.arg(part_o).arg(part_ml).arg(&splits).arg(&d32).arg(out);
        // SAFETY: kvq_merge(const float*, const float*, unsigned, unsigned, float*): grid (q_heads, n) rows
        // of `splits` partial states and d outputs each, as the buffers hold (checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
