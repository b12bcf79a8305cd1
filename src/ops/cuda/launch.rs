//! Running the kernels: NVRTC compiles each source once per process and
//! compute capability, candle's device keeps the loaded module; plus the
//! cuBLAS products and the GEMMs' initial values that the convolution and
//! linear forwards share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda::{CudaDType, DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Storage, Tensor, WithDType};

use super::Source;

/// The element types the kernels are instantiated for (by name suffix) and
/// cuBLAS multiplies (accumulating in f32).
pub trait Elem: CudaDType + DeviceRepr + WithDType {
    const SUFFIX: &'static str;

    /// # Safety
    /// The configuration's dimensions and strides must address the buffers.
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> Result<()>;
}

macro_rules! elem {
    ($t:ty, $suffix:literal) => {
        impl Elem for $t {
            const SUFFIX: &'static str = $suffix;

            unsafe fn gemm(
                blas: &CudaBlas,
                cfg: StridedBatchedConfig<Self>,
                a: &CudaView<'_, Self>,
                b: &CudaView<'_, Self>,
                c: &mut CudaViewMut<'_, Self>,
            ) -> Result<()> {
                // SAFETY: as the caller guarantees.
                unsafe { blas.gemm_strided_batched(cfg, a, b, c) }.w()
            }
        }
    };
}
elem!(f32, "f32");
elem!(half::f16, "f16");

/// A loaded kernel and the stream it runs on.
pub struct Kernel {
    stream: Arc<CudaStream>,
    func: CudaFunction,
}

