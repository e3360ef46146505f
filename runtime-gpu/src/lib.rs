//! kvq on NVIDIA GPUs: a layer's quantized KV cache in device memory, in `kvq-core`'s layout, with fused
//! CUDA kernels that append to it and attend over it without writing a full-precision copy of the
//! history.
//!
//! - [`nvrtc`]: the CUDA sources (`kernels/`, one operation a file, the layout in `kvq.cuh`), compiled at
//!   run time by NVRTC for the device's own architecture and cached on disk per architecture.
//! - [`device`]: [`Gpu`] (a context with the kernels loaded) and [`DeviceCache`] (append, decode and
//!   prefill attention); each kernel has one typed wrapper that checks shapes and holds its `unsafe`
//!   launch.
//! - [`abi`]: the kernels' argument structs and the host's plan of an append.
//! - [`sim`]: the attention kernels' work decomposition reproduced on the host, for tests without a GPU.
//!
//! The crate builds with no CUDA at all (cudarc loads the libraries when first used). Without a driver,
//! a device or NVRTC, [`Gpu::open`] returns an error that says which, never a panic.
//!
//! Formats on the GPU: fp16, and KIVI's uniform formats (per-channel keys, per-token values, f16 group
//! parameters, 1, 2, 3, 4 or 8 bits) with sinks, windows and sliding. The calibrated formats (codebooks,
//! outliers, FP8 parameters, rotations, RoPE offsets, MiKV's tiers) are refused with
//! [`GpuError::Unsupported`].

pub mod abi;
pub mod device;
pub mod error;
pub mod nvrtc;
pub mod sim;

pub use device::{AttendWork, DeviceCache, Gpu};
pub use error::{GpuError, Result};
