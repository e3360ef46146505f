//! The crate's errors: every failure to find, start or use a GPU is one of these, never a panic.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No CUDA driver library on this machine.
    #[error(
        "no CUDA driver: libcuda.so was not found (no NVIDIA driver installed, or not on LD_LIBRARY_PATH)"
    )]
    NoDriver,
    /// No NVRTC library on this machine.
    #[error(
        "no NVRTC: libnvrtc.so was not found (install the CUDA toolkit, JetPack, or the PyPI wheel \
         nvidia-cuda-nvrtc-cu12, and put its lib directory on LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    /// The driver is there but no usable device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A kernel source did not compile.
    #[error("NVRTC could not compile {kernel} for {arch}:\n{log}")]
    Compile {
        /// The source file.
        kernel: &'static str,
        /// The target architecture.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A configuration or size the GPU kernels do not take.
    #[error("unsupported: {what} ({value})")]
    Unsupported {
        /// What.
        what: &'static str,
        /// The value given.
        value: usize,
    },
    /// An error of kvq-core (shapes, NaN, context full...).
    #[error(transparent)]
    Core(#[from] kvq_core::Error),
}

/// The crate's result.
pub type Result<T> = core::result::Result<T, GpuError>;

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(format!("{e:?}"))
    }
}