impl Kernel {
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Kernel `name` of `source` on `dev`: NVRTC compiles the source on its
/// first use in the process (for the device's compute capability), and the
/// module stays loaded per device.
pub fn function(dev: &CudaDevice, source: &Source, name: &str) -> Result<Kernel> {
    type Modules = HashMap<(DeviceId, &'static str), Arc<CudaModule>>;
    static MODULES: OnceLock<Mutex<Modules>> = OnceLock::new();
    if !source.entries.contains(&name) {
        bail!("no kernel {name} in {}", source.module);
    }
    let stream = dev.cuda_stream();
    let module = {
        let mut modules = MODULES.get_or_init(Default::default).lock().expect("the CUDA module cache lock");
        match modules.get(&(dev.id(), source.module)) {
            Some(m) => m.clone(),
            None => {
                let cc = stream.context().compute_capability().w()?;
                let opts = CompileOptions { options: super::nvrtc_options(cc.0, cc.1), ..Default::default() };
                let ptx = compile_ptx_with_opts(source.code, opts).map_err(|e| {
                    candle_core::Error::Msg(format!("compiling {} for sm_{}{}: {e}", source.module, cc.0, cc.1))
                })?;
                let m = stream.context().load_module(ptx).w()?;
                modules.insert((dev.id(), source.module), m.clone());
                m
            }
        }
    };
    Ok(Kernel { func: module.load_function(name).w()?, stream })
}

/// A grid of `(x, y, z)` blocks of `threads` threads.
pub fn grid(x: usize, y: usize, z: usize, threads: usize) -> Result<LaunchConfig> {
    let dim = |n: usize, max: usize, what: &str| match u32::try_from(n) {
        Ok(n) if n >= 1 && n as usize <= max => Ok(n),
        _ => Err(candle_core::Error::Msg(format!("CUDA launch: {n} blocks along {what} (at most {max})"))),
    };
    Ok(LaunchConfig {
        grid_dim: (dim(x, u32::MAX as usize >> 1, "x")?, dim(y, 65535, "y")?, dim(z, 65535, "z")?),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Blocks along a row of `len` items for `threads`-thread blocks: enough to
/// cover it, capped where each thread loops instead.
pub fn row_blocks(len: usize, threads: usize) -> usize {
    len.div_ceil(threads).clamp(1, 64)
}

/// Grid rows for `rows` rows of kernels whose blocks loop over the rest.
pub fn grid_rows(rows: usize) -> usize {
    rows.clamp(1, 65535)
}

/// The CUDA storage of a weight tensor, passed to `f` as a view.
pub fn with_weight<T: Elem, R>(t: &Tensor, f: impl FnOnce(CudaView<'_, T>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { bail!("a weight is not on the CUDA device") };
    f(view(s, layout)?)
}

/// A contiguous input's elements from its start offset.
pub fn view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(T::as_cuda_slice(s)?.slice(start..end)),
        None => bail!("CUDA op: a non-contiguous input {:?} (strides {:?})", l.dims(), l.stride()),
    }
}

/// A strided input's elements from its start offset (the strides travel separately).
pub fn strided_view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(T::as_cuda_slice(s)?.slice(l.start_offset()..))
}

/// An optional kernel pointer argument: a view, or null.
pub enum Ptr<'a, T> {
    Some(&'a CudaView<'a, T>),
    Null(u64),
}

impl<'a, T> Ptr<'a, T> {
    pub fn of(v: Option<&'a CudaView<'a, T>>) -> Self {
        v.map_or(Ptr::Null(0), Ptr::Some)
    }
    pub fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        match self {
            Ptr::Some(v) => b.arg(*v),
            Ptr::Null(z) => b.arg(z),
        };
    }
}

/// The initial value a GEMM accumulates onto: `out[r, i] = bias[·] +
/// offset[r] + residual[r, i]` over `rows` rows of `len`; the bias by the
/// row's channel (`per_row`, NCHW outputs with `channels` channels) or by
/// the element (row-major linear outputs).
#[allow(clippy::too_many_arguments)]
pub fn fill_initial<T: Elem>(
    dev: &CudaDevice,
    out: &mut CudaSlice<T>,
    bias: Option<&CudaView<'_, T>>,
    offset: Option<&CudaView<'_, T>>,
    residual: Option<&CudaView<'_, T>>,
    (rows, len, channels, per_row): (usize, usize, usize, bool),
) -> Result<()> {
    // 16-byte packs where every row starts on one (cudaMalloc aligns a buffer's start).
    let pack = 16 / std::mem::size_of::<T>();
    let aligned = |v: Option<&CudaView<'_, T>>| v.is_none_or(|v| v.device_ptr(&dev.cuda_stream()).0 % 16 == 0);
    let vec = len.is_multiple_of(pack) && aligned(residual) && (per_row || aligned(bias));
    let (name, per_thread) = if vec {
        (format!("fill_initial_vec_{}", T::SUFFIX), pack)
    } else {
        (format!("fill_initial_{}", T::SUFFIX), 1)
    };
    let func = function(dev, &super::CONV, &name)?;
    let cfg = grid(row_blocks(len / per_thread, 256), grid_rows(rows), 1, 256)?;
    let (bias, offset, residual) = (Ptr::of(bias), Ptr::of(offset), Ptr::of(residual));
    let (rows, channels, len, per_row) = (rows as i64, channels as i32, len as i64, per_row as i32);
    let mut b = func.builder();
    b.arg(out);
    bias.push(&mut b);
    offset.push(&mut b);
    residual.push(&mut b);
    b.arg(&rows).arg(&channels).arg(&len).arg(&per_row);
    // SAFETY: the arguments match the kernel's signature, the grid its rows.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// One row-major operand of a batched product: a view, its leading
/// dimension, the elements between batch items (0: shared) and whether it
/// enters transposed.
pub struct Operand<'a, T> {
    pub data: &'a CudaView<'a, T>,
    pub ld: usize,
    pub batch_stride: usize,
    pub transposed: bool,
}

/// `C[i] = A[i] · B[i] + beta · C[i]` for `batch` items of row-major `(m, k)
/// · (k, n)` products into `c` (leading dimension `ldc`, items `c_stride`
/// apart), accumulating in f32. cuBLAS is column-major: it computes `Cᵀ =
/// Bᵀ Aᵀ`, which reads the same memory.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Elem>(
    dev: &CudaDevice,
    (m, n, k, batch): (usize, usize, usize, usize),
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    c: &mut CudaViewMut<'_, T>,
    (ldc, c_stride): (usize, usize),
    beta: f64,
) -> Result<()> {
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("GEMM dimension {v} too large")));
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(b.transposed),
            transb: op(a.transposed),
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha: T::from_f64(1.0),
            lda: int(b.ld)?,
            ldb: int(a.ld)?,
            beta: T::from_f64(beta),
            ldc: int(ldc)?,
        },
        batch_size: int(batch)?,
        stride_a: b.batch_stride as i64,
        stride_b: a.batch_stride as i64,
        stride_c: c_stride as i64,
    };
    // SAFETY: the callers' dimensions and strides address their buffers.
    unsafe { T::gemm(&dev.cublas_handle(), cfg, b.data, a.data, c) }
}

/// Wraps a kernel's output for candle.
pub fn storage<T: Elem>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    T::wrap_cuda_slice(slice, dev.clone())
}
